"""Shared fixtures: a local Ray for in-process distributed tests, and a real embedded stack
(`selfsup up`: Ray head with the Jobs API, the controller server on loopback, SQLite job
store, MLflow on SQLite) for tests that go through the CLI and the HTTP API."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from service.client import ApiClient
from service.config import StatePaths
from service.ports import free_port
from service.postgres import create_database, postgres_bin, postgres_server
from service.stack import answers, ray_auth_env
from tests.s3 import S3Endpoint, s3_server
from tests.user_images import fill_bucket

# Short socket paths (Ray's unix sockets live under its temp dir) and no usage reporting.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
SELFSUP = str(Path(sys.executable).with_name("selfsup"))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for the module: thousands of tiny matrix products run faster than
    on two threads fighting over two cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A Ray instance inside the test process, for TorchTrainer-based tests."""
    import ray

    from pipelines.pretrain import TRAIN_RUNTIME_ENV

    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    # address="local": a new instance of our own, never the last `ray start` cluster on the
    # machine (which a bare ray.init() would join).
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        runtime_env=TRAIN_RUNTIME_ENV,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@dataclass(frozen=True)
class SecondController:
    """A controller beside the stack's: its API as user ``dana``, a CLI environment that talks
    to it, and its settings."""

    api: ApiClient
    env: dict[str, str]
    settings: dict

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while (job := self.api.request("GET", f"/v1/jobs/{job_id}"))["state"] not in states:
            assert time.monotonic() < deadline, f"{job_id} stayed {job['state']}: {job}"
            time.sleep(0.5)
        return job


