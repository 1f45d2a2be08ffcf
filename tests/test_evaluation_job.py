"""The evaluation job's spec: told apart from a pretraining spec by its kind, every field
checked with a clear message, and a config hash of what shapes its numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.evaluation_job import EvaluationJobSpec, load_job_text
from pipelines.spec import JobSpec, SpecError

EVALUATION = "kind: evaluate\nname: eval-a\nencoder: model-a@champion\n"


def problems(text: str) -> dict[str, str]:
    with pytest.raises(SpecError) as raised:
        load_job_text(text)
    return dict(raised.value.problems)


def test_the_kind_chooses_the_spec() -> None:
    evaluation = load_job_text(
        EVALUATION + "data: s3://bucket/labelled/\nprotocols: [linear, knn]\n"
    )
    assert isinstance(evaluation, EvaluationJobSpec)
    assert (evaluation.data, evaluation.protocols, evaluation.resources.cpus) == (
        "s3://bucket/labelled/",
        ["linear", "knn"],
        1.0,
    )
    pretraining = "name: p\nmethod: {name: pca, components: 4}\naugment: {preset: none}\n"
    assert isinstance(load_job_text(pretraining), JobSpec)
    assert isinstance(load_job_text("kind: pretrain\n" + pretraining), JobSpec)
    assert load_job_text(EVALUATION).model_dump(mode="json")["kind"] == "evaluate"


@pytest.mark.parametrize(
    ("extra", "field", "says"),
    [
        ("", "kind", "one of pretrain"),
        ("protocols: [knn, knn]\n", "protocols", "twice"),
        ("protocols: [probe]\n", "protocols.0", "'linear', 'knn' or 'semi'"),
        ("test_fraction: 1.5\n", "test_fraction", "less than 1"),
        ("method: {name: pca}\n", "method", "Extra inputs"),
    ],
)
def test_bad_fields_are_named(extra: str, field: str, says: str) -> None:
    text = (EVALUATION + extra) if field != "kind" else EVALUATION.replace("evaluate", "score")
    found = problems(text)
    assert field in found and says in found[field], found


def test_an_encoder_reference_names_an_alias_or_a_version() -> None:
    assert "encoder" in problems(EVALUATION.replace("model-a@champion", "model-a"))
    assert load_job_text(EVALUATION.replace("@champion", "/3")).encoder == "model-a/3"


def test_the_config_hash_ignores_scheduling() -> None:
    base = load_job_text(EVALUATION).config_hash()
    assert load_job_text(EVALUATION + "priority: 5\nresources: {cpus: 2}\n").config_hash() == base
    assert load_job_text(EVALUATION + "protocols: [knn]\n").config_hash() != base


def test_the_examples_parse() -> None:
    from pipelines.sweep import load_sweep_text

    examples = Path(__file__).parent.parent / "examples"
    evaluation = load_job_text(
        (examples / "evaluations" / "simclr-digits-champion.yaml").read_text()
    )
    assert isinstance(evaluation, EvaluationJobSpec) and evaluation.protocols == ["linear", "knn"]
    sweep = load_sweep_text((examples / "sweeps" / "simclr-digits-lr.yaml").read_text())
    assert len(sweep.trials) == 6 and sweep.sweep.promote == "best"
