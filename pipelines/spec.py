"""The job spec: what a user writes in YAML, validated in full before anything is queued.

This module is torch-free on purpose: the control plane (service/) validates specs with it.
Every error names the field it is about, as a dotted path (``train.batch_size``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

BUILTIN_DATASETS = ("digits", "patches", "spiral")
# Image counts of the built-in datasets: checks that depend on the training set's size
# (MoCo's queue, PIRL's negatives) must not load data (or torch) here.
BUILTIN_DATASET_SIZES = {"digits": 1797}  # patches and spiral: their `count` option
ENCODER_ARCHS = ("small-convnet", "mlp")
AUGMENT_PRESETS = ("digits", "simclr", "none")
OPTIMIZERS = ("sgd", "adam", "adamw")
# Names shared by the job id, the Ray submission id, the MLflow run and the registered model.
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class SpecError(Exception):
    """A spec that cannot run. ``problems`` holds (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{field}: {message}" for field, message in problems))


class _Section(BaseModel):
    # Unknown keys are errors: a typo such as `epoch:` must not silently fall back to a default.
    model_config = ConfigDict(
        extra="forbid", strict=True, validate_by_name=False, serialize_by_alias=True
    )


PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class SimCLRParams(_Section):
    name: Literal["simclr"]
    temperature: PositiveFloat = 0.2
    projection_dim: PositiveInt = 64
    hidden_dim: PositiveInt = 256


class SiameseParams(_Section):
    name: Literal["siamese"]
    # Distances between unit vectors lie in [0, 2]: a larger margin keeps every pair active.
    margin: Annotated[float, Field(gt=0, le=2)] = 1.0
    projection_dim: PositiveInt = 64
    hidden_dim: PositiveInt = 256


class MoCoParams(_Section):
    name: Literal["moco"]
    # K: a multiple of the global batch, smaller than the training set minus one global batch
    # (checked in _bank_and_queue_problems, where the batch and the data are known).
    queue_size: PositiveInt = 1024
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.99  # of the key encoder, per step
    temperature: PositiveFloat = 0.2
    projection_dim: PositiveInt = 64
    hidden_dim: PositiveInt = 256


class PIRLParams(_Section):
    name: Literal["pirl"]
    temperature: PositiveFloat = 0.07
    num_negatives: PositiveInt = 1024  # drawn from the memory bank each step
    # Weight kept on a bank entry's old value: m <- normalize(mu * m + (1 - mu) * f(v)).
    bank_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.5
    # lambda: loss = lambda * L(jigsaw) + (1 - lambda) * L(image)
    loss_lambda: Annotated[float, Field(ge=0, le=1)] = 0.5
    projection_dim: PositiveInt = 64
    hidden_dim: PositiveInt = 256


# The regularized latent-variable and energy-based family. Sparse coding's energy is
# E(y, z) = ||y - W z||^2 + lam * |z|_1 (no 1/2; workers/sparse.py): scikit-learn's alpha is
# lam / 2. A code's iterations stop when it moves by less than `tol` relative, or at `max_iter`.
Tolerance = Annotated[float, Field(gt=0, lt=1)]
IterationCap = Annotated[int, Field(gt=0, le=100_000)]
Width = Annotated[int, Field(gt=0, le=65_536)]


class KMeansParams(_Section):
    name: Literal["kmeans"]
    clusters: Annotated[int, Field(ge=2, le=65_536)] = 64  # at most the global batch


class PCAParams(_Section):
    name: Literal["pca"]
    components: Width = 32  # at most the data's dimension


class SparseCodingParams(_Section):
    name: Literal["sparse_coding"]
    atoms: Width = 128
    lam: PositiveFloat = 1.0
    solver: Literal["fista", "ista"] = "fista"
    tol: Tolerance = 1e-4
    max_iter: IterationCap = 300


class LISTAParams(_Section):
    name: Literal["lista"]
    atoms: Width = 128
    lam: PositiveFloat = 1.0
    layers: Annotated[int, Field(gt=0, le=64)] = 5  # T
    tied: bool = False  # one (B, S, theta) for all layers, or one per layer
    loss: Literal["code", "energy"] = "code"  # predict the FISTA codes, or minimise E directly
    momentum: bool = False  # unroll FISTA (a learned momentum per layer) instead of ISTA
    tol: Tolerance = 1e-4  # of the FISTA that gives the target codes and learns W
    max_iter: IterationCap = 300


class ConvSparseCodingParams(_Section):
    name: Literal["conv_sparse_coding"]
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


class VAEParams(_Section):
    name: Literal["vae"]
    latent_dim: Annotated[int, Field(gt=0, le=4096)] = 16
    beta: Annotated[float, Field(ge=0, le=1000)] = 1.0
    hidden_dim: PositiveInt = 256  # of the decoder


class DAEParams(_Section):
    name: Literal["dae"]
    corruption: Literal["noise", "mask"] = "noise"  # "mask": a masked autoencoder
    noise_std: PositiveFloat = 0.3
    mask_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.5
    mask_patch: Annotated[int, Field(gt=0, le=64)] = 2  # side of a hidden square, in pixels
    hidden_dim: PositiveInt = 256  # of the decoder


class RBMParams(_Section):
    name: Literal["rbm"]
    hidden: Width = 128
    cd_steps: Annotated[int, Field(gt=0, le=1000)] = 1  # k of CD-k
    persistent: bool = False  # persistent CD: chains never reset to data
    chains: Width = 64  # persistent chains per worker


class LangevinEBMParams(_Section):
    name: Literal["ebm_langevin"]
    langevin_steps: Annotated[int, Field(gt=0, le=1000)] = 20
    step_size: PositiveFloat = 0.01  # y <- y - step_size * grad F(y) + noise_std * eps
    noise_std: Annotated[float, Field(ge=0)] = 0.1
    buffer_size: Annotated[int, Field(gt=0, le=1_000_000)] = 2048  # replay buffer per worker
    reinit_fraction: Annotated[float, Field(ge=0, le=1)] = 0.05  # negatives started from noise
    energy_penalty: Annotated[float, Field(ge=0)] = 0.1  # weight of mean F^2
    energy_limit: PositiveFloat = 1e4  # |F| or |y| beyond it fails the job: diverged


MethodParams = Annotated[
    SimCLRParams
    | SiameseParams
    | MoCoParams
    | PIRLParams
    | KMeansParams
    | PCAParams
    | SparseCodingParams
    | LISTAParams
    | ConvSparseCodingParams
    | VAEParams
    | DAEParams
    | RBMParams
    | LangevinEBMParams,
    Field(discriminator="name"),
]


class EncoderSpec(_Section):
    arch: str = "small-convnet"
    out_dim: PositiveInt = 128

    @model_validator(mode="after")
    def _known_arch(self) -> EncoderSpec:
        if self.arch not in ENCODER_ARCHS:
            raise ValueError(
                f"unknown encoder.arch {self.arch!r}; known: {', '.join(ENCODER_ARCHS)}"
            )
        return self


class PatchesOptions(_Section):
    """builtin:patches: grey patches of the photographs bundled with scikit-image/-learn."""

    size: Annotated[int, Field(ge=2, le=64)] = 8
    count: Annotated[int, Field(ge=10, le=1_000_000)] = 20_000
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0
    whiten: bool = False  # ZCA, then unit variance per pixel


class SpiralOptions(_Section):
    """builtin:spiral: points on a noisy 2-D spiral in [-1, 1]^2."""

    count: Annotated[int, Field(ge=10, le=1_000_000)] = 2_000
    noise: Annotated[float, Field(ge=0, le=1)] = 0.02
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0


# The sources that take options, each under its own name in the data section.
SOURCE_OPTIONS: dict[str, type[_Section]] = {"patches": PatchesOptions, "spiral": SpiralOptions}


class DataSpec(_Section):
    source: str = "builtin:digits"
    # Held out for evaluation, never seen by pretraining; the split is stratified (when the
    # data has labels) and seeded.
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25
    split_seed: Annotated[int, Field(ge=0)] = 0
    # A source's options sit under its name; patches and spiral have no labels.
    patches: PatchesOptions | None = None
    spiral: SpiralOptions | None = None

    @model_validator(mode="after")
    def _known_source(self) -> DataSpec:
        scheme, _, rest = self.source.partition(":")
        if scheme != "builtin":
            raise ValueError(
                f"unsupported data.source {self.source!r}; supported: "
                + ", ".join(f"builtin:{name}" for name in BUILTIN_DATASETS)
            )
        if rest not in BUILTIN_DATASETS:
            raise ValueError(
                f"unknown dataset {rest!r} in data.source; known: "
                + ", ".join(f"builtin:{name}" for name in BUILTIN_DATASETS)
            )
        for name in SOURCE_OPTIONS:
            if getattr(self, name) is not None and rest != name:
                raise ValueError(
                    f"data.{name} sets options of builtin:{name}, not of {self.source}"
                )
        return self

    @property
    def dataset(self) -> str:
        return self.source.partition(":")[2]

    @property
    def options(self) -> dict[str, Any]:
        """The source's options for ``workers.data.load_dataset`` (defaults when unset)."""
        defaults = SOURCE_OPTIONS.get(self.dataset)
        if defaults is None:
            return {}
        return (getattr(self, self.dataset) or defaults()).model_dump()

    @property
    def size(self) -> int:
        """How many samples the source holds."""
        return self.options.get("count", BUILTIN_DATASET_SIZES.get(self.dataset, 0))

    @property
    def sample_dim(self) -> int:
        """The length of one flattened sample."""
        return {"digits": 64, "spiral": 2}.get(self.dataset) or self.options["size"] ** 2


class AugmentSpec(_Section):
    preset: str = "digits"

    @model_validator(mode="after")
    def _known_preset(self) -> AugmentSpec:
        if self.preset not in AUGMENT_PRESETS:
            raise ValueError(
                f"unknown augment.preset {self.preset!r}; known: {', '.join(AUGMENT_PRESETS)}"
            )
        return self


class TrainSpec(_Section):
    epochs: Annotated[int, Field(gt=0, le=10_000)] = 30
    batch_size: Annotated[int, Field(gt=1, le=65_536)] = 256
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: Annotated[float, Field(gt=0, le=10)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 1e-6
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0
    log_every_steps: PositiveInt = 5


class ResourcesSpec(_Section):
    workers: Annotated[int, Field(gt=0, le=1024)] = 2
    cpus_per_worker: Annotated[float, Field(gt=0, le=256)] = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0, le=16)] = 0.0


