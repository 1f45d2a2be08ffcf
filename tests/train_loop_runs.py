"""Jobs that run the real ``train_loop_per_worker`` on 2 gloo ranks inside the Ray Train run
shared with the other distributed tests (tests/latent_ranks.py), each logging into its own
MLflow run, and the checks that their encoders load and reproduce what training recorded.
A full job (CLI -> controller -> Ray Job) costs ~30-40 s of start-up on 2 cores; a train
loop here costs only its training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import ray.train
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import selfsup
from pipelines.registry import register_encoder
from pipelines.spec import parse_spec
from pipelines.user_data import prepare_user_data
from tests.latent_ranks import WithDatasets, part_results, register_part
from workers.train_loop import ENCODER_DIR, REFERENCE_FILE, train_loop_per_worker

Runs = dict[str, tuple[str, str, Path]]  # method -> (tracking URI, MLflow run id, checkpoint)


def train_one_after_another(
    jobs: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[str | None]]:
    """On each rank: the train loop for every job in turn. Returns the jobs and each one's
    final checkpoint folder (rank 0; None on the others)."""
    from ray.train.v2._internal.execution.context import get_train_context

    folders = []
    for job in jobs:
        train_loop_per_worker(job)
        checkpoint = ray.train.get_checkpoint()  # the last one this rank reported, if any
        folders.append(checkpoint.path if checkpoint else None)
        # Ray Train hands that checkpoint to get_checkpoint() from now on, which would make
        # the next job resume this one: each job here starts fresh, as a new run would.
        get_train_context().checkpoint = None
    return jobs, folders


def train_loop_jobs(folder: Path, documents: dict[str, dict]) -> WithDatasets:
    """The train loop's config for each spec document, each with its own MLflow run in a
    SQLite store under ``folder`` that the workers on this machine reach too. A user's
    images are prepared as the driver prepares them, their stream named after the job."""
    folder.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("jobs", artifact_location=str(folder / "artifacts"))
    jobs, datasets = [], {}
    for method, document in documents.items():
        spec = parse_spec(document)
        job = {
            "spec": spec,
            "run_id": client.create_run(experiment, run_name=method).info.run_id,
            "tracking_uri": tracking_uri,
            "method": method,  # the table's key; the train loop reads the others
        }
        if spec.data.is_user_data:
            user_data = prepare_user_data(spec)
            job["images"] = replace(user_data.images, dataset=f"train-{method}")
            datasets[f"train-{method}"] = user_data.stream
        jobs.append(job)
    return WithDatasets(jobs, datasets)


def register_train_loops(part: str, documents: Callable[[], dict[str, dict]]) -> None:
    """Run the train loop of every ``documents()`` spec (method -> document) as part
    ``part`` of the shared Ray Train run."""
    register_part(
        part, train_one_after_another, lambda folder: train_loop_jobs(folder, documents())
    )


def register_and_assert_loads(runs: Runs, method: str, model: str) -> None:
    """Register the encoder that ``method``'s train loop finished with as ``model`` and check
    that it loads and reproduces its recorded features."""
    tracking_uri, run_id, checkpoint = runs[method]
    register_encoder(tracking_uri, run_id, checkpoint / ENCODER_DIR, model, "candidate", {}, "test")
    assert_loads_and_reproduces(model, tracking_uri, checkpoint)


def train_loop_runs(part: str, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """What part ``part`` trained: method -> (tracking URI, run id, final checkpoint)."""
    jobs, folders = part_results(part, tmp_path_factory)[0]  # rank 0
    return {
        job["method"]: (job["tracking_uri"], job["run_id"], Path(folder))
        for job, folder in zip(jobs, folders, strict=True)
    }


def assert_loads_and_reproduces(
    model: str, tracking_uri: str | None, checkpoint: Path, folder: Path | None = None
) -> None:
    """``selfsup.load_encoder`` gives, in eval mode, the features the final checkpoint
    recorded for its reference images: from the registry (``model@candidate``), or from
    ``folder`` when given (what ``selfsup encoder get`` wrote)."""
    uri = str(folder) if folder else f"models:/{model}@candidate"
    encoder = selfsup.load_encoder(uri, tracking_uri=tracking_uri)
    assert not encoder.training
    reference = load_file(str(checkpoint / REFERENCE_FILE))
    with torch.no_grad():
        features = encoder(reference["images"])
    torch.testing.assert_close(features, reference["features"], rtol=1e-5, atol=1e-5)
