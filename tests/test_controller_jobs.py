"""The controller with real jobs on the real stack: admission in priority order with room for
one gang; one job cancelled and retried, its controller killed and restarted, its driver
killed so that the controller retries it from its checkpoint; a sweep of three trials, one of
them preempted by an evaluation job that depends on another; and the watchdog. (A Ray Train
worker node lost mid-run is in tests/test_production_stack.py, on S3 data and checkpoints.)"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.spec import read_yaml
from service.registry import Reference, Registry
from service.store import JobState
from tests.conftest import Stack
from tests.processes import command_line, find

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


def assert_a_waiting_job_gets_a_start_estimate(stack: Stack, tmp_path: Path) -> None:
    """A job that waits for the running one's CPUs is told when it should start, from the
    running job's epochs so far; it is cancelled again here."""
    spec = tiny_spec(tmp_path, "waits-behind", 0).read_text()
    waiting = stack.admin.request("POST", "/v1/jobs", {"spec": spec})
    deadline = time.monotonic() + 30
    while not (job := stack.admin.request("GET", f"/v1/jobs/{waiting['id']}"))["estimated_start"]:
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    estimate = datetime.fromisoformat(job["estimated_start"])
    now = datetime.now(UTC)
    assert now - timedelta(seconds=5) < estimate < now + timedelta(minutes=10), job
    assert "estimated to start at about" in job["waiting"] and job["state"] == "QUEUED"
    stack.admin.request("POST", f"/v1/jobs/{waiting['id']}/cancel")


def test_cancel_retry_a_killed_controller_and_driver_all_resume_from_checkpoints(
    stack: Stack, tmp_path: Path
) -> None:
    """One job, interrupted three times: the user cancels and retries it; the controller is
    killed mid-job and `selfsup up` brings it back alone, beside Ray and the running job; then
    the job's driver is killed and the controller retries it. Each retry resumes from the
    latest checkpoint under the same id and MLflow run, and the steps continue where they
    stopped."""
    # An epoch takes about a second: each interruption must land well before the last one,
    # however slowly the test's own requests go on a loaded machine.
    epochs = 20
    job_id = submit(stack, training_spec(tmp_path, "resume-digits", epochs, max_retries=1))
    runs = stack.home / "runs" / job_id
    wait_for_checkpoints(stack, job_id)
    assert_a_waiting_job_gets_a_start_estimate(stack, tmp_path)

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
    api_url, loop_pid = stack.info["api_url"], stack.info["server_pid"]
    api_processes = find(loop_pid, "spawn_main")
    assert api_processes  # the HTTP API is served beside the loop's process
    os.kill(loop_pid, signal.SIGKILL)  # the controller dies mid-job
    deadline = time.monotonic() + 30
    while any(command_line(pid) for pid in api_processes):  # they end with it
        assert time.monotonic() < deadline, [command_line(pid) for pid in api_processes]
        time.sleep(0.2)
    stack.cli("up", check=True)  # the controller alone: its job runs on, not handed over again
    assert stack.info["api_url"] == api_url  # where clients following the job look
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