LabelFraction = Annotated[float, Field(gt=0, lt=1)]
EvaluationSeed = Annotated[int, Field(ge=0, lt=2**31)]


class EvaluateSpec(_Section):
    """Which downstream protocols run on the held-out split (all on frozen features except
    semi-supervised fine-tuning), and the baselines beside them on the same split."""

    linear: bool = True
    knn: bool = True
    knn_k: Annotated[int, Field(gt=0, le=1000)] = 20
    knn_temperature: Annotated[float, Field(gt=0, le=10)] = 0.07
    # Semi-supervised: each fraction of the training labels (stratified, >= 1 per class),
    # once per seed; an empty list turns the protocol off.
    label_fractions: Annotated[list[LabelFraction], Field(max_length=8)] = [0.01, 0.1]
    seeds: Annotated[list[EvaluationSeed], Field(min_length=1, max_length=10)] = [0, 1, 2]
    finetune: bool = True
    finetune_steps: Annotated[int, Field(gt=0, le=100_000)] = 100
    finetune_lr: Annotated[float, Field(gt=0, le=1)] = 1e-3
    baselines: bool = True

    @field_validator("label_fractions", "seeds")
    @classmethod
    def _distinct(cls, values: list) -> list:
        if len(set(values)) != len(values):
            raise ValueError(f"repeated values in {values}")
        return values


