"""Run example specs through the job driver's own path, for docs/results-latent.md:
``pipelines.driver.run_job`` (Ray Train on the spec's workers -> MLflow run -> evaluation ->
Model Registry) on a Ray started in this process with its own temporary folder.

Why not ``selfsup job submit``: on a machine where several Ray clusters come and go, a Ray
Job's driver finds its cluster through /tmp/ray/ray_current_cluster, which the most recently
started cluster overwrites, so jobs of one stack can connect to another's (dead) cluster.
A private ``_temp_dir`` here keeps the runs reproducible; the controller is the only part of
the path skipped.

    .venv/bin/python -m benchmarks.latent_jobs --tracking-uri sqlite:////tmp/latent/mlflow.db \\
        --storage /tmp/latent/runs examples/kmeans-digits.yaml [more specs ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import traceback
import uuid
from pathlib import Path

import mlflow
import ray
from mlflow.tracking import MlflowClient

from pipelines.driver import run_job
from pipelines.pretrain import TRAIN_RUNTIME_ENV
from pipelines.spec import load_spec_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", type=Path)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--storage", type=Path, required=True)
    args = parser.parse_args()
    mlflow.set_tracking_uri(args.tracking_uri)
    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name("latent-results") or client.get_experiment(
        client.create_experiment("latent-results")
    )
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="rl", dir="/tmp"),
        runtime_env=TRAIN_RUNTIME_ENV,
    )
    for path in args.specs:
        spec = load_spec_text(path.read_text())
        job_id = f"job-{uuid.uuid4().hex[:10]}"
        run = client.create_run(experiment.experiment_id, run_name=job_id)
        for key, value in spec.flat_params().items():
            client.log_param(run.info.run_id, key, value)
        job = {
            "spec": spec.model_dump(mode="json", by_alias=True),
            "tracking_uri": args.tracking_uri,
            "run_id": run.info.run_id,
            "job_id": job_id,
            "storage_path": str(args.storage),
        }
        try:
            summary = run_job(job)
        except Exception:  # noqa: BLE001 - one failed spec must not stop the others
            traceback.print_exc()
            client.set_terminated(run.info.run_id, status="FAILED")
            continue
        print(json.dumps({"spec": str(path), "job_id": job_id, **summary}), flush=True)


if __name__ == "__main__":
    main()
