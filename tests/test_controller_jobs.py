"""The controller with real jobs on the real stack: admission in priority order with room for
one gang, a Ray Train worker killed mid-run on images streamed from S3, the controller itself
killed and restarted, a driver killed so that the controller retries the job from its
checkpoint, and the watchdog."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from pipelines.sources import Catalog, ImageSource
from pipelines.spec import read_yaml
from pipelines.user_data import catalog_labels
from service.client import ApiClient
from service.stack import _answers, _free_port
from service.store import JobState
from tests.conftest import SELFSUP, Stack
from tests.processes import command_line, find
from tests.user_images import BROKEN, job_document
from workers.data import split_samples

SPECS = Path(__file__).parent / "specs"
EXAMPLE = Path(__file__).parent.parent / "examples" / "simclr-digits.yaml"
STEPS_PER_EPOCH = 5  # 1347 training digits // global batch 256


def tiny_spec(tmp_path: Path, name: str, priority: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    text = (SPECS / "tiny-pca.yaml").read_text().replace("name: tiny-pca", f"name: {name}")
    path.write_text(text + f"priority: {priority}\n")
    return path


def training_spec(tmp_path: Path, name: str, epochs: int, max_retries: int = 0) -> Path:
    """SimCLR on digits with two workers, no evaluation: long enough to be interrupted."""
    document = read_yaml(EXAMPLE.read_text())
    document |= {"name": name, "max_retries": max_retries}
    document["train"]["epochs"] = epochs
    document["evaluate"] = {"linear": False, "knn": False, "label_fractions": [], "finetune": False}
    document.pop("register", None)
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(document))
    return path


def submit(stack: Stack, spec: Path) -> str:
    return json.loads(stack.cli("job", "submit", str(spec), "-o", "json", check=True).stdout)["id"]


def wait_for_checkpoints(
    stack: Stack, job_id: str, besides: frozenset[str] = frozenset(), timeout: float = 240
) -> None:
    """Until two checkpoints not named in ``besides`` are on disk: a worker writes a
    checkpoint's files before Ray Train has registered it, and reports go one at a time, so
    the first is then registered and a restart resumes from it. A job that ends meanwhile
    fails the wait at once, with its own account of why."""
    deadline = time.monotonic() + timeout
    runs = stack.home / "runs" / job_id
    while len({path.parent.name for path in runs.glob("checkpoint_*/state.pt")} - besides) < 2:
        job = stack.admin.request("GET", f"/v1/jobs/{job_id}")
        assert not JobState(job["state"]).is_final, (job["message"], transitions(stack, job_id))
        assert time.monotonic() < deadline, ("no two new checkpoints appeared", job)
        time.sleep(0.3)


def transitions(stack: Stack, job_id: str) -> list[dict]:
    return stack.admin.request("GET", f"/v1/jobs/{job_id}/transitions")


def test_one_gang_at_a_time_in_priority_order(stack: Stack, tmp_path: Path) -> None:
    # Each job needs both CPUs of the stack: only one can run at a time.
    with stack.paused():
        ids = {p: submit(stack, tiny_spec(tmp_path, f"prio-{p}", p)) for p in (0, 5, 10)}
    for priority in (10, 5, 0):
        job = stack.wait_for(ids[priority], ("RUNNING",), timeout=120)
        assert job["started"] is not None
        for other in (p for p in ids if p < priority):
            waiting = stack.admin.request("GET", f"/v1/jobs/{ids[other]}")
            assert waiting["state"] == "QUEUED", waiting  # never a partial gang beside it
            assert "capacity" in waiting["waiting"], waiting["waiting"]
        # Cancelling frees the cluster for the next one; the job's work is not the point here.
        stack.cli("job", "cancel", ids[priority], check=True)
    starts = {
        p: next(t["at"] for t in transitions(stack, ids[p]) if t["to"] == "STARTING") for p in ids
    }
    assert starts[10] < starts[5] < starts[0]


def s3_training_spec(tmp_path: Path, bucket: str, name: str, epochs: int) -> Path:
    """SimCLR on the users' images in the test bucket (tests/user_images.py), no evaluation."""
    method = {"name": "simclr", "temperature": 0.2, "projection_dim": 32, "hidden_dim": 64}
    document = job_document(name, method, bucket, max_bad_fraction=0.1)
    document["train"]["epochs"] = epochs
    document["evaluate"] = {"linear": False, "knn": False, "label_fractions": [], "finetune": False}
    document.pop("register")
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(document))
    return path