def test_a_sweep_of_three_runs_two_at_a_time_ranks_them_and_promotes_the_best(
    stack: Stack, tmp_path: Path
) -> None:
    """Three one-CPU PCA trials (a grid of 1, 60 and 2 epochs) on the 2-CPU stack, at most two
    at once, ranked by kNN accuracy; the best trial's registered version gets the alias
    ``best``.

    Beside it, an evaluation job (``kind: evaluate``) of priority 10 that takes both CPUs and
    depends on the first trial (one epoch): queued until that trial succeeds, it then
    preempts the second (sixty epochs, still running; the stack runs with ``preemption:
    lower_priority``), which goes back to the queue and later resumes from its checkpoint
    under the same id. The evaluation reads the only version registered by then, the first
    trial's, and reproduces its kNN accuracy."""
    model = "sweep-pca-test"
    document = read_yaml((SPECS / "tiny-pca.yaml").read_text())
    document["resources"] = {"workers": 1, "cpus_per_worker": 1}
    document["evaluate"] |= {"knn": True}
    document["register"] = {"model": model}
    document["sweep"] = {
        "grid": {"train.epochs": [1, 60, 2]},
        "max_parallel": 2,
        "metric": "eval.knn.top1",
        "promote": "best",
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(document))
    submitted = stack.cli("sweep", "submit", str(path), "-o", "json", check=True)
    sweep_id = json.loads(submitted.stdout)["id"]
    first = json.loads(submitted.stdout)["trials"][0]["job_id"]
    evaluation = tmp_path / "evaluate.yaml"
    evaluation.write_text(
        f"kind: evaluate\nname: eval-first-trial\nencoder: {model}@candidate\n"
        "protocols: [knn]\nbaselines: false\nresources: {cpus: 2}\npriority: 10\n"
        f"depends_on: [{first}]\n"
    )
    evaluation_id = submit(stack, evaluation)  # the model does not exist yet: it will
    deadline = time.monotonic() + 300
    while (sweep := stack.admin.request("GET", f"/v1/sweeps/{sweep_id}"))["state"] == "RUNNING":
        assert time.monotonic() < deadline, sweep
        time.sleep(1)
    assert sweep["state"] == "SUCCEEDED", sweep
    trials = sweep["trials"]
    assert [trial["state"] for trial in trials] == ["SUCCEEDED"] * 3
    values = [trial["value"] for trial in trials]
    assert values == sorted(values, reverse=True) and 0.5 < values[0] <= 1.0, values
    assert sorted(trial["values"]["train.epochs"] for trial in trials) == [1, 2, 60]
    # Never more than two trials held the cluster at once (the history of each says when).
    spans = []
    for trial in trials:
        moves = transitions(stack, trial["job_id"])
        spans.append((next(t["at"] for t in moves if t["to"] == "STARTING"), moves[-1]["at"]))
    for start, _ in spans:
        assert sum(begin <= start < end for begin, end in spans) <= 2, spans
    best = stack.admin.request("GET", f"/v1/jobs/{trials[0]['job_id']}")
    assert best["sweep_id"] == sweep_id and sweep["result"]["best_job"] == best["id"]
    registry = Registry(stack.tracking_uri)
    # One version a trial: the preempted trial registered once, in whichever attempt.
    assert len(registry.versions(model)) == 3
    promoted = registry.resolve(Reference(model, alias="best"))
    assert promoted.version == best["result"]["model_version"], (promoted, best["result"])
    assert sweep["message"].endswith(f"{model}@best -> version {promoted.version}")
    table = stack.cli("sweep", "status", sweep_id, check=True).stdout
    assert f"1     {best['id']}  SUCCEEDED" in table, table

    evaluated = stack.wait_for(evaluation_id, ("SUCCEEDED", "FAILED", "CANCELLED"), timeout=120)
    assert evaluated["state"] == "SUCCEEDED", evaluated["message"]
    first_done = next(t["at"] for t in transitions(stack, first) if t["to"] == "SUCCEEDED")
    started = next(t["at"] for t in transitions(stack, evaluation_id) if t["to"] == "STARTING")
    assert started > first_done  # depends_on held it
    first_value = next(t["value"] for t in trials if t["job_id"] == first)
    assert evaluated["result"]["eval.knn.top1"] == pytest.approx(first_value, abs=1e-5)
    first_version = stack.admin.request("GET", f"/v1/jobs/{first}")["result"]["model_version"]
    assert evaluated["result"]["model_version"] == first_version
    # Exactly one trial was preempted for it, and came back to succeed under its id.
    preempted = [
        (trial["job_id"], move)
        for trial in trials
        for move in transitions(stack, trial["job_id"])
        if move["reason"].startswith(f"preempted by {evaluation_id} (priority 10 over 0)")
    ]
    assert len(preempted) == 1, preempted
    victim, move = preempted[0]
    assert victim == json.loads(submitted.stdout)["trials"][1]["job_id"]  # the 60-epoch one
    assert (move["from"], move["to"], move["actor"]) == ("RUNNING", "QUEUED", "controller")
    assert move["at"] < started
    resumed = stack.admin.request("GET", f"/v1/jobs/{victim}")
    assert resumed["attempts"] == 2 and resumed["state"] == "SUCCEEDED"


def test_watchdog_fails_a_job_whose_progress_stalls(stack: Stack, tmp_path: Path) -> None:
    """A second controller on the same Ray cluster, with a 2-second watchdog: no job takes
    its first step that fast."""
    with stack.second_controller(tmp_path, watchdog_s=2.0, tick_s=0.5) as controller:
        spec = training_spec(tmp_path, "stalled", epochs=50)
        submitted = stack.run_cli(controller.env, "job", "submit", str(spec), "-o", "json")
        job_id = json.loads(submitted.stdout)["id"]
        job = controller.wait_for(job_id, ("FAILED", "SUCCEEDED"), timeout=120)
        assert job["state"] == "FAILED", job
        assert "no training progress for 2 s (watchdog)" in job["message"]
        failed = stack.run_cli(controller.env, "job", "status", job_id)
        assert failed.returncode == 0 and "watchdog" in failed.stdout
