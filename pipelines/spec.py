"""The job spec: what a user writes in YAML, validated in full before anything is queued.

This module is torch-free on purpose: the control plane (service/) validates specs with it.
Every error names the field it is about, as a dotted path (``train.batch_size``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from pipelines.params import METHOD_PARAMS, PositiveInt, Problems, Section
from pipelines.sources import ImageSource, is_image_source

BUILTIN_DATASETS = ("digits", "patches", "spiral")
# Image counts of the built-in datasets: checks that depend on the training set's size
# (MoCo's queue, PIRL's negatives) must not load data (or torch) here.
BUILTIN_DATASET_SIZES = {"digits": 1797}  # patches and spiral: their `count` option
# data fields of a user's images only, and the side their images are decoded to by default.
USER_DATA_FIELDS = ("image_size", "channels", "max_bad_fraction", "image_column", "label_column")
DEFAULT_IMAGE_SIZE = 32
DEFAULT_MAX_BAD_FRACTION = 0.001
# Encoder archs and the width of their features where encoder.out_dim is left unset. ResNets
# and ViTs have a fixed width: global pooling before the classifier, and the CLS token.
ENCODER_WIDTHS = {
    "small-convnet": 128,
    "mlp": 128,
    "resnet18": 512,
    "resnet50": 2048,
    "vit-tiny": 192,
    "vit-small": 384,
}
FIXED_WIDTH_ARCHS = ("resnet18", "resnet50", "vit-tiny", "vit-small")
# Below this side the ResNets' "auto" stem is CIFAR's (3x3 conv, no max-pool), from it on
# ImageNet's (7x7 stride-2 conv and a max-pool).
IMAGENET_STEM_FROM = 96
AUGMENT_PRESETS = ("digits", "simclr", "none")
# Names shared by the job id, the Ray submission id, the MLflow run and the registered model.
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
JOB_ID_PATTERN = r"^job-[0-9a-f]{12}$"  # the ids the controller gives jobs


class SpecError(Exception):
    """A spec that cannot run. ``problems`` holds (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{field}: {message}" for field, message in problems))


# Every method's section, derived from the declarations in pipelines/params.py.
MethodSection = Annotated[
    Union[tuple(METHOD_PARAMS.values())],  # noqa: UP007 - a Union built from a tuple
    Field(discriminator="name"),
]


class EncoderSpec(Section):
    arch: str = "small-convnet"
    out_dim: PositiveInt | None = None  # unset: the arch's own width (ENCODER_WIDTHS)
    stem: Literal["auto", "cifar", "imagenet"] = "auto"  # ResNets only
    patch_size: Annotated[int, Field(gt=0, le=64)] | None = None  # ViTs only; unset: side / 8

    @model_validator(mode="after")
    def _known_arch(self) -> EncoderSpec:
        if self.arch not in ENCODER_WIDTHS:
            raise ValueError(
                f"unknown encoder.arch {self.arch!r}; known: {', '.join(ENCODER_WIDTHS)}"
            )
        width = ENCODER_WIDTHS[self.arch]
        if self.out_dim is None:
            self.out_dim = width
        elif self.arch in FIXED_WIDTH_ARCHS and self.out_dim != width:
            raise ValueError(
                f"encoder.out_dim {self.out_dim}: {self.arch} features are {width} wide; "
                "leave out_dim unset"
            )
        if self.stem != "auto" and not self.arch.startswith("resnet"):
            raise ValueError(f"encoder.stem applies to ResNets, not to {self.arch}")
        if self.patch_size is not None and not self.arch.startswith("vit"):
            raise ValueError(f"encoder.patch_size applies to ViTs, not to {self.arch}")
        return self

    def config(self, in_channels: int, image_size: int) -> dict[str, Any]:
        """The backbone's constructor config (``workers.encoders.build_encoder``) for data of
        ``in_channels`` x ``image_size`` x ``image_size``."""
        config = {
            "arch": self.arch,
            "in_channels": in_channels,
            "image_size": image_size,
            "out_dim": self.out_dim,
        }
        if self.arch.startswith("resnet"):
            auto = "imagenet" if image_size >= IMAGENET_STEM_FROM else "cifar"
            config["stem"] = auto if self.stem == "auto" else self.stem
        if self.arch.startswith("vit"):
            config["patch_size"] = self.patch_size or max(1, image_size // 8)
        return config


class PatchesOptions(Section):
    """builtin:patches: grey patches of the photographs bundled with scikit-image/-learn."""

    size: Annotated[int, Field(ge=2, le=64)] = 8
    count: Annotated[int, Field(ge=10, le=1_000_000)] = 20_000
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0
    whiten: bool = False  # ZCA, then unit variance per pixel
    # 3: colour crops (grey photographs repeated over the channels); 1: grey patches.
    channels: Literal[1, 3] = 1
    # Label each patch with the photograph it was cut from (one class per photograph), so
    # that downstream protocols can score encoders on patches; unlabelled by default.
    labelled: bool = False


class SpiralOptions(Section):
    """builtin:spiral: points on a noisy 2-D spiral in [-1, 1]^2."""

    count: Annotated[int, Field(ge=10, le=1_000_000)] = 2_000
    noise: Annotated[float, Field(ge=0, le=1)] = 0.02
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0


# The sources that take options, each under its own name in the data section.
SOURCE_OPTIONS: dict[str, type[Section]] = {"patches": PatchesOptions, "spiral": SpiralOptions}


class DataSpec(Section):
    # builtin:NAME, or a user's images: file:///folder or s3://bucket/prefix/ (pipelines/sources.py)
    source: str = "builtin:digits"
    # Held out for evaluation, never seen by pretraining; the split is stratified (when the
    # data has labels) and seeded.
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25
    split_seed: Annotated[int, Field(ge=0)] = 0
    # A source's options sit under its name; patches and spiral have no labels.
    patches: PatchesOptions | None = None
    spiral: SpiralOptions | None = None
    # A user's images: decoded, shorter side resized to image_size, centre-cropped; grey
    # expanded to RGB or colour turned grey to match channels. Builtins fix both themselves.
    image_size: Annotated[int, Field(ge=4, le=1024)] | None = None
    channels: Literal[1, 3] | None = None
    # Unreadable files skipped before the job fails, as a fraction of the training images.
    # Unset: DEFAULT_MAX_BAD_FRACTION for a user's images.
    max_bad_fraction: Annotated[float, Field(ge=0, lt=1)] | None = None
    # Shard sets (pipelines/shards.py): the Parquet column, or the WebDataset member
    # extension, that holds each encoded image (unset: "image"; a tar sample's first image
    # member), and the one that holds its class, for evaluation only (unset: none; "cls").
    image_column: Annotated[str, Field(min_length=1)] | None = None
    label_column: Annotated[str, Field(min_length=1)] | None = None
    # How many images a listing found: set by the driver once it has listed the source.
    _listed: int | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _known_source(self) -> DataSpec:
        if is_image_source(self.source):
            try:
                ImageSource.parse(self.source)
            except ValueError as error:
                raise ValueError(f"data.source {error}") from None
            self.image_size = self.image_size or DEFAULT_IMAGE_SIZE
            self.channels = self.channels or 3
            if self.max_bad_fraction is None:
                self.max_bad_fraction = DEFAULT_MAX_BAD_FRACTION
            return self
        scheme, _, rest = self.source.partition(":")
        supported = [f"builtin:{name}" for name in BUILTIN_DATASETS]
        if scheme != "builtin":
            raise ValueError(
                f"unsupported data.source {self.source!r}; supported: "
                + ", ".join([*supported, "file:///folder", "s3://bucket/prefix/"])
            )
        if rest not in BUILTIN_DATASETS:
            raise ValueError(
                f"unknown dataset {rest!r} in data.source; known: " + ", ".join(supported)
            )
        for name in SOURCE_OPTIONS:
            if getattr(self, name) is not None and rest != name:
                raise ValueError(
                    f"data.{name} sets options of builtin:{name}, not of {self.source}"
                )
        # Compared with None, not looked up in the fields set: a stored spec, dumped with
        # its unset fields as null, must parse again (the driver re-reads it).
        for name in USER_DATA_FIELDS:
            if getattr(self, name) is not None:
                raise ValueError(
                    f"data.{name} applies to file:// and s3:// sources; {self.source} sets its own"
                )
        return self

    @property
    def is_user_data(self) -> bool:
        """A user's folder or bucket, streamed with Ray Data; otherwise a builtin in memory."""
        return is_image_source(self.source)

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

    def listed(self, count: int) -> None:
        """Record how many images the source holds, once the driver has listed it."""
        self._listed = count

    @property
    def size(self) -> int | None:
        """How many samples the source holds; None for a user's images until listed."""
        if self.is_user_data:
            return self._listed
        return self.options.get("count", BUILTIN_DATASET_SIZES.get(self.dataset, 0))

    @property
    def train_size(self) -> int | None:
        """How many samples pretraining sees: the split keeps n - ceil(test_fraction * n)
        (scikit-learn's rounding in ``workers.data.split_indices``); None while unknown."""
        size = self.size
        return None if size is None else size - math.ceil(self.test_fraction * size)

    @property
    def side(self) -> int:
        """The side of one image (1 for vectors, which count as 1x1 images)."""
        if self.image_size is not None:
            return self.image_size
        return {"digits": 8, "spiral": 1}.get(self.dataset) or self.options["size"]

    @property
    def depth(self) -> int:
        """Channels of one image (a vector's length for vectors)."""
        if self.channels is not None:
            return self.channels
        return {"digits": 1, "spiral": 2}.get(self.dataset) or self.options["channels"]

    @property
    def sample_dim(self) -> int:
        """The length of one flattened sample."""
        return self.depth * self.side**2


class AugmentSpec(Section):
    preset: str = "digits"

    @model_validator(mode="after")
    def _known_preset(self) -> AugmentSpec:
        if self.preset not in AUGMENT_PRESETS:
            raise ValueError(
                f"unknown augment.preset {self.preset!r}; known: {', '.join(AUGMENT_PRESETS)}"
            )
        return self


class TrainSpec(Section):
    epochs: Annotated[int, Field(gt=0, le=10_000)] = 30
    batch_size: Annotated[int, Field(gt=1, le=65_536)] = 256
    optimizer: Literal["sgd", "adam", "adamw", "lars"] = "adam"
    lr: Annotated[float, Field(gt=0, le=10)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 1e-6
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0
    log_every_steps: PositiveInt = 5
    # Autocast to bf16 or fp16 (fp16 with a gradient scaler); weights and optimizer stay fp32.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False  # NHWC memory layout for convolutional encoders
    compile: bool = False  # torch.compile the encoder
    sync_batchnorm: bool = False  # BatchNorm statistics over the global batch
    # Checkpoints kept while the job runs: N of them, the latest N or the N of lowest epoch
    # loss; the latest is kept either way (resume reads it).
    keep_checkpoints: Annotated[int, Field(ge=1, le=100)] = 2
    keep_by: Literal["latest", "lowest_loss"] = "latest"


class ResourcesSpec(Section):
    """``workers: 4`` is a fixed gang; ``workers: {min: 2, max: 8}`` an elastic one, kept as
    ``workers`` (the most) and ``min_workers``: admitted when ``min`` fits, with as many as
    fit up to ``max``; it shrinks (to no fewer than ``min``) when a node is lost, and grows
    again when capacity frees, each time resuming from its latest epoch checkpoint. The
    global batch stays ``train.batch_size`` at every size (each of n workers takes 1/n of
    it), so steps per epoch and the learning-rate schedule do not depend on the size."""

    workers: Annotated[int, Field(gt=0, le=1024)] = 2
    min_workers: Annotated[int, Field(gt=0, le=1024)] | None = None  # None: a fixed gang
    cpus_per_worker: Annotated[float, Field(gt=0, le=256)] = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0, le=16)] = 0.0
    # CPUs for the Ray Data tasks that read and decode a user's images, beside the gang's;
    # 1 by default for file:// and s3:// sources. Builtins are held in memory and use none.
    data_cpus: Annotated[float, Field(gt=0, le=1024)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _elastic_range(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("workers"), dict):
            bounds = data["workers"]
            if set(bounds) != {"min", "max"}:
                raise ValueError("an elastic gang is workers: {min: N, max: M}")
            data = {**data, "workers": bounds["max"], "min_workers": bounds["min"]}
        return data

    @property
    def sizes(self) -> range:
        """The numbers of workers the gang may run with."""
        return range(self.min_workers or self.workers, self.workers + 1)


LabelFraction = Annotated[float, Field(gt=0, lt=1)]
EvaluationSeed = Annotated[int, Field(ge=0, lt=2**31)]


class EvaluateSpec(Section):
    """Which downstream protocols run on the held-out split (all on frozen features except
    semi-supervised fine-tuning), and the baselines beside them on the same split."""

    # Labelled images in class subfolders (file:// or s3://) to evaluate on, split by
    # data.test_fraction and data.split_seed; unset: the source itself, when its images sit
    # in class subfolders (the held-out part was never seen by pretraining).
    data: str | None = None
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

    @field_validator("data")
    @classmethod
    def _image_folder(cls, uri: str | None) -> str | None:
        if uri is not None:
            ImageSource.parse(uri)  # its ValueError names what is wrong with the URI
        return uri

    @field_validator("label_fractions", "seeds")
    @classmethod
    def _distinct(cls, values: list) -> list:
        if len(set(values)) != len(values):
            raise ValueError(f"repeated values in {values}")
        return values


class RegisterSpec(Section):
    model: Annotated[str, Field(pattern=_NAME_PATTERN)]
    alias: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")] = "candidate"


class JobSpec(Section):
    name: Annotated[str, Field(pattern=_NAME_PATTERN)]
    method: MethodSection
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
    # Jobs that must have SUCCEEDED before this one is admitted; if one fails or is
    # cancelled, this one fails with the reason.
    depends_on: Annotated[
        list[Annotated[str, Field(pattern=JOB_ID_PATTERN)]], Field(max_length=32)
    ] = []

    @field_validator("depends_on")
    @classmethod
    def _distinct_dependencies(cls, ids: list[str]) -> list[str]:
        if len(set(ids)) != len(ids):
            raise ValueError("lists a job twice")
        return ids

    @model_validator(mode="after")
    def _resolve_user_data(self) -> JobSpec:
        """What a user's images need beside the spec's data section: CPUs to decode them on.
        An evaluation set of images applies to a user's images only: a builtin's encoder
        takes the builtin's own shape."""
        if self.data.is_user_data:
            self.resources.data_cpus = self.resources.data_cpus or 1.0
            return self
        for section, name in (("resources", "data_cpus"), ("evaluate", "data")):
            if getattr(getattr(self, section), name) is not None:
                raise ValueError(
                    f"{section}.{name} applies to file:// and s3:// sources, not {self.data.source}"
                )
        return self

    @model_validator(mode="after")
    def _resolve_encoder(self) -> JobSpec:
        """Fill in what the encoder's defaults mean for this data (the ResNet stem, the ViT
        patch), so that MLflow's params and the config hash say what actually trains."""
        resolved = self.encoder.config(self.data.depth, self.data.side)
        if "stem" in resolved:
            self.encoder.stem = resolved["stem"]
        if "patch_size" in resolved:
            self.encoder.patch_size = resolved["patch_size"]
        return self

    def _document(self, exclude: set[str]) -> dict[str, Any]:
        """The spec as JSON without the fields that do not apply to it (a builtin's unset
        image fields, say), so that adding a field for other sources changes no hash."""
        document = self.model_dump(mode="json", exclude=exclude)
        for name in USER_DATA_FIELDS:
            if document["data"][name] is None:  # unset: the hash of older specs stands
                document["data"].pop(name)
        for section, name in (
            ("resources", "data_cpus"),
            ("resources", "min_workers"),
            ("evaluate", "data"),
        ):
            if section in document and document[section][name] is None:
                document[section].pop(name)
        return document

    def config_hash(self) -> str:
        """A stable hash of everything that shapes the result (not priority, retries or
        dependencies, nor the CPUs that decode the data)."""
        shaping = self._document({"priority", "max_retries", "registration", "depends_on"})
        shaping["resources"].pop("data_cpus", None)
        for kept in ("keep_checkpoints", "keep_by"):  # what is kept on disk, not what trains
            shaping["train"].pop(kept)
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

        document = self._document(set())
        # Each source keeps its options under its own name, unset (None) unless written: log
        # the chosen source's options with their defaults filled in, and no other source's.
        data = document["data"]
        for source in SOURCE_OPTIONS:
            data.pop(source)
        if self.data.options:
            data[self.data.dataset] = self.data.options
        # The stem and the patch size are logged for the archs they apply to only.
        applies = self.encoder.config(self.data.depth, self.data.side)
        for key in ("stem", "patch_size"):
            if key not in applies:
                document["encoder"].pop(key)
        walk("", document)
        return flat


def _cross_field_problems(spec: JobSpec) -> Problems:
    problems: Problems = []
    resources, batch = spec.resources, spec.train.batch_size
    if resources.min_workers is not None and resources.min_workers > resources.workers:
        problems.append(("resources.workers", f"min {resources.min_workers} is above max"))
    elif undivided := [size for size in resources.sizes if batch % size]:
        what = (
            f"resources.workers ({resources.workers})"
            if resources.min_workers is None
            else f"{', '.join(map(str, undivided))} workers, sizes the elastic gang may take"
        )
        problems.append(
            (
                "train.batch_size",
                f"{batch} is not divisible by {what}: each worker takes an equal share of the "
                "global batch",
            )
        )
    elif len(resources.sizes) > 1 and spec.method.per_rank_state:
        problems.append(
            (
                "resources.workers",
                f"{spec.method.name} cannot be elastic: {spec.method.per_rank_state}",
            )
        )
    elif spec.train.batch_size // spec.resources.workers < 2:
        problems.append(("train.batch_size", "each worker needs at least 2 samples per step"))
    if spec.train.warmup_epochs >= spec.train.epochs and spec.train.warmup_epochs:
        problems.append(("train.warmup_epochs", "must be smaller than train.epochs"))
    vectors = _vector_problems(spec)
    return problems + vectors + _encoder_problems(spec, bool(vectors)) + spec.method.problems(spec)


def _encoder_problems(spec: JobSpec, on_vectors: bool) -> Problems:
    """The encoder against the method and the images: an arch the method cannot train, a ViT
    patch that does not tile the image."""
    method, encoder = spec.method, spec.encoder
    if method.encoder_archs and encoder.arch not in method.encoder_archs:
        known = ", ".join(method.encoder_archs)
        return [("encoder.arch", f"{method.name} trains {known}, not {encoder.arch!r}")]
    if on_vectors or not method.trains_encoder or not encoder.arch.startswith("vit"):
        return []
    side, patch = spec.data.side, encoder.config(spec.data.depth, spec.data.side)
    if side % patch["patch_size"]:
        return [
            (
                "encoder.patch_size",
                f"{patch['patch_size']} does not divide the {side}-pixel images of "
                f"{spec.data.source}",
            )
        ]
    return []


def _vector_problems(spec: JobSpec) -> Problems:
    """What cannot run on 2-D points (builtin:spiral): image-only methods, convolutional
    encoders and image augmentations. A method that needs images gets that one message only,
    since no encoder or preset would make it run."""
    if spec.data.dataset != "spiral":
        return []
    method, points = spec.method, f"{spec.data.source} holds 2-D points, not images"
    if method.needs_images:
        return [("data.source", f"{method.name} needs images ({method.needs_images}): {points}")]
    problems: Problems = []
    if spec.encoder.arch != "mlp" and method.trains_encoder:
        problems.append(
            ("encoder.arch", f"{spec.encoder.arch!r} is made for images: {points}; use mlp")
        )
    if spec.augment.preset != "none" and method.trains_on_views:
        problems.append(
            (
                "augment.preset",
                f"{spec.augment.preset!r} augments images: {points}; use none",
            )
        )
    return problems


def _field_path(location: tuple[int | str, ...]) -> str:
    # Pydantic puts the discriminator's tag into the location (method.simclr.temperature):
    # drop it so the path is the one the user wrote.
    parts = [str(part) for part in location]
    if len(parts) >= 2 and parts[0] == "method" and parts[1] in METHOD_PARAMS:
        parts.pop(1)
    return ".".join(parts) or "(spec)"


def _describe(error: dict[str, Any]) -> str:
    message = error["msg"]
    # "Value error, unknown ..." -> "unknown ...": the prefix says nothing to a user.
    return re.sub(r"^(Value|Assertion) error, ", "", message)


def validation_problems(error: ValidationError, prefix: str = "") -> Problems:
    """Pydantic's errors as (field path, message) pairs, the paths under ``prefix``."""
    return [(prefix + _field_path(item["loc"]), _describe(item)) for item in error.errors()]


def parse_spec(document: Any) -> JobSpec:
    """Validate an already-parsed YAML document; raise SpecError naming each bad field."""
    if not isinstance(document, dict):
        raise SpecError([("(spec)", "the spec must be a YAML mapping of sections")])
    if "sweep" in document:
        raise SpecError([("sweep", "a sweep is submitted with `selfsup sweep submit FILE`")])
    try:
        spec = JobSpec.model_validate(document)
    except ValidationError as error:
        raise SpecError(validation_problems(error)) from None
    problems = _cross_field_problems(spec)
    if problems:
        raise SpecError(problems)
    return spec


# libyaml's parser where PyYAML was built with it: a spec parses ~10x faster than in pure
# Python, which was most of a submit's time (benchmarks/bench_controller.py).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _SpecLoader(_SafeLoader):
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
    return parse_spec(read_spec_document(text))


def read_spec_document(text: str) -> Any:
    """YAML text -> Python values; a SpecError saying where the syntax is wrong."""
    try:
        return read_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecError([("(yaml)", f"not valid YAML{where}: {problem}")]) from None
    except (ValueError, RecursionError) as error:
        raise SpecError([("(yaml)", f"not valid YAML: {error}")]) from None


def apply_overrides(text: str, overrides: Sequence[str]) -> str:
    """The spec text with ``dotted.field=value`` assignments over it (`--set`): each value
    read as YAML (``1e-3``, ``true``, ``[0.1, 0.5]``), a missing section made. Comments do
    not survive a rewrite, so the text comes back unchanged when there is nothing to set.
    A malformed assignment, or one through a field that is not a section, is a SpecError."""
    if not overrides:
        return text
    document = read_spec_document(text)
    if not isinstance(document, dict):
        raise SpecError([("--set", "the spec is not a mapping of sections, so nothing can be set")])
    for assignment in overrides:
        path, equals, raw = assignment.partition("=")
        if not equals:
            raise SpecError([("--set", f"{assignment!r} is not FIELD.PATH=VALUE")])
        try:
            value = read_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise SpecError([("--set", f"{assignment!r}: the value is not valid YAML")]) from None
        set_field(document, path, value, "--set", repr(assignment))
    return yaml.safe_dump(document, sort_keys=False)


def set_field(document: dict, path: str, value: Any, where: str, what: str) -> None:
    """``document[a][b][c] = value`` for the path ``a.b.c``, missing sections made; a
    SpecError at ``where`` (the option or section that asked), about ``what``, if the path is
    malformed or runs through a value."""
    keys = path.strip().split(".")
    if not all(key.strip() for key in keys):
        raise SpecError([(where, f"{what}: {path!r} is not a dotted FIELD.PATH")])
    section = document
    for depth, key in enumerate(keys[:-1]):
        section = section.setdefault(key, {})
        if not isinstance(section, dict):
            raise SpecError(
                [(where, f"{what}: {'.'.join(keys[: depth + 1])} is a value, not a section")]
            )
    section[keys[-1]] = value


def check_listed(spec: JobSpec, count: int) -> None:
    """Record that a user's source holds ``count`` images, and raise SpecError for what the
    count rules out (a queue or a memory bank too large for the training set), the checks
    that parsing could not make before the source was listed."""
    spec.data.listed(count)
    problems = spec.method.problems(spec)
    if problems:
        raise SpecError(problems)
