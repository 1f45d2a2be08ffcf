"""A job's driver, run by Ray Jobs on the head node: pretrain -> evaluate -> register.

Usage: python -m pipelines.driver JOB_FILE   (JOB_FILE is written by the controller)
It reports back only through MLflow (metrics, tags, run status) and its exit code, so it
never depends on the controller that started it.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from pathlib import Path

import mlflow
import ray
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient

from pipelines import tags
from pipelines.evaluate import evaluate_linear
from pipelines.pretrain import TRAIN_RUNTIME_ENV, pretrain
from pipelines.registry import register_encoder
from pipelines.spec import JobSpec, parse_spec
from workers.data import load_dataset, split_indices
from workers.export import load_encoder_dir
from workers.train_loop import ENCODER_DIR


def _concise(error: BaseException) -> str:
    """The innermost message a user can act on, not a page of Ray traceback."""
    cause: BaseException = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:2000]


def run_job(job: dict) -> dict[str, float | str]:
    spec: JobSpec = parse_spec(job["spec"])
    client = MlflowClient(tracking_uri=job["tracking_uri"], registry_uri=job["tracking_uri"])
    run_id, job_id = job["run_id"], job["job_id"]

    checkpoint = pretrain(spec, job_id, run_id, job["tracking_uri"], Path(job["storage_path"]))
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(checkpoint.to_directory(str(Path(scratch) / "final")))
        encoder_dir = local / ENCODER_DIR
        encoder = load_encoder_dir(encoder_dir)

        dataset = load_dataset(spec.data.source)
        split = split_indices(dataset.labels, spec.data.test_fraction, spec.data.split_seed)
        metrics: dict[str, float] = {}
        if spec.evaluate.linear:
            metrics = evaluate_linear(encoder, encoder.config, dataset, split, spec.train.seed)
        client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])

        summary: dict[str, float | str] = dict(metrics)
        if spec.registration:
            version_tags = {
                tags.JOB_ID: job_id,
                "selfsup.method": spec.method.name,
                "selfsup.dataset": spec.data.source,
                "selfsup.config_hash": spec.config_hash(),
                **{key: f"{value:.4f}" for key, value in metrics.items()},
            }
            description = (
                f"{spec.method.name} on {spec.data.source}, {spec.train.epochs} epochs, "
                f"global batch {spec.train.batch_size}, {spec.resources.workers} workers; "
                f"job {job_id}"
            )
            version = register_encoder(
                job["tracking_uri"],
                run_id,
                encoder_dir,
                spec.registration.model,
                spec.registration.alias,
                version_tags,
                description,
            )
            for key, value in (
                (tags.MODEL_NAME, spec.registration.model),
                (tags.MODEL_VERSION, version),
                (tags.MODEL_ALIAS, spec.registration.alias),
            ):
                client.set_tag(run_id, key, value)
            summary["model"] = (
                f"{spec.registration.model}@{spec.registration.alias} (version {version})"
            )
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED))
    return summary


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m pipelines.driver JOB_FILE", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[1]).read_text())
    mlflow.set_tracking_uri(job["tracking_uri"])
    ray.init(runtime_env=TRAIN_RUNTIME_ENV)  # joins the cluster that runs this Ray Job
    try:
        summary = run_job(job)
    except Exception as error:  # noqa: BLE001 - the job fails, with its reason recorded
        traceback.print_exc()
        client = MlflowClient(tracking_uri=job["tracking_uri"])
        client.set_tag(job["run_id"], tags.ERROR, _concise(error))
        client.set_terminated(job["run_id"], status=RunStatus.to_string(RunStatus.FAILED))
        return 1
    print(json.dumps({"job_id": job["job_id"], **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
