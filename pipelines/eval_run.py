"""``selfsup eval``: evaluate a registered encoder, or a folder written by ``selfsup encoder
get``, on a labelled data source, as an MLflow run of its own that is linked to the
encoder's model version (run tags, and metrics logged against its logged model).

The split defaults to the one the version was evaluated on at registration (recorded in its
tags) whenever the data source is the same, so the numbers are comparable with the job's.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mlflow.entities import RunStatus
from pydantic import ValidationError
from torch import nn

from pipelines import tags
from pipelines.evaluate import Evaluation, evaluate_encoder, log_evaluation
from pipelines.registry import PROVENANCE_FILE, download_version
from pipelines.sources import source_problems
from pipelines.spec import DataSpec, EvaluateSpec
from pipelines.user_data import labelled_images
from service.registry import Registry, parse_reference
from service.tracking import Tracking
from workers.data import SampleDataset, Split, load_dataset, split_dataset
from workers.export import load_encoder_dir

PROTOCOLS = ("linear", "knn", "semi")


class EvaluationRequestError(Exception):
    """The request cannot be evaluated (no data source, no labels, a bad split)."""


@dataclass(frozen=True)
class EncoderSource:
    """An encoder and what is known of where it came from."""

    encoder: nn.Module
    label: str  # NAME/VERSION, or the folder it was loaded from
    name: str | None = None
    version: str | None = None
    model_id: str | None = None
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def open_encoder(text: str, tracking_uri: str) -> EncoderSource:
    """A folder (from ``selfsup encoder get``) if ``text`` is one, else a registry reference
    (``NAME@ALIAS``, ``NAME/VERSION``, ``models:/...``)."""
    folder = Path(text).expanduser()
    if folder.is_dir():
        encoder = load_encoder_dir(folder)
        provenance_file = folder / PROVENANCE_FILE
        provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
        return EncoderSource(
            encoder=encoder,
            label=str(folder.resolve()),
            name=provenance.get("name"),
            version=provenance.get("version"),
            run_id=provenance.get("run_id"),
            tags=provenance.get("tags", {}),
        )
    view = Registry(tracking_uri).resolve(parse_reference(text))
    with tempfile.TemporaryDirectory() as scratch:
        encoder = load_encoder_dir(download_version(view, tracking_uri, Path(scratch)))
    return EncoderSource(
        encoder=encoder,
        label=f"{view.name}/{view.version}",
        name=view.name,
        version=view.version,
        model_id=view.model_id,
        run_id=view.run_id,
        tags=view.tags,
    )


def _data_spec(
    source: EncoderSource, data: str | None, test_fraction: float | None, split_seed: int | None
) -> DataSpec:
    """The data source and split: as asked, else as recorded with the encoder's version."""
    data = data or source.tags.get("selfsup.dataset")
    if data is None:
        raise EvaluationRequestError(f"{source.label} records no dataset: pass --data SOURCE")
    recorded = data == source.tags.get("selfsup.dataset")
    if test_fraction is None and recorded and tags.SPLIT_TEST_FRACTION in source.tags:
        test_fraction = float(source.tags[tags.SPLIT_TEST_FRACTION])
    if split_seed is None and recorded and tags.SPLIT_SEED in source.tags:
        split_seed = int(source.tags[tags.SPLIT_SEED])
    chosen = {"source": data, "test_fraction": test_fraction, "split_seed": split_seed}
    try:
        return DataSpec.model_validate({k: v for k, v in chosen.items() if v is not None})
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'data'}: {item['msg']}"
            for item in error.errors()
        )
        raise EvaluationRequestError(f"invalid data or split: {problems}") from None


def _check_fits(source: EncoderSource, data: str, samples: torch.Tensor) -> None:
    """Fail before any run exists when the encoder cannot take this data's samples."""
    try:
        with torch.no_grad():
            source.encoder(samples)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise EvaluationRequestError(
            f"{source.label} ({source.encoder.config}) cannot encode {data} samples of shape "
            f"{tuple(samples.shape[1:])}: {first_line}"
        ) from None


def _input_shape(source: EncoderSource) -> tuple[int, int]:
    """(channels, side) the encoder takes: recorded with its version, else in its config."""
    shape = source.tags.get(tags.INPUT_SHAPE)
    if shape:
        channels, side, _ = (int(part) for part in shape.split("x"))
        return channels, side
    config = source.encoder.config
    return int(config["in_channels"]), int(config["image_size"])


def _labelled(source: EncoderSource, data_spec: DataSpec) -> tuple[SampleDataset, Split]:
    """The labelled data: a builtin, or a user's labelled images (class folders, or a shard
    set's labels) decoded to the encoder's input shape, as a job's ``evaluate.data`` is."""
    if data_spec.is_user_data:
        problems = source_problems(data_spec.source, "--data")
        if problems:
            raise EvaluationRequestError("; ".join(message for _, message in problems))
        channels, side = _input_shape(source)
        labelled = labelled_images(
            data_spec.source, side, channels, data_spec.test_fraction, data_spec.split_seed
        )
        if labelled is None:
            raise EvaluationRequestError(
                f"{data_spec.source} has no labels: its images are not all in first-level "
                "class folders (or its shards have no label column)"
            )
        return labelled
    dataset = load_dataset(data_spec.source)
    if dataset.labels is None:
        raise EvaluationRequestError(
            f"{data_spec.source} has no labels: linear, kNN and semi-supervised evaluation "
            "need a labelled data source"
        )
    return dataset, split_dataset(dataset, data_spec.test_fraction, data_spec.split_seed)


def evaluate_as_run(
    source: EncoderSource,
    tracking: Tracking,
    protocols: list[str],
    data: str | None = None,
    test_fraction: float | None = None,
    split_seed: int | None = None,
    baselines: bool = True,
    run_id: str | None = None,
) -> tuple[str, Evaluation]:
    """Evaluate ``source`` with ``protocols`` into a new run (or the given one: an evaluation
    job's); returns the run's id and the results."""
    data_spec = _data_spec(source, data, test_fraction, split_seed)
    dataset, split = _labelled(source, data_spec)
    _check_fits(source, data_spec.source, dataset.images[:2])
    spec = EvaluateSpec(
        linear="linear" in protocols,
        knn="knn" in protocols,
        label_fractions=EvaluateSpec().label_fractions if "semi" in protocols else [],
        baselines=baselines,
    )
    run_tags = {
        tags.RUN_KIND: "evaluation",
        "selfsup.encoder": source.label,
        "selfsup.dataset": data_spec.source,
        "selfsup.protocols": ",".join(protocols),
    }
    if source.name:
        run_tags |= {tags.MODEL_NAME: source.name, tags.MODEL_VERSION: str(source.version)}
    if source.run_id:
        run_tags["selfsup.encoder_run_id"] = source.run_id
    if run_id is None:
        run_name = f"eval-{source.name}-v{source.version}" if source.name else "eval-folder"
        run_id = tracking.create_evaluation_run(run_name, run_tags)
    else:
        for key, value in run_tags.items():
            tracking.client.set_tag(run_id, key, value)
    try:
        evaluation = evaluate_encoder(
            source.encoder,
            dataset,
            split,
            spec,
            int(source.tags.get(tags.TRAIN_SEED, 0)),
            data_spec.source,
            data_spec.test_fraction,
            data_spec.split_seed,
        )
        log_evaluation(tracking.client, run_id, evaluation, model_id=source.model_id)
    except BaseException as error:
        tracking.client.set_tag(run_id, tags.ERROR, f"{type(error).__name__}: {error}"[:2000])
        tracking.client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FAILED))
        raise
    tracking.client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED))
    return run_id, evaluation
