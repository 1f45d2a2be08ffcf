"""The deployed shape, started by `selfsup up --production` as a team would try it on one box:
PostgreSQL for the job store and MLflow, moto's S3 server, `mlflow server` with the
basic-auth app and ``--artifacts-destination s3://``, a Ray head and two worker nodes
(one CPU and one unit of the custom resource ``selfsup_worker`` each), token auth on Ray.

One PIRL job on users' images streamed from S3 (corrupt files among them, skipped and
counted) is an elastic gang of one to two workers: admitted with two, one on each worker
node. A worker node is killed (its raylet, by pid), and the controller too: the gang goes on
with one worker on the node left, from the latest checkpoint on S3, with the same global
batch and the steps going on from the checkpoint's; `selfsup up --production` brings the
controller back, which reconciles and finishes the job. Then: no
one reads MLflow without signing in, a registered model is written only by its job's owner
and admins, and no secret is in what users and operators read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.sources import Catalog, ImageSource
from pipelines.user_data import catalog_labels
from service.client import ApiClient
from service.postgres import postgres_bin
from service.production import BUCKET, WORKER_RESOURCE
from tests.conftest import SELFSUP, python_with_ray_token
from tests.processes import find
from tests.s3 import S3Endpoint
from tests.train_loop_runs import assert_loads_and_reproduces
from tests.user_images import BROKEN, fill_bucket, job_document
from workers.data import split_samples
from workers.train_loop import REFERENCE_FILE

MODEL = "test-pirl-production"
EPOCHS = 4
GLOBAL_BATCH = 96
WORKER_NODES = 2
# A lost node costs seconds, not a minute: Ray checks the nodes' health every second and
# gives a node up after three failures in a row (its defaults: every 3 s, five failures), and
# Ray Train, restarting the gang at the size its stale view of the cluster allows, gives up
# waiting for the lost node's worker after 25 s (its default: 60 s) and shrinks the gang.
FAST_NODE_LOSS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "25",
}
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
PCA_DIGITS = Path(__file__).parent.parent / "examples" / "pca-digits.yaml"


@dataclass(frozen=True)
class Production:
    home: Path
    env: dict[str, str]  # the operator's shell on the stack's machine: SELFSUP_HOME only
    users: dict[str, dict[str, str]] = field(default_factory=dict)

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [SELFSUP, *args], env=env or self.env, capture_output=True, text=True, timeout=600
        )

    def checked(self, *args: str, env: dict[str, str] | None = None) -> str:
        result = self.cli(*args, env=env)
        assert result.returncode == 0, (args, result.stdout, result.stderr[-3000:])
        return result.stdout

    @property
    def info(self) -> dict:
        return json.loads((self.home / "stack.json").read_text())

    @property
    def settings(self) -> dict:
        return yaml.safe_load((self.home / "server.yaml").read_text())

    @property
    def secrets(self) -> dict:
        return json.loads((self.home / "production-secrets.json").read_text())

    @property
    def s3(self) -> S3Endpoint:
        keys = self.secrets
        return S3Endpoint(
            self.info["endpoints"]["s3"], keys["s3_access_key"], keys["s3_secret_key"]
        )

    def user(self, name: str, admin: bool = False) -> dict[str, str]:
        """A user's shell elsewhere: the controller's address, their token, and their MLflow
        account (made by `selfsup token create`, the token its password), once a user."""
        if name in self.users:
            return self.users[name]
        token = self.checked("token", "create", name, *(["--admin"] if admin else []))
        self.users[name] = {
            **self.env,
            "SELFSUP_HOME": str(self.home / "nowhere"),  # nothing local: all by address
            "SELFSUP_API_URL": self.info["api_url"],
            "SELFSUP_TOKEN": token.strip(),
            "MLFLOW_TRACKING_URI": self.settings["tracking_uri"],
            "MLFLOW_TRACKING_USERNAME": name,
            "MLFLOW_TRACKING_PASSWORD": token.strip(),
        }
        return self.users[name]

    def wait_for(self, job_id: str, user: dict[str, str], states: tuple[str, ...]) -> dict:
        api = ApiClient(user["SELFSUP_API_URL"], user["SELFSUP_TOKEN"])
        deadline = time.monotonic() + 480
        while True:
            try:
                job = api.request("GET", f"/v1/jobs/{job_id}")
                if job["state"] in states:
                    return job
            except Exception:  # noqa: BLE001 - the controller is down while it restarts
                job = None
            assert time.monotonic() < deadline, (job_id, job)
            time.sleep(0.3)


def _clean_env() -> dict[str, str]:
    """This process's environment without the session's S3 and MLflow settings: the stack
    gets what it needs from its own secrets, as on a machine of its own."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AWS_", "MLFLOW_TRACKING_", "MLFLOW_S3_", "SELFSUP_"))
    }


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Production]:
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed here (Debian package: postgresql)")
    home = tmp_path_factory.mktemp("production-home")
    stack = Production(home, {**_clean_env(), **FAST_NODE_LOSS, "SELFSUP_HOME": str(home)})
    stack.checked("up", "--production", "--worker-nodes", str(WORKER_NODES))
    try:
        yield stack
    finally:
        stack.cli("down")