def test_job_survives_a_killed_worker_and_a_killed_controller(
    stack: Stack, bucket: str, tmp_path: Path
) -> None:
    """On users' images streamed from S3 by Ray Data: the restarted gang gets new shards of
    the same stream and redoes the interrupted epoch whole from the latest checkpoint, so
    the step count goes on from the checkpoint's and ends where a straight run ends."""
    epochs = 6
    job_id = submit(stack, s3_training_spec(tmp_path, bucket, "chaos-s3", epochs))
    # `job logs -f` follows the job from the start, through both kills, to its end.
    follower = subprocess.Popen(
        [SELFSUP, "job", "logs", job_id, "-f"], env=stack.env, stdout=subprocess.PIPE, text=True
    )
    wait_for_checkpoints(stack, job_id)
    head = stack.info["head_pid"]
    workers = find(head, "RayTrainWorker")
    assert workers, "no Ray Train worker process found under the Ray head"
    os.kill(workers[0], signal.SIGKILL)  # Ray Train restarts the gang from the checkpoint

    os.kill(stack.info["server_pid"], signal.SIGKILL)  # the controller dies mid-job
    time.sleep(1)
    stack.cli("up", check=True)  # brings back the controller alone, beside Ray and the job
    job = stack.wait_for(job_id, ("SUCCEEDED", "FAILED", "CANCELLED"), timeout=480)
    assert job["state"] == "SUCCEEDED", job["message"]
    assert job["attempts"] == 1  # handed to Ray once: the job ran once, never twice
    assert [t["to"] for t in transitions(stack, job_id)] == [
        "QUEUED",
        "STARTING",
        "RUNNING",
        "SUCCEEDED",
    ]
    client = MlflowClient(stack.tracking_uri)
    run = client.get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    (resume,) = client.get_metric_history(run.info.run_id, "train.resumed_from_epoch")
    catalog = Catalog.list(ImageSource.parse(bucket))
    train = split_samples(len(catalog.keys), catalog_labels(catalog), 0.25, 0).train
    steps_per_epoch = len(train) // 2 // 32  # 2 ranks, 32 images each a step
    assert resume.step == (int(resume.value) + 1) * steps_per_epoch
    steps = client.get_metric_history(run.info.run_id, "train.step")
    assert max(m.step for m in steps) == epochs * steps_per_epoch
    # Unreadable files are counted once each, however often the redone epoch met them.
    broken_in_training = {catalog.keys[i] for i in train} & BROKEN.keys()
    assert run.data.metrics["data.bad_samples"] == len(broken_in_training)
    followed, _ = follower.communicate(timeout=60)  # it ends by itself once the job has
    assert follower.returncode == 0
    assert f'"job_id": "{job_id}"' in followed  # the driver's last words


