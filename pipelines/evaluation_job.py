"""An evaluation job: a registered encoder evaluated on a labelled data source, queued and
admitted like a pretraining job (priority, depends_on, retries, logs), run by the driver as
`selfsup eval` runs on a laptop (pipelines/eval_run.py), into the job's own MLflow run.

    kind: evaluate
    name: simclr-on-bucket
    encoder: simclr-digits@champion      # NAME@ALIAS or NAME/VERSION
    data: s3://bucket/labelled/          # default: the dataset the version was trained on
    protocols: [linear, knn]             # and semi
    resources: {cpus: 1}                 # on the driver's node, no Train workers

Torch-free, like pipelines/spec.py: the controller parses these.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator

from pipelines.spec import (
    JOB_ID_PATTERN,
    JobSpec,
    Section,
    SpecError,
    parse_spec,
    read_spec_document,
    validation_problems,
)

KIND = "evaluate"
_REFERENCE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}(@[A-Za-z][A-Za-z0-9_-]{0,62}|/[0-9]{1,9})$"


class EvaluationResources(Section):
    cpus: Annotated[float, Field(gt=0, le=256)] = 1.0


class EvaluationJobSpec(Section):
    kind: Literal["evaluate"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
    encoder: Annotated[str, Field(pattern=_REFERENCE)]
    data: Annotated[str, Field(min_length=1)] | None = None
    protocols: Annotated[list[Literal["linear", "knn", "semi"]], Field(min_length=1)] = ["linear"]
    test_fraction: Annotated[float, Field(gt=0, lt=1)] | None = None
    split_seed: Annotated[int, Field(ge=0)] | None = None
    baselines: bool = True
    resources: EvaluationResources = EvaluationResources()
    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0
    max_retries: Annotated[int, Field(ge=0, le=100)] = 0
    depends_on: Annotated[
        list[Annotated[str, Field(pattern=JOB_ID_PATTERN)]], Field(max_length=32)
    ] = []

    @field_validator("protocols", "depends_on")
    @classmethod
    def _once_each(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError("lists an entry twice")
        return values

    def config_hash(self) -> str:
        """What shapes the numbers: the encoder, the data, the protocols and the split."""
        shaping = self.model_dump(
            mode="json", exclude={"priority", "max_retries", "depends_on", "resources"}
        )
        canonical = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


AnyJobSpec = JobSpec | EvaluationJobSpec


def parse_job(document: Any) -> AnyJobSpec:
    """A stored or submitted job document: an evaluation (``kind: evaluate``), else a
    pretraining spec (``kind: pretrain`` or no kind)."""
    if isinstance(document, dict) and document.get("kind") == KIND:
        try:
            return EvaluationJobSpec.model_validate(document)
        except ValidationError as error:
            raise SpecError(validation_problems(error)) from None
    if isinstance(document, dict) and document.get("kind") not in (None, "pretrain"):
        raise SpecError([("kind", "one of pretrain (the default), evaluate")])
    if isinstance(document, dict):
        document = {key: value for key, value in document.items() if key != "kind"}
    return parse_spec(document)


def load_job_text(text: str) -> AnyJobSpec:
    return parse_job(read_spec_document(text))
