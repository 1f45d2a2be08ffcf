"""The job spec: accepted and rejected specs, each error naming its field, and fuzzed input
that never escapes as anything but a SpecError."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.spec import SpecError, load_spec_text, parse_spec, read_yaml

EXAMPLE = Path(__file__).parent.parent / "examples" / "simclr-digits.yaml"


def example_document() -> dict:
    return read_yaml(EXAMPLE.read_text())


def problems_of(document: object) -> dict[str, str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(document)
    return dict(caught.value.problems)


def test_example_spec_is_valid_and_complete() -> None:
    spec = load_spec_text(EXAMPLE.read_text())
    assert spec.method.name == "simclr"
    assert spec.resources.workers == 2
    assert spec.train.lr == pytest.approx(2e-3)  # `2e-3` in YAML is a float, not a string
    assert spec.registration is not None and spec.registration.model == "simclr-digits"
    assert spec.model_dump(mode="json")["register"]["alias"] == "candidate"


def test_config_hash_ignores_scheduling_but_not_training() -> None:
    document = example_document()
    base = parse_spec(document).config_hash()
    assert parse_spec({**document, "priority": 5}).config_hash() == base
    changed = {**document, "train": {**document["train"], "lr": 0.5}}
    assert parse_spec(changed).config_hash() != base


@pytest.mark.parametrize(
    ("section", "key", "value", "field"),
    [
        ("train", "epoch", 3, "train.epoch"),  # unknown key (typo of `epochs`)
        ("train", "lr", -0.1, "train.lr"),
        ("train", "lr", "fast", "train.lr"),
        ("train", "epochs", 2.5, "train.epochs"),
        ("resources", "workers", 0, "resources.workers"),
        ("method", "name", "byol9000", "method"),  # no such method
        ("method", "temperature", 0, "method.temperature"),
        ("data", "source", "builtin:cifar10", "data"),
        ("data", "source", "ftp://host/x", "data"),
        ("augment", "preset", "heavy", "augment"),
        ("encoder", "arch", "resnet9000", "encoder"),
    ],
)
def test_bad_values_name_their_field(section: str, key: str, value: object, field: str) -> None:
    document = example_document()
    document[section] = {**document[section], key: value}
    problems = problems_of(document)
    assert field in problems, problems


def test_batch_size_must_split_evenly_across_workers() -> None:
    document = example_document()
    document["train"]["batch_size"] = 255
    problems = problems_of(document)
    assert "train.batch_size" in problems
    assert "divisible" in problems["train.batch_size"]


def test_an_elastic_gang_is_a_range_whose_every_size_splits_the_batch() -> None:
    document = example_document()
    document["resources"]["workers"] = {"min": 2, "max": 4}
    document["train"]["batch_size"] = 240
    spec = parse_spec(document)
    assert (spec.resources.workers, spec.resources.min_workers) == (4, 2)
    assert list(spec.resources.sizes) == [2, 3, 4]
    # The stored form reads back the same, and the range is part of what shapes the result.
    assert parse_spec(spec.model_dump(mode="json", by_alias=True)) == spec
    assert spec.config_hash() != parse_spec({**document, "resources": {"workers": 4}}).config_hash()

    document["train"]["batch_size"] = 256
    assert "not divisible by 3 workers" in problems_of(document)["train.batch_size"]
    document["resources"]["workers"] = {"min": 4, "max": 2}
    assert problems_of(document)["resources.workers"] == "min 4 is above max"
    document["resources"]["workers"] = {"min": 2}
    assert "workers: {min: N, max: M}" in problems_of(document)["resources"]
    persistent = example_document() | {"method": {"name": "rbm", "persistent": True}}
    persistent["augment"] = {"preset": "none"}
    persistent["resources"] = {"workers": {"min": 1, "max": 2}}
    assert "rbm cannot be elastic" in problems_of(persistent)["resources.workers"]


def test_missing_required_fields_and_unknown_sections() -> None:
    problems = problems_of({"method": {"name": "simclr"}, "trian": {}})
    assert "name" in problems
    assert "trian" in problems


@pytest.mark.parametrize(
    ("text", "field"),
    [("name: [unclosed", "(yaml)"), ("- a\n- b\n", "(spec)"), ("", "(spec)"), ("42", "(spec)")],
)
def test_not_a_spec_at_all(text: str, field: str) -> None:
    with pytest.raises(SpecError) as caught:
        load_spec_text(text)
    assert caught.value.problems[0][0] == field


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_fuzzed_text_never_escapes_as_another_exception(text: str) -> None:
    try:
        load_spec_text(text)
    except SpecError as error:
        assert error.problems and all(field and message for field, message in error.problems)


yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.text(max_size=20),
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(section=st.sampled_from(sorted(example_document())), value=yaml_values)
def test_fuzzed_sections_are_accepted_or_rejected_cleanly(section: str, value: object) -> None:
    document = example_document()
    document[section] = value
    text = yaml.safe_dump(document)
    try:
        spec = load_spec_text(text)
    except SpecError as error:
        assert error.problems
    else:
        assert spec.train.batch_size % spec.resources.workers == 0