def _get(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user:
        basic = b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _node_of_each_train_worker(production: Production) -> dict[str, list[int]]:
    """Worker node name -> the pids of Ray Train workers under it."""
    return {
        name: workers
        for name, pid in production.info["services"].items()
        if name.startswith("ray-worker-") and (workers := find(pid, "RayTrainWorker"))
    }


def _checkpoints_with_state(s3: S3Endpoint, job_id: str) -> set[str]:
    pages = s3.client().get_paginator("list_objects_v2")
    keys = [
        item["Key"]
        for page in pages.paginate(Bucket=BUCKET, Prefix=f"checkpoints/{job_id}/checkpoint_")
        for item in page.get("Contents", [])
    ]
    return {key.split("/")[2] for key in keys if key.endswith("/state.pt")}


def _ray_job_records(production: Production) -> str:
    """Every Ray job the head knows, entrypoint and runtime env included, as text."""
    script = (
        "import sys; from ray.job_submission import JobSubmissionClient; "
        "print(JobSubmissionClient(sys.argv[1]).list_jobs())"
    )
    return python_with_ray_token(
        production.home, production.env, script, production.info["dashboard_url"]
    )


@pytest.fixture(scope="module")
def finished_job(production: Production, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """alice's PIRL job on S3 images through a worker node's loss and a controller's."""
    bucket = fill_bucket(production.s3)
    method = {"name": "pirl", "num_negatives": 64, "projection_dim": 32, "hidden_dim": 64}
    document = job_document(MODEL, method, bucket, max_bad_fraction=0.1)
    document["train"]["epochs"] = EPOCHS
    # One CPU a worker, one per node: the gang spans the two worker nodes, and shrinks to
    # one. The global batch divides by both sizes: 48 images a worker at 2, 96 at 1.
    document["resources"] |= {"cpus_per_worker": 1, "workers": {"min": 1, "max": 2}}
    document["train"]["batch_size"] = GLOBAL_BATCH
    document["evaluate"] |= {"knn": False}
    spec = tmp_path_factory.mktemp("production-job") / "pirl.yaml"
    spec.write_text(json.dumps(document))

    alice = production.user("alice")
    job_id = json.loads(production.checked("job", "submit", str(spec), "-o", "json", env=alice))[
        "id"
    ]
    deadline = time.monotonic() + 300
    while len(_checkpoints_with_state(production.s3, job_id)) < 2:
        job = production.wait_for(job_id, alice, ("QUEUED", "STARTING", "RUNNING", *FINAL))
        assert job["state"] not in FINAL, job["message"]
        assert time.monotonic() < deadline, ("no two checkpoints on S3", job)
        time.sleep(0.3)
    spread = _node_of_each_train_worker(production)
    assert len(spread) == 2 and all(len(pids) == 1 for pids in spread.values()), spread
    admitted = production.wait_for(job_id, alice, ("RUNNING",))
    assert (admitted["workers"], admitted["min_workers"], admitted["max_workers"]) == (2, 1, 2)
    lost_node = sorted(spread)[0]
    (raylet,) = find(production.info["services"][lost_node], "raylet")
    os.kill(raylet, signal.SIGKILL)
    os.killpg(production.info["server_pid"], signal.SIGKILL)  # and the controller
    production.checked("up", "--production")  # brings back what is not running
    job = production.wait_for(job_id, alice, FINAL)
    return {
        **job,
        "alice": alice,
        "lost_node": lost_node,
        "logs": production.checked("job", "logs", job_id, env=alice),
        "bucket": bucket,
    }


def test_a_pirl_job_survives_a_lost_worker_node_and_a_killed_controller(
    production: Production, finished_job: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = finished_job
    assert job["state"] == "SUCCEEDED", job["message"]
    assert job["attempts"] == 1  # the gang shrank inside the run: no retry of the job
    # The lost node is gone from the cluster; the gang finished on the one left.
    assert _node_of_each_train_worker(production).keys().isdisjoint({job["lost_node"]})

    client = _sign_in(monkeypatch, finished_job["alice"])
    tracking_uri = production.settings["tracking_uri"]
    run = client.get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    (resume,) = client.get_metric_history(run.info.run_id, "train.resumed_from_epoch")
    sizes = [m.value for m in client.get_metric_history(run.info.run_id, "train.workers")]
    assert sizes[0] == 2 and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True), sizes
    for name, value in production.s3.env.items():  # the bucket listed from here, as the driver did
        monkeypatch.setenv(name, value)
    catalog = Catalog.list(ImageSource.parse(job["bucket"]))
    train = split_samples(len(catalog.keys), catalog_labels(catalog), 0.25, 0).train
    steps_per_epoch = len(train) // GLOBAL_BATCH  # at either size
    assert resume.step == (int(resume.value) + 1) * steps_per_epoch
    steps = client.get_metric_history(run.info.run_id, "train.step")
    assert max(m.step for m in steps) == EPOCHS * steps_per_epoch
    broken_in_training = {catalog.keys[i] for i in train} & BROKEN.keys()
    assert run.data.metrics["data.bad_samples"] == len(broken_in_training)
    assert f"skipped {len(broken_in_training)} unreadable images" in job["logs"]
    assert run.data.metrics["eval.linear.top1"] > 0.5  # on the bucket's class folders

    # Artifacts through the MLflow server, stored on S3: clients hold no S3 key.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    logged = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "eval")}
    assert any(path.endswith(".png") for path in logged), logged
    s3 = production.s3.client()
    stored = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(key.startswith("mlflow/") and key.endswith(".safetensors") for key in stored)
    final = tmp_path / "final"
    final.mkdir()
    (reference,) = [key for key in stored if key.endswith(REFERENCE_FILE)]
    s3.download_file(BUCKET, reference, str(final / REFERENCE_FILE))
    assert_loads_and_reproduces(MODEL, tracking_uri, final)


def test_no_one_reads_mlflow_or_ray_without_signing_in(
    production: Production, finished_job: dict
) -> None:
    tracking = production.settings["tracking_uri"]
    alice = finished_job["alice"]
    search = f"{tracking}/api/2.0/mlflow/registered-models/search"
    run = f"{tracking}/api/2.0/mlflow/runs/get?run_id={finished_job['mlflow_run_id']}"
    for url in (search, run, f"{tracking}/api/2.0/mlflow-artifacts/artifacts"):
        assert _get(url) == 401, url
        assert _get(url, "alice", "not-her-password") == 401, url
    assert _get(search, "alice", alice["MLFLOW_TRACKING_PASSWORD"]) == 200
    assert _get(run, "bob", production.user("bob")["MLFLOW_TRACKING_PASSWORD"]) == 200
    # Ray's dashboard and Jobs API keep token authentication on.
    assert _get(f"{production.info['dashboard_url']}/api/jobs/") == 401


def test_only_the_owner_and_admins_write_a_registered_model(
    production: Production, finished_job: dict, tmp_path: Path
) -> None:
    bob, alice = production.user("bob"), finished_job["alice"]
    # bob's job may not add a version to alice's model: refused before any training.
    document = yaml.safe_load(PCA_DIGITS.read_text())
    document["register"]["model"] = MODEL
    document["resources"]["workers"] = 1  # one worker node is left
    spec = tmp_path / "bob.yaml"
    spec.write_text(json.dumps(document))
    job_id = json.loads(production.checked("job", "submit", str(spec), "-o", "json", env=bob))["id"]
    refused = production.wait_for(job_id, bob, FINAL)
    assert refused["state"] == "FAILED" and refused["attempts"] == 0, refused
    assert f"{MODEL!r} is registered by another user" in refused["message"]

    version = finished_job["result"]["model_version"]
    moved = production.cli("encoder", "promote", MODEL, version, "--alias", "bobs", env=bob)
    assert moved.returncode != 0 and "403" in moved.stderr + moved.stdout, moved
    for owner in (alice, production.user("carol", admin=True)):
        production.checked("encoder", "promote", MODEL, version, "--force", env=owner)


def _sign_in(monkeypatch: pytest.MonkeyPatch, user: dict[str, str]) -> MlflowClient:
    """This process as ``user`` on the stack's MLflow, for the test."""
    for name, value in user.items():
        if name.startswith("MLFLOW_TRACKING_"):
            monkeypatch.setenv(name, value)
    return MlflowClient(user["MLFLOW_TRACKING_URI"])


def test_no_secret_reaches_what_users_and_operators_read(
    production: Production, finished_job: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = [production.secrets["s3_secret_key"], production.secrets["mlflow_admin_password"]]
    alice = finished_job["alice"]
    data = _sign_in(monkeypatch, alice).get_run(finished_job["mlflow_run_id"]).data
    readable = {
        "params": json.dumps(data.params),
        "tags": json.dumps(data.tags),
        "job logs": finished_job["logs"],
        "job status": production.checked("job", "status", finished_job["id"], env=alice),
        "Ray jobs (entrypoints, runtime envs)": _ray_job_records(production),
        "controller settings": (production.home / "server.yaml").read_text(),
        "controller log": (production.home / "logs" / "controller.log").read_text(),
    }
    assert finished_job["id"] in readable["Ray jobs (entrypoints, runtime envs)"]
    for what, text in readable.items():
        assert all(secret not in text for secret in secrets), what
    assert WORKER_RESOURCE in production.settings["worker_resource"]


def test_a_gang_wider_than_the_training_nodes_is_refused_at_submit(
    production: Production, tmp_path: Path
) -> None:
    """As many one-CPU workers as the cluster has CPUs fit them, but the head's CPU does not
    train: the gang is refused for the worker nodes' units (however many nodes are left)."""
    bob = production.user("bob")
    cluster = json.loads(production.checked("queue", "-o", "json", env=bob))["cluster"]
    document = yaml.safe_load(PCA_DIGITS.read_text())
    document["resources"] |= {"workers": int(cluster["cpus"])}
    document["train"]["batch_size"] = 64 * int(cluster["cpus"])
    spec = tmp_path / "wide.yaml"
    spec.write_text(json.dumps(document))
    refused = production.cli("job", "submit", str(spec), env=bob)
    assert refused.returncode == 2, refused
    units = int(cluster["cpus"]) - 1  # every CPU but the head's
    assert f"offering {WORKER_RESOURCE}); the cluster's have {units}" in refused.stderr
