"""Every method's spec parameters, declared once, with the traits the spec's checks need.

Torch-free, so the controller validates specs with it. Adding a method means one class here
(decorated with ``@method_params``) and one worker file in ``workers/methods/`` that
registers itself against that class: the spec's union of method sections, the set of names,
the error paths and the per-trait checks are all derived from ``METHOD_PARAMS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from pipelines.spec import JobSpec

Problems = list[tuple[str, str]]  # (field path, message)


class Section(BaseModel):
    # Unknown keys are errors: a typo such as `epoch:` must not silently fall back to a default.
    model_config = ConfigDict(
        extra="forbid", strict=True, validate_by_name=False, serialize_by_alias=True
    )


PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Tolerance = Annotated[float, Field(gt=0, lt=1)]
IterationCap = Annotated[int, Field(gt=0, le=100_000)]
Width = Annotated[int, Field(gt=0, le=65_536)]
MomentumSchedule = Literal["constant", "cosine"]  # EMA momentum per step: fixed, or base -> 1


class MethodParams(Section):
    """A method's section of the spec. ``name`` is the discriminator; the class variables
    are the method's traits, which the spec's cross-field checks read."""

    name: str
    # It trains on augmented views of images, so the augment presets apply to it.
    trains_on_views: ClassVar[bool] = False
    # Why it needs images whatever the encoder ("" when vectors will do).
    needs_images: ClassVar[str] = ""
    # It builds and trains the spec's encoder (False: it learns a dictionary or prototypes).
    trains_encoder: ClassVar[bool] = True
    # The encoder archs it can train; empty: any.
    encoder_archs: ClassVar[tuple[str, ...]] = ()
    # Why a checkpoint binds the method to its number of workers (state dealt per rank), if
    # it does: such a method's gang cannot be elastic.
    per_rank_state: ClassVar[str] = ""

    def problems(self, spec: JobSpec) -> Problems:
        """What this method needs of the rest of the spec (batch, data) that it lacks."""
        return []


METHOD_PARAMS: dict[str, type[MethodParams]] = {}


def method_params(cls: type[MethodParams]) -> type[MethodParams]:
    """Register a method's parameters under the name its ``name: Literal[...]`` field says."""
    (name,) = get_args(cls.model_fields["name"].annotation)
    METHOD_PARAMS[name] = cls
    return cls


# ---- contrastive, joint embedding ---------------------------------------------------------


class _Projected(MethodParams):
    trains_on_views: ClassVar[bool] = True
    projection_dim: PositiveInt = 64
    hidden_dim: PositiveInt = 256


@method_params
class SimCLRParams(_Projected):
    name: Literal["simclr"]
    temperature: PositiveFloat = 0.2


@method_params
class SiameseParams(_Projected):
    name: Literal["siamese"]
    # Distances between unit vectors lie in [0, 2]: a larger margin keeps every pair active.
    margin: Annotated[float, Field(gt=0, le=2)] = 1.0


@method_params
class MoCoParams(_Projected):
    name: Literal["moco"]
    # K: a multiple of the global batch, smaller than the training set minus one global batch.
    queue_size: PositiveInt = 1024
    momentum: Fraction = 0.99  # of the key encoder, per step
    temperature: PositiveFloat = 0.2

    def problems(self, spec: JobSpec) -> Problems:
        batch, images, problems = spec.train.batch_size, spec.data.train_size, []
        if self.queue_size % batch:
            problems.append(
                (
                    "method.queue_size",
                    f"{self.queue_size} is not a multiple of the global batch "
                    f"(train.batch_size {batch}): the queue takes the global batch's keys at "
                    "each step and must wrap around on a batch boundary",
                )
            )
        if images is not None and self.queue_size >= images - batch:
            problems.append(
                (
                    "method.queue_size",
                    f"{self.queue_size} must be smaller than the {images} training images of "
                    f"{spec.data.source} minus one global batch ({batch}), i.e. below "
                    f"{images - batch}: a larger queue holds keys of the very images whose "
                    "queries it is meant to contrast against",
                )
            )
        return problems


