"""The job spec: what a user writes in YAML, validated in full before anything is queued.

This module is torch-free on purpose: the control plane (service/) validates specs with it.
Every error names the field it is about, as a dotted path (``train.batch_size``).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

BUILTIN_DATASETS = ("digits",)
ENCODER_ARCHS = ("small-convnet",)
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


MethodParams = Annotated[SimCLRParams, Field(discriminator="name")]


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


class DataSpec(_Section):
    source: str = "builtin:digits"
    # Held out for evaluation, never seen by pretraining; the split is stratified and seeded.
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25
    split_seed: Annotated[int, Field(ge=0)] = 0

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
        return self

    @property
    def dataset(self) -> str:
        return self.source.partition(":")[2]


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


class EvaluateSpec(_Section):
    linear: bool = True


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

        walk("", self.model_dump(mode="json"))
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
    return problems


def _field_path(location: tuple[int | str, ...]) -> str:
    # Pydantic puts the discriminator's tag into the location (method.simclr.temperature):
    # drop it so the path is the one the user wrote.
    parts = [str(part) for part in location]
    if len(parts) >= 2 and parts[0] == "method" and parts[1] in {"simclr"}:
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