def python_with_ray_token(home: Path, env: dict[str, str], code: str, *args: str) -> str:
    """Run ``code`` in a Python process holding the Ray token of the stack in ``home``, as
    every client of its Ray cluster must; its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**env, **ray_auth_env(StatePaths(home))},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout


class Stack:
    """A running embedded stack in its own state folder, driven through the real CLI."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "SELFSUP_HOME": str(home)}
        self.env.pop("MLFLOW_TRACKING_URI", None)
        # ray_local's ray.init() exported its own cluster's address into this process.
        self.env.pop("RAY_ADDRESS", None)

    def cli(
        self, *args: str, check: bool = False, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        result = self.run_cli(self.env, *args, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"selfsup {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
            )
        return result

    @staticmethod
    def run_cli(
        env: dict[str, str], *args: str, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [SELFSUP, *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    def python(self, code: str, *args: str) -> str:
        return python_with_ray_token(self.home, self.env, code, *args)

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def info(self) -> dict:
        """stack.json: the Ray head's and the controller's addresses and process ids."""
        return json.loads((self.home / "stack.json").read_text())

    def token(self, user: str, admin: bool = False) -> str:
        """A new API token for ``user``, made by the real `selfsup token create`."""
        args = ["token", "create", user, *(["--admin"] if admin else [])]
        return self.cli(*args, check=True).stdout.strip()

    def api(self, token: str | None) -> ApiClient:
        return ApiClient(self.info["api_url"], token)

    @property
    def admin(self) -> ApiClient:
        """The client the CLI uses: the local user's admin token from `selfsup up`."""
        return self.api((self.home / "token").read_text().strip())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold admission (`selfsup queue pause`) so queued jobs stay queued meanwhile."""
        self.cli("queue", "pause", check=True)
        try:
            yield
        finally:
            self.cli("queue", "resume", check=True)

    def submit_and_wait(self, document: dict, folder: Path) -> tuple[dict, str]:
        """Submit a spec document with the CLI's ``job submit --wait``; the ended job's
        status, and the CLI's stderr."""
        path = folder / f"{document['name']}.yaml"
        path.write_text(json.dumps(document))  # JSON is YAML
        result = self.cli("job", "submit", str(path), "--wait")
        job_id = result.stdout.split()[1]
        job = json.loads(self.cli("job", "status", job_id, "-o", "json", check=True).stdout)
        return job, result.stderr

    def run_job(self, document: dict, folder: Path) -> dict:
        """``submit_and_wait`` for a job that must succeed."""
        job, stderr = self.submit_and_wait(document, folder)
        assert job["state"] == "SUCCEEDED", (job["message"], stderr[-3000:])
        return job

    @contextlib.contextmanager
    def second_controller(self, folder: Path, **settings: object) -> Iterator[SecondController]:
        """`selfsup server` with its own store and MLflow (in ``folder``) on this stack's Ray
        cluster, with ``settings`` over the stack's own; stopped on leaving."""
        document = yaml.safe_load((self.home / "server.yaml").read_text())
        document |= {
            "port": free_port(),
            "store_url": f"sqlite:///{folder / 'jobs.db'}",
            "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
            "artifact_root": str(folder / "artifacts"),
            "storage_path": str(folder / "runs"),
            **settings,
        }
        config = folder / "server.yaml"
        config.write_text(yaml.safe_dump(document))
        token = self.cli(
            "token", "create", "dana", "--store-url", document["store_url"], check=True
        )
        env = {**self.env, "SELFSUP_API_URL": f"http://127.0.0.1:{document['port']}"}
        env["SELFSUP_TOKEN"] = token.stdout.strip()
        server = subprocess.Popen(
            [SELFSUP, "server", "--config", str(config)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=(folder / "server.log").open("w"),
        )
        try:
            controller = SecondController(
                ApiClient(env["SELFSUP_API_URL"], env["SELFSUP_TOKEN"]), env, document
            )
            deadline = time.monotonic() + 60
            while not answers(f"{controller.api.url}/healthz"):
                assert server.poll() is None and time.monotonic() < deadline, "no server"
                time.sleep(0.2)
            yield controller
        finally:
            server.terminate()
            server.wait(timeout=60)

    def wait_for_run(self, job_id: str, timeout: float = 60) -> dict:
        """The job once the controller's loop has made its MLflow run."""
        deadline = time.monotonic() + timeout
        while not (job := self.admin.request("GET", f"/v1/jobs/{job_id}"))["mlflow_run_id"]:
            assert time.monotonic() < deadline, f"{job_id} has no MLflow run: {job}"
            time.sleep(0.2)
        return job

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.admin.request("GET", f"/v1/jobs/{job_id}")
            if job["state"] in states:
                return job
            assert time.monotonic() < deadline, f"{job_id} stayed {job['state']}: {job}"
            time.sleep(0.5)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Endpoint]:
    """moto's S3 server on loopback, its address and key in this process's environment (the
    standard AWS_* variables), so the stack started after it reads S3 from there too."""
    with s3_server() as endpoint:
        saved = {name: os.environ.get(name) for name in endpoint.env}
        os.environ.update(endpoint.env)
        yield endpoint
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def bucket(s3: S3Endpoint) -> str:
    """A bucket of users' images on the S3 server (tests/user_images.py); its URI."""
    return fill_bucket(s3)


@pytest.fixture(scope="session")
def stack(s3: S3Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("selfsup-home")
    running = Stack(home)
    # Settings through the environment, as a deployment may give them: the controller's
    # tests preempt a running job for a higher-priority one, and retry a job sooner.
    running.env["SELFSUP_PREEMPTION"] = "lower_priority"
    running.env["SELFSUP_RETRY_BACKOFF_S"] = "2"  # a retried job waits 2 s, not 10
    running.cli("up", "--num-cpus", "2", check=True, timeout=180)
    yield running
    running.cli("down", timeout=120)


SIMCLR_DIGITS = Path(__file__).parent.parent / "examples" / "simclr-digits.yaml"
DIGITS_MODEL = "simclr-digits-test"


@pytest.fixture(scope="session")
def digits_job(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ONE short SimCLR job on digits through `selfsup job submit --wait`, with every
    evaluation protocol on (one seed, one label fraction) and its encoder registered as
    ``DIGITS_MODEL`` version 1, shared by the spine's and the registry's tests (a full job
    costs ~40 s of start-up). Its status, parsed spec, the `--wait` output, and the model's
    versions as listed right after the job (later tests add versions and move aliases)."""
    from pipelines.spec import load_spec_text, read_yaml

    document = read_yaml(SIMCLR_DIGITS.read_text())
    document["name"] = DIGITS_MODEL
    document["train"].update(epochs=3)
    document["evaluate"] = {
        "linear": True,
        "knn": True,
        "label_fractions": [0.1],
        "seeds": [0],
        "finetune_steps": 20,
    }
    document["register"] = {"model": DIGITS_MODEL, "alias": "candidate"}
    path = tmp_path_factory.mktemp("digits-job") / "spec.yaml"
    path.write_text(json.dumps(document))  # JSON is YAML
    submitted = stack.cli("job", "submit", str(path), "--wait")
    job_id = submitted.stdout.split()[1]
    status = json.loads(stack.cli("job", "status", job_id, "-o", "json", check=True).stdout)
    assert status["state"] == "SUCCEEDED", (status["message"], submitted.stderr[-3000:])
    listed = stack.cli("encoder", "list", DIGITS_MODEL, "-o", "json", check=True).stdout
    return {
        **status,
        "spec": load_spec_text(path.read_text()),
        "table": submitted.stdout,  # `--wait` ends with `selfsup job status ID`
        "versions": json.loads(listed),
    }


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A private PostgreSQL server (Debian's binaries) on loopback, for the whole session."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed here (Debian package: postgresql)")
    with postgres_server() as url:
        yield url


def new_postgres_database(server_url: str) -> str:
    """A fresh, empty database on the server; its URL."""
    return create_database(server_url, f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database for a job store on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return new_postgres_database(request.getfixturevalue("postgres_url"))