@method_params
class PIRLParams(_Projected):
    name: Literal["pirl"]
    needs_images: ClassVar[str] = "its jigsaw cuts each image into a 3x3 grid of patches"
    temperature: PositiveFloat = 0.07
    num_negatives: PositiveInt = 1024  # drawn from the memory bank each step
    # Weight kept on a bank entry's old value: m <- normalize(mu * m + (1 - mu) * f(v)).
    bank_momentum: Fraction = 0.5
    # lambda: loss = lambda * L(jigsaw) + (1 - lambda) * L(image)
    loss_lambda: Annotated[float, Field(ge=0, le=1)] = 0.5

    def problems(self, spec: JobSpec) -> Problems:
        images = spec.data.train_size
        if images is None or self.num_negatives < images:
            return []
        return [
            (
                "method.num_negatives",
                f"{self.num_negatives} must be smaller than the memory bank, which has one "
                f"entry per training image ({images} in {spec.data.source})",
            )
        ]


# ---- regularised joint embedding: no negatives ---------------------------------------------


@method_params
class BYOLParams(_Projected):
    """BYOL (Grill et al. 2020): an EMA target network and a predictor on the online side."""

    name: Literal["byol"]
    projection_dim: PositiveInt = 128
    hidden_dim: PositiveInt = 512
    predictor_hidden_dim: PositiveInt = 512
    momentum: Fraction = 0.99  # base EMA momentum of the target, tau_0
    momentum_schedule: MomentumSchedule = "cosine"


@method_params
class SimSiamParams(_Projected):
    """SimSiam (Chen & He 2021): a predictor and a stop-gradient, no target network."""

    name: Literal["simsiam"]
    projection_dim: PositiveInt = 256
    hidden_dim: PositiveInt = 256
    predictor_hidden_dim: PositiveInt = 64  # the paper's bottleneck, a quarter of the output


@method_params
class BarlowTwinsParams(_Projected):
    """Barlow Twins (Zbontar et al. 2021): the cross-correlation of the two views' embeddings
    over the global batch pulled towards the identity."""

    name: Literal["barlow_twins"]
    projection_dim: PositiveInt = 1024
    hidden_dim: PositiveInt = 1024
    off_diagonal_weight: PositiveFloat = 0.0051  # lambda


@method_params
class VICRegParams(_Projected):
    """VICReg (Bardes et al. 2022): invariance, variance and covariance terms."""

    name: Literal["vicreg"]
    projection_dim: PositiveInt = 1024
    hidden_dim: PositiveInt = 1024
    invariance_weight: PositiveFloat = 25.0  # lambda
    variance_weight: PositiveFloat = 25.0  # mu
    covariance_weight: PositiveFloat = 1.0  # nu


@method_params
class DINOParams(MethodParams):
    """DINO (Caron et al. 2021): a student matches an EMA teacher's centred, sharpened
    distribution over ``prototypes`` outputs, across global and local crops."""

    name: Literal["dino"]
    trains_on_views: ClassVar[bool] = True
    needs_images: ClassVar[str] = "its multi-crop views are crops of an image"
    hidden_dim: PositiveInt = 512
    bottleneck_dim: PositiveInt = 128
    prototypes: Annotated[int, Field(gt=1, le=262_144)] = 4096  # K, the head's output width
    # BatchNorm in the head's MLP (the paper code's use_bn_in_head): without it a small
    # convnet's features, which all point one way at init, collapse to uniform targets.
    head_batchnorm: bool = False
    student_temperature: PositiveFloat = 0.1
    teacher_temperature: PositiveFloat = 0.04  # reached after the warm-up
    warmup_teacher_temperature: PositiveFloat = 0.04
    warmup_teacher_epochs: Annotated[int, Field(ge=0)] = 0
    center_momentum: Fraction = 0.9
    momentum: Fraction = 0.996  # base EMA momentum of the teacher
    momentum_schedule: MomentumSchedule = "cosine"
    local_crops: Annotated[int, Field(ge=0, le=16)] = 4
    # The side of a local crop in pixels; 0: half the image (rounded to the ViT's patch size).
    local_crop_size: Annotated[int, Field(ge=0)] = 0
    # Global crops cover (split, 1] of the image, local crops (0.05, split].
    crop_scale_split: Annotated[float, Field(gt=0.05, lt=1)] = 0.4

    def problems(self, spec: JobSpec) -> Problems:
        if self.warmup_teacher_epochs >= spec.train.epochs and self.warmup_teacher_epochs:
            return [("method.warmup_teacher_epochs", "must be smaller than train.epochs")]
        if self.local_crop_size > spec.data.side:
            return [
                (
                    "method.local_crop_size",
                    f"{self.local_crop_size} exceeds the {spec.data.side}-pixel images "
                    f"of {spec.data.source}",
                )
            ]
        config = spec.encoder.config(spec.data.depth, spec.data.side)
        patch = config.get("patch_size", 1)  # ViTs only
        if self.local_crop_size % patch:
            return [
                (
                    "method.local_crop_size",
                    f"{self.local_crop_size} is not a multiple of the ViT's patch_size {patch}",
                )
            ]
        return []