def test_cancel_retry_and_a_killed_driver_all_resume_from_checkpoints(
    stack: Stack, tmp_path: Path
) -> None:
    """One job, interrupted twice: the user cancels and retries it, then its driver is killed
    and the controller retries it. Each time it resumes from its latest checkpoint under the
    same id and MLflow run, and its steps continue where they stopped."""
    # An epoch takes about a second: each interruption must land well before the last one,
    # however slowly the test's own requests go on a loaded machine.
    epochs = 20
    job_id = submit(stack, training_spec(tmp_path, "resume-digits", epochs, max_retries=1))
    runs = stack.home / "runs" / job_id
    wait_for_checkpoints(stack, job_id)

    # Straight through the API (the CLI's own client): a CLI process would start too slowly.
    cancelled = stack.admin.request("POST", f"/v1/jobs/{job_id}/cancel")  # keeps the rest
    assert cancelled["state"] == "CANCELLED"
    run_id = cancelled["mlflow_run_id"]
    client = MlflowClient(stack.tracking_uri)
    assert client.get_run(run_id).info.status == "KILLED"
    before_retry = frozenset(path.name for path in runs.glob("checkpoint_*"))
    assert before_retry

    stack.cli("job", "retry", job_id, check=True)
    wait_for_checkpoints(stack, job_id, besides=before_retry)
    # The driver's python, not the shell Ray Jobs runs the entrypoint through.
    (driver,) = [
        pid
        for pid in find(stack.info["head_pid"], "pipelines.driver")
        if not command_line(pid).startswith("/bin/sh")
    ]
    os.kill(driver, signal.SIGKILL)  # not the user's fault: the controller retries

    job = stack.wait_for(job_id, ("SUCCEEDED", "FAILED", "CANCELLED"), timeout=480)
    assert job["state"] == "SUCCEEDED", job["message"]
    assert job["attempts"] == 3 and job["retries"] == 1
    history = transitions(stack, job_id)
    moves = [(t["from"], t["to"]) for t in history]
    assert moves == [
        (None, "QUEUED"),
        ("QUEUED", "STARTING"),
        ("STARTING", "RUNNING"),
        ("RUNNING", "CANCELLED"),  # the user
        ("CANCELLED", "QUEUED"),  # the user's retry
        ("QUEUED", "STARTING"),
        ("STARTING", "RUNNING"),
        ("RUNNING", "RETRYING"),  # the killed driver
        ("RETRYING", "QUEUED"),  # after the backoff
        ("QUEUED", "STARTING"),
        ("STARTING", "RUNNING"),
        ("RUNNING", "SUCCEEDED"),
    ]
    assert "retry 1 of 1" in history[7]["reason"] and history[7]["actor"] == "controller"

    resumes = client.get_metric_history(run_id, "train.resumed_from_epoch")
    assert len(resumes) == 2 and resumes[0].value < resumes[1].value < epochs - 1
    for resume in resumes:  # logged at the checkpoint's step count, not from zero
        assert resume.step == (int(resume.value) + 1) * STEPS_PER_EPOCH
    assert max(m.step for m in client.get_metric_history(run_id, "train.step")) == (
        epochs * STEPS_PER_EPOCH
    )
    assert client.get_run(run_id).info.status == "FINISHED"


def test_watchdog_fails_a_job_whose_progress_stalls(stack: Stack, tmp_path: Path) -> None:
    """A second controller, `selfsup server` with its own store and MLflow, on the same Ray
    cluster, with a 2-second watchdog: no job takes its first step that fast."""
    settings = yaml.safe_load((stack.home / "server.yaml").read_text())
    port = _free_port()
    settings |= {
        "port": port,
        "store_url": f"sqlite:///{tmp_path / 'jobs.db'}",
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "artifact_root": str(tmp_path / "artifacts"),
        "storage_path": str(tmp_path / "runs"),
        "watchdog_s": 2.0,
        "tick_s": 0.5,
    }
    config = tmp_path / "server.yaml"
    config.write_text(yaml.safe_dump(settings))
    token = stack.cli("token", "create", "dana", "--store-url", settings["store_url"], check=True)
    env = {**stack.env, "SELFSUP_API_URL": f"http://127.0.0.1:{port}"}
    env["SELFSUP_TOKEN"] = token.stdout.strip()
    server = subprocess.Popen(
        [SELFSUP, "server", "--config", str(config)],
        env=stack.env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "server.log").open("w"),
    )
    try:
        api = ApiClient(env["SELFSUP_API_URL"], env["SELFSUP_TOKEN"])
        deadline = time.monotonic() + 60
        while not _answers(f"{api.url}/healthz"):
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        spec = training_spec(tmp_path, "stalled", epochs=50)
        submitted = stack.run_cli(env, "job", "submit", str(spec), "-o", "json")
        job_id = json.loads(submitted.stdout)["id"]
        deadline = time.monotonic() + 120
        while (job := api.request("GET", f"/v1/jobs/{job_id}"))["state"] not in ("FAILED",):
            assert time.monotonic() < deadline and job["state"] != "SUCCEEDED", job
            time.sleep(0.5)
        assert "no training progress for 2 s (watchdog)" in job["message"]
        failed = stack.run_cli(env, "job", "status", job_id)
        assert failed.returncode == 0 and "watchdog" in failed.stdout
    finally:
        server.terminate()
        server.wait(timeout=60)