class RegisterSpec(_Section):
    model: Annotated[str, Field(pattern=_NAME_PATTERN)]
    alias: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")] = "candidate"


class JobSpec(_Section):
    name: Annotated[str, Field(pattern=_NAME_PATTERN)]
    method: MethodParams
    encoder: EncoderSpec = EncoderSpec()
    data: DataSpec = DataSpec()
    augment: AugmentSpec = AugmentSpec()
    train: TrainSpec = TrainSpec()
    resources: ResourcesSpec = ResourcesSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    # `register` is what users write; the attribute is renamed because pydantic's BaseModel
    # already has a `register` method.
    registration: RegisterSpec | None = Field(default=None, alias="register")
    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0
    max_retries: Annotated[int, Field(ge=0, le=100)] = 0

    def config_hash(self) -> str:
        """A stable hash of everything that shapes the result (not priority or retries)."""
        shaping = self.model_dump(mode="json", exclude={"priority", "max_retries", "registration"})
        canonical = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def flat_params(self) -> dict[str, str]:
        """The spec as flat ``section.key -> value`` strings, for MLflow params."""
        flat: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, inner in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, inner)
            else:
                flat[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

        document = self.model_dump(mode="json")
        # Each source keeps its options under its own name, unset (None) unless written: log
        # the chosen source's options with their defaults filled in, and no other source's.
        data = document["data"]
        for source in SOURCE_OPTIONS:
            data.pop(source)
        if self.data.options:
            data[self.data.dataset] = self.data.options
        walk("", document)
        return flat


def _cross_field_problems(spec: JobSpec) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if spec.train.batch_size % spec.resources.workers:
        problems.append(
            (
                "train.batch_size",
                f"{spec.train.batch_size} is not divisible by resources.workers "
                f"({spec.resources.workers}): each worker takes an equal share of the global batch",
            )
        )
    elif spec.train.batch_size // spec.resources.workers < 2:
        problems.append(("train.batch_size", "each worker needs at least 2 samples per step"))
    if spec.train.warmup_epochs >= spec.train.epochs and spec.train.warmup_epochs:
        problems.append(("train.warmup_epochs", "must be smaller than train.epochs"))
    problems += _bank_and_queue_problems(spec)
    problems += _latent_problems(spec)
    problems += _vector_problems(spec)
    return problems


def _latent_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """What the latent-variable and energy-based methods need of the data and the batch."""
    method, data = spec.method, spec.data
    vectors = data.dataset == "spiral"
    whitened = data.patches is not None and data.patches.whiten
    problems: list[tuple[str, str]] = []
    if isinstance(method, KMeansParams) and method.clusters > spec.train.batch_size:
        problems.append(
            (
                "method.clusters",
                f"{method.clusters} exceeds train.batch_size ({spec.train.batch_size}): the "
                "prototypes start as the first global batch's samples",
            )
        )
    if isinstance(method, PCAParams) and method.components > data.sample_dim:
        problems.append(
            (
                "method.components",
                f"{method.components} exceeds the {data.sample_dim} dimensions of {data.source}",
            )
        )
    if isinstance(method, RBMParams) and (vectors or whitened):
        problems.append(
            (
                "data.source",
                "rbm needs data in [0, 1]: unwhitened images, not vectors or whitened patches",
            )
        )
    return problems


# Methods that cut or convolve images, whatever the encoder: why, for the error message.
_IMAGE_METHODS = {
    "pirl": "its jigsaw cuts each image into a 3x3 grid of patches",
    "conv_sparse_coding": "its kernels are convolved over the image",
}
# Methods that train on augmented views (every augmentation preset but "none" transforms
# images) and methods whose spec encoder is never built (they learn a dictionary instead).
_VIEW_METHODS = SimCLRParams | SiameseParams | MoCoParams | PIRLParams
_NO_BACKBONE_METHODS = KMeansParams | PCAParams | SparseCodingParams | LISTAParams


def _vector_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """What cannot run on 2-D points (builtin:spiral): image-only methods, convolutional
    encoders and image augmentations. A method that needs images gets that one message only,
    since no encoder or preset would make it run."""
    if spec.data.dataset != "spiral":
        return []
    name, points = spec.method.name, f"{spec.data.source} holds 2-D points, not images"
    if name in _IMAGE_METHODS:
        return [("data.source", f"{name} needs images ({_IMAGE_METHODS[name]}): {points}")]
    problems: list[tuple[str, str]] = []
    if spec.encoder.arch != "mlp" and not isinstance(spec.method, _NO_BACKBONE_METHODS):
        problems.append(
            ("encoder.arch", f"{spec.encoder.arch!r} is convolutional: {points}; use mlp")
        )
    if spec.augment.preset != "none" and isinstance(spec.method, _VIEW_METHODS):
        problems.append(
            (
                "augment.preset",
                f"{spec.augment.preset!r} augments images: {points}; use none",
            )
        )
    return problems


def train_size(data: DataSpec) -> int:
    """How many images pretraining sees: the stratified split keeps n - ceil(test_fraction * n)
    (scikit-learn's rounding in ``workers.data.split_indices``)."""
    total = data.size
    return total - math.ceil(data.test_fraction * total)


def _bank_and_queue_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """MoCo's queue and PIRL's negatives against the global batch and the training set."""
    method, batch = spec.method, spec.train.batch_size
    if not isinstance(method, MoCoParams | PIRLParams):
        return []
    images = train_size(spec.data)
    problems: list[tuple[str, str]] = []
    if isinstance(method, MoCoParams):
        if method.queue_size % batch:
            problems.append(
                (
                    "method.queue_size",
                    f"{method.queue_size} is not a multiple of the global batch "
                    f"(train.batch_size {batch}): the queue takes the global batch's keys at "
                    "each step and must wrap around on a batch boundary",
                )
            )
        if method.queue_size >= images - batch:
            problems.append(
                (
                    "method.queue_size",
                    f"{method.queue_size} must be smaller than the {images} training images of "
                    f"{spec.data.source} minus one global batch ({batch}), i.e. below "
                    f"{images - batch}: a larger queue holds keys of the very images whose "
                    "queries it is meant to contrast against",
                )
            )
    if isinstance(method, PIRLParams) and method.num_negatives >= images:
        problems.append(
            (
                "method.num_negatives",
                f"{method.num_negatives} must be smaller than the memory bank, which has one "
                f"entry per training image ({images} in {spec.data.source})",
            )
        )
    return problems


def _field_path(location: tuple[int | str, ...]) -> str:
    # Pydantic puts the discriminator's tag into the location (method.simclr.temperature):
    # drop it so the path is the one the user wrote.
    parts = [str(part) for part in location]
    tags = {"simclr", "siamese", "moco", "pirl", "kmeans", "pca", "sparse_coding", "lista"}
    tags |= {"conv_sparse_coding", "vae", "dae", "rbm", "ebm_langevin"}
    if len(parts) >= 2 and parts[0] == "method" and parts[1] in tags:
        parts.pop(1)
    return ".".join(parts) or "(spec)"


def _describe(error: dict[str, Any]) -> str:
    message = error["msg"]
    # "Value error, unknown ..." -> "unknown ...": the prefix says nothing to a user.
    return re.sub(r"^(Value|Assertion) error, ", "", message)


def parse_spec(document: Any) -> JobSpec:
    """Validate an already-parsed YAML document; raise SpecError naming each bad field."""
    if not isinstance(document, dict):
        raise SpecError([("(spec)", "the spec must be a YAML mapping of sections")])
    try:
        spec = JobSpec.model_validate(document)
    except ValidationError as error:
        raise SpecError(
            [(_field_path(item["loc"]), _describe(item)) for item in error.errors()]
        ) from None
    problems = _cross_field_problems(spec)
    if problems:
        raise SpecError(problems)
    return spec


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    """YAML text -> Python values, safely, with ``1e-3`` read as a float."""
    return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass


def load_spec_text(text: str) -> JobSpec:
    """Parse and validate YAML text. Any problem, YAML syntax included, is a SpecError."""
    try:
        document = read_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecError([("(yaml)", f"not valid YAML{where}: {problem}")]) from None
    except (ValueError, RecursionError) as error:
        raise SpecError([("(yaml)", f"not valid YAML: {error}")]) from None
    return parse_spec(document)
