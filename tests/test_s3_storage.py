"""Everything on S3 (moto's server on loopback, IAM checks on): a controller whose Ray Train
``storage_path`` and MLflow artifact root are S3 URIs runs PIRL on users' images streamed
from an S3 bucket by Ray Data: crops of bundled photographs at mixed sizes, grey, colour and
RGBA, with corrupt and truncated files among them, which are skipped and counted.

A Ray Train worker is killed mid-epoch: the restarted gang reads the latest checkpoint
(memory bank included) back from S3, gets new shards of the same stream and redoes the
interrupted epoch whole, so the step count goes on from the checkpoint's and ends where a
straight run ends. The job evaluates on the bucket's class folders; the registered
encoder's files and the run's pictures are on S3 and load from there; the S3 key is nowhere
a user or an operator reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipelines.sources import Catalog, ImageSource
from pipelines.user_data import catalog_labels
from service.config import StatePaths
from service.stack import ray_auth_env
from service.store import JobState
from tests.conftest import SELFSUP, SecondController, Stack
from tests.processes import find
from tests.s3 import S3Endpoint
from tests.train_loop_runs import assert_loads_and_reproduces
from tests.user_images import BROKEN, job_document
from workers.data import split_samples
from workers.train_loop import REFERENCE_FILE

STORE = "selfsup-store"  # the bucket the controller keeps checkpoints and artifacts in
MODEL = "test-pirl-s3"
EPOCHS = 6


def _ray_job_records(stack: Stack) -> str:
    """Every Ray job the stack's head knows, entrypoint and runtime env included, as text
    (read in a process of its own, which holds the head's token)."""
    script = (
        "import sys; from ray.job_submission import JobSubmissionClient; "
        "print(JobSubmissionClient(sys.argv[1]).list_jobs())"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, stack.info["dashboard_url"]],
        env={**stack.env, **ray_auth_env(StatePaths(stack.home))},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout


def checkpoint_keys(s3: S3Endpoint, job_id: str) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2")
    return [
        item["Key"]
        for page in pages.paginate(Bucket=STORE, Prefix=f"runs/{job_id}/checkpoint_")
        for item in page.get("Contents", [])
    ]


def wait_for_two_checkpoints(s3: S3Endpoint, controller: SecondController, job_id: str) -> None:
    """Until two checkpoints have their state on S3: a worker writes a checkpoint's files
    before Ray Train has registered it, and reports go one at a time, so the first is then
    registered and a restarted gang resumes from it."""
    deadline = time.monotonic() + 240
    while len({key.split("/")[2] for key in checkpoint_keys(s3, job_id) if "/state.pt" in key}) < 2:
        job = controller.api.request("GET", f"/v1/jobs/{job_id}")
        assert not JobState(job["state"]).is_final, job["message"]
        assert time.monotonic() < deadline, ("no two checkpoints appeared on S3", job)
        time.sleep(0.3)


def test_pirl_on_s3_resumes_a_killed_worker_from_its_checkpoint_on_s3(
    stack: Stack, s3: S3Endpoint, bucket: str, tmp_path: Path
) -> None:
    s3.client().create_bucket(Bucket=STORE)
    on_s3 = {"storage_path": f"s3://{STORE}/runs", "artifact_root": f"s3://{STORE}/mlflow"}
    method = {"name": "pirl", "num_negatives": 64, "projection_dim": 32, "hidden_dim": 64}
    document = job_document(MODEL, method, bucket, max_bad_fraction=0.1)
    document["train"]["epochs"] = EPOCHS
    # A linear probe on the bucket's class folders: its pictures go to the run's artifacts.
    document["evaluate"] |= {"knn": False}
    spec = tmp_path / "pirl-s3.yaml"
    spec.write_text(json.dumps(document))

    with stack.second_controller(tmp_path, **on_s3) as controller:
        submitted = stack.run_cli(controller.env, "job", "submit", str(spec), "-o", "json")
        job_id = json.loads(submitted.stdout)["id"]
        # `job logs -f` follows the job from the start, through the kill, to its end.
        follower = subprocess.Popen(
            [SELFSUP, "job", "logs", job_id, "-f"],
            env=controller.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        wait_for_two_checkpoints(s3, controller, job_id)
        workers = find(stack.info["head_pid"], "RayTrainWorker")
        assert workers, "no Ray Train worker process found under the Ray head"
        os.kill(workers[0], signal.SIGKILL)  # Ray Train restarts the gang from the checkpoint
        job = controller.wait_for(job_id, ("SUCCEEDED", "FAILED", "CANCELLED"), timeout=480)
        followed, _ = follower.communicate(timeout=60)  # it ends by itself once the job has
        logs = stack.run_cli(controller.env, "job", "logs", job_id).stdout

    assert job["state"] == "SUCCEEDED", job["message"]
    assert job["attempts"] == 1  # the gang restarted inside the run: no retry of the job
    assert follower.returncode == 0 and f'"job_id": "{job_id}"' in followed  # the driver's end
    tracking_uri = controller.settings["tracking_uri"]
    client = MlflowClient(tracking_uri)
    run = client.get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    (resume,) = client.get_metric_history(run.info.run_id, "train.resumed_from_epoch")
    catalog = Catalog.list(ImageSource.parse(bucket))
    train = split_samples(len(catalog.keys), catalog_labels(catalog), 0.25, 0).train
    steps_per_epoch = len(train) // 2 // 32  # 2 ranks, 32 images each a step
    assert resume.step == (int(resume.value) + 1) * steps_per_epoch
    steps = client.get_metric_history(run.info.run_id, "train.step")
    assert max(m.step for m in steps) == EPOCHS * steps_per_epoch
    # Unreadable files are counted once each, however often the redone epoch met them.
    broken_in_training = {catalog.keys[i] for i in train} & BROKEN.keys()
    assert run.data.metrics["data.bad_samples"] == len(broken_in_training)
    assert f"skipped {len(broken_in_training)} unreadable images" in logs
    assert any(key in logs for key in broken_in_training)
    assert run.data.metrics["eval.linear.top1"] > 0.5  # on the bucket's class folders

    # Nothing of the job on the head's disk: checkpoints, pictures and the encoder are on S3.
    assert not (tmp_path / "runs").exists() and not (tmp_path / "artifacts").exists()
    assert run.info.artifact_uri.startswith(f"s3://{STORE}/mlflow/")
    logged = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "eval")}
    assert "eval/split.json" in logged and any(path.endswith(".png") for path in logged), logged
    stored = [item["Key"] for item in s3.client().list_objects_v2(Bucket=STORE)["Contents"]]
    assert any(key.endswith(".safetensors") for key in stored), stored  # the encoder's weights
    (reference,) = [key for key in checkpoint_keys(s3, job_id) if key.endswith(REFERENCE_FILE)]
    final = tmp_path / "final"
    final.mkdir()
    s3.client().download_file(STORE, reference, str(final / REFERENCE_FILE))
    assert_loads_and_reproduces(MODEL, tracking_uri, final)

    # The S3 key is nowhere a user or an operator reads: params, tags, logs, stored spec,
    # the Ray job's entrypoint and runtime environment.
    secret = s3.secret_key
    assert all(secret not in value for value in run.data.params.values())
    assert all(secret not in value for value in run.data.tags.values())
    assert secret not in logs and secret not in json.dumps(job)
    ray_jobs = _ray_job_records(stack)
    assert job_id in ray_jobs and secret not in ray_jobs