@method_params
class MAEParams(MethodParams):
    """Masked autoencoder (He et al. 2022): a ViT encodes the visible patches, a small
    decoder reconstructs the masked ones, and the loss is on masked patches only."""

    name: Literal["mae"]
    trains_on_views: ClassVar[bool] = True
    needs_images: ClassVar[str] = "it masks and reconstructs image patches"
    encoder_archs: ClassVar[tuple[str, ...]] = ("vit-tiny", "vit-small")
    mask_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.75  # round(ratio * N) masked per image
    # A multiple of 4 (the 2-D sin-cos position table) and of decoder_heads.
    decoder_dim: PositiveInt = 128
    decoder_depth: Annotated[int, Field(gt=0, le=24)] = 2
    decoder_heads: Annotated[int, Field(gt=0, le=64)] = 4
    norm_pix_loss: bool = True  # target: each patch normalised by its own mean and variance

    def problems(self, spec: JobSpec) -> Problems:
        problems: Problems = []
        if self.decoder_dim % 4 or self.decoder_dim % self.decoder_heads:
            problems.append(
                (
                    "method.decoder_dim",
                    f"{self.decoder_dim} must be a multiple of 4 (its 2-D sin-cos position "
                    f"table) and of decoder_heads ({self.decoder_heads})",
                )
            )
        if not spec.encoder.arch.startswith("vit") or spec.data.dataset == "spiral":
            return problems  # the arch or the data is refused already
        side = spec.data.side
        patches = (side // spec.encoder.config(spec.data.depth, side)["patch_size"]) ** 2
        masked = round(self.mask_ratio * patches)
        if not 0 < masked < patches:
            problems.append(
                (
                    "method.mask_ratio",
                    f"{self.mask_ratio} masks {masked} of the {patches} patches of each image: "
                    "at least one must be masked (the loss is on those) and one visible",
                )
            )
        return problems


# ---- the regularized latent-variable and energy-based family -------------------------------
# Sparse coding's energy is E(y, z) = ||y - W z||^2 + lam * |z|_1 (no 1/2; workers/sparse.py):
# scikit-learn's alpha is lam / 2. A code's iterations stop when it moves by less than `tol`
# relative, or at `max_iter`.


@method_params
class KMeansParams(MethodParams):
    name: Literal["kmeans"]
    trains_encoder: ClassVar[bool] = False
    clusters: Annotated[int, Field(ge=2, le=65_536)] = 64  # at most the global batch

    def problems(self, spec: JobSpec) -> Problems:
        if self.clusters <= spec.train.batch_size:
            return []
        return [
            (
                "method.clusters",
                f"{self.clusters} exceeds train.batch_size ({spec.train.batch_size}): the "
                "prototypes start as the first global batch's samples",
            )
        ]


@method_params
class PCAParams(MethodParams):
    name: Literal["pca"]
    trains_encoder: ClassVar[bool] = False
    components: Width = 32  # at most the data's dimension

    def problems(self, spec: JobSpec) -> Problems:
        if self.components <= spec.data.sample_dim:
            return []
        return [
            (
                "method.components",
                f"{self.components} exceeds the {spec.data.sample_dim} dimensions of "
                f"{spec.data.source}",
            )
        ]


@method_params
class SparseCodingParams(MethodParams):
    name: Literal["sparse_coding"]
    trains_encoder: ClassVar[bool] = False
    atoms: Width = 128
    lam: PositiveFloat = 1.0
    solver: Literal["fista", "ista"] = "fista"
    tol: Tolerance = 1e-4
    max_iter: IterationCap = 300


@method_params
class LISTAParams(MethodParams):
    name: Literal["lista"]
    trains_encoder: ClassVar[bool] = False
    atoms: Width = 128
    lam: PositiveFloat = 1.0
    layers: Annotated[int, Field(gt=0, le=64)] = 5  # T
    tied: bool = False  # one (B, S, theta) for all layers, or one per layer
    loss: Literal["code", "energy"] = "code"  # predict the FISTA codes, or minimise E directly
    momentum: bool = False  # unroll FISTA (a learned momentum per layer) instead of ISTA
    tol: Tolerance = 1e-4  # of the FISTA that gives the target codes and learns W
    max_iter: IterationCap = 300


@method_params
class ConvSparseCodingParams(MethodParams):
    name: Literal["conv_sparse_coding"]
    needs_images: ClassVar[str] = "its kernels are convolved over the image"
    kernels: Annotated[int, Field(gt=0, le=1024)] = 16
    kernel_size: Annotated[int, Field(ge=1, le=31)] = 5  # odd: maps as large as the image
    lam: PositiveFloat = 0.5
    tol: Tolerance = 1e-3
    max_iter: IterationCap = 100
    pool: Annotated[int, Field(gt=0, le=16)] = 2  # the encoder pools each map to pool x pool

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd (got {value}) so that a map is as large as the image")
        return value


@method_params
class VAEParams(MethodParams):
    name: Literal["vae"]
    latent_dim: Annotated[int, Field(gt=0, le=4096)] = 16
    beta: Annotated[float, Field(ge=0, le=1000)] = 1.0
    hidden_dim: PositiveInt = 256  # of the decoder


@method_params
class DAEParams(MethodParams):
    name: Literal["dae"]
    corruption: Literal["noise", "mask"] = "noise"  # "mask": a masked autoencoder
    noise_std: PositiveFloat = 0.3
    mask_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.5
    mask_patch: Annotated[int, Field(gt=0, le=64)] = 2  # side of a hidden square, in pixels
    hidden_dim: PositiveInt = 256  # of the decoder


@method_params
class RBMParams(MethodParams):
    per_rank_state: ClassVar[str] = "each worker continues its own persistent chains"
    name: Literal["rbm"]
    hidden: Width = 128
    cd_steps: Annotated[int, Field(gt=0, le=1000)] = 1  # k of CD-k
    persistent: bool = False  # persistent CD: chains never reset to data
    chains: Width = 64  # persistent chains per worker

    def problems(self, spec: JobSpec) -> Problems:
        whitened = spec.data.patches is not None and spec.data.patches.whiten
        if spec.data.dataset != "spiral" and not whitened:
            return []
        return [
            (
                "data.source",
                "rbm needs data in [0, 1]: unwhitened images, not vectors or whitened patches",
            )
        ]


@method_params
class LangevinEBMParams(MethodParams):
    per_rank_state: ClassVar[str] = "each worker continues its own persistent chains"
    name: Literal["ebm_langevin"]
    langevin_steps: Annotated[int, Field(gt=0, le=1000)] = 20
    step_size: PositiveFloat = 0.01  # y <- y - step_size * grad F(y) + noise_std * eps
    noise_std: Annotated[float, Field(ge=0)] = 0.1
    buffer_size: Annotated[int, Field(gt=0, le=1_000_000)] = 2048  # replay buffer per worker
    reinit_fraction: Annotated[float, Field(ge=0, le=1)] = 0.05  # negatives started from noise
    energy_penalty: Annotated[float, Field(ge=0)] = 0.1  # weight of mean F^2
    energy_limit: PositiveFloat = 1e4  # |F| or |y| beyond it fails the job: diverged
