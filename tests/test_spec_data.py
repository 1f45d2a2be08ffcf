"""The spec's data section: every option of the chosen source in the MLflow params, and specs
on 2-D points (builtin:spiral) accepted exactly when their method can train on them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import TypeAdapter

from pipelines.spec import (
    SOURCE_OPTIONS,
    JobSpec,
    MethodSection,
    SpecError,
    parse_spec,
)
from workers.data import load_data_section
from workers.methods import METHODS
from workers.step import build_training

BATCH = 64


def spec(method: str, data: dict[str, Any], arch: str = "mlp", preset: str = "none") -> JobSpec:
    return parse_spec(
        {
            "name": "data-test",
            "method": {"name": method},
            "encoder": {"arch": arch, "out_dim": 16},
            "data": data,
            "augment": {"preset": preset},
            "train": {"batch_size": BATCH},
        }
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"source": "builtin:patches"},
            {"size": "8", "count": "20000", "seed": "0", "whiten": "False"},
        ),
        (
            {"source": "builtin:patches", "patches": {"size": 12, "whiten": True}},
            {"size": "12", "count": "20000", "seed": "0", "whiten": "True"},
        ),
        ({"source": "builtin:spiral"}, {"count": "2000", "noise": "0.02", "seed": "0"}),
        ({"source": "builtin:spiral", "spiral": {"noise": 0.1}}, {"count": "2000", "noise": "0.1"}),
        ({"source": "builtin:digits"}, {}),
    ],
)
def test_params_hold_every_option_of_the_chosen_source(
    data: dict[str, Any], expected: dict[str, str]
) -> None:
    params = spec("kmeans", data).flat_params()
    dataset = data["source"].partition(":")[2]
    options = {
        key.removeprefix(f"data.{dataset}."): value
        for key, value in params.items()
        if key.startswith(f"data.{dataset}.")
    }
    assert expected.items() <= options.items()
    if dataset in SOURCE_OPTIONS:
        assert options.keys() == SOURCE_OPTIONS[dataset].model_fields.keys()
    data_params = {key: value for key, value in params.items() if key.startswith("data.")}
    assert "None" not in data_params.values(), data_params
    sections = {key.split(".")[1] for key in params if key.count(".") == 2}
    assert sections & set(SOURCE_OPTIONS) <= {dataset}  # no other source's options


@pytest.mark.parametrize("method", ["pirl", "conv_sparse_coding"])
def test_image_methods_on_points_get_one_message_naming_the_source(method: str) -> None:
    with pytest.raises(SpecError) as caught:
        spec(method, {"source": "builtin:spiral"})
    ((field, message),) = caught.value.problems
    assert field == "data.source"
    assert f"{method} needs images" in message and "builtin:spiral" in message


@pytest.mark.parametrize(
    ("arch", "preset", "field"),
    [("small-convnet", "none", "encoder.arch"), ("mlp", "digits", "augment.preset")],
)
def test_image_encoders_and_augmentations_on_points_name_their_field(
    arch: str, preset: str, field: str
) -> None:
    with pytest.raises(SpecError) as caught:
        spec("simclr", {"source": "builtin:spiral"}, arch, preset)
    ((problem, message),) = caught.value.problems
    assert problem == field and "2-D points" in message


pytestmark = pytest.mark.usefixtures("one_thread")


def one_step(job: dict[str, Any]) -> None:
    """Build the method as the train loop does and take one training step on the spiral."""
    # Each section validated, the checks across sections (what parse_spec adds) not: the
    # spec the workers would get had it been accepted.
    spec = JobSpec.model_validate({"name": "data", **job, "train": {"batch_size": BATCH}})
    dataset = load_data_section(spec.data.model_dump(mode="json"))
    shape = (dataset.in_channels, dataset.image_size)
    training = build_training(spec, shape, spec.data.train_size, 1, torch.device("cpu"))
    training.train_step(dataset.images[:BATCH], torch.arange(BATCH))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(
    ("arch", "preset"), [("mlp", "none"), ("small-convnet", "none"), ("mlp", "digits")]
)
def test_points_are_accepted_exactly_when_the_method_trains_on_them(
    method: str, arch: str, preset: str
) -> None:
    data = {"source": "builtin:spiral"}
    try:
        spec(method, data, arch, preset)
        accepted = True
    except SpecError:
        accepted = False
    # What the spec would have given the workers, rejected or not: the method's defaults.
    job = {
        "method": TypeAdapter(MethodSection).validate_python({"name": method}).model_dump(),
        "encoder": {"arch": arch, "out_dim": 16},
        "data": data,
        "augment": {"preset": preset},
    }
    try:
        one_step(job)
        error = None
    except Exception as raised:  # noqa: BLE001 - any failure at run time is the point
        error = raised
    assert accepted == (error is None), f"accepted={accepted}, run-time error={error!r}"


@pytest.mark.parametrize(
    "data",
    [
        {"source": "builtin:digits"},
        {"source": "builtin:patches", "patches": {"size": 8}},
        {"source": "file:///data/images", "image_size": 64},
        {"source": "s3://bucket/images/", "max_bad_fraction": 0.01},
    ],
)
def test_a_stored_spec_parses_again_to_the_same_spec(data: dict) -> None:
    """The controller stores ``model_dump`` (unset fields as null) and the driver parses it
    again: every source must survive the round trip unchanged."""
    spec = parse_spec({"name": "round-trip", "method": {"name": "simclr"}, "data": data})
    again = parse_spec(spec.model_dump(mode="json"))
    assert again == spec and again.config_hash() == spec.config_hash()
