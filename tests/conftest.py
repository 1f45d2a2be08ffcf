"""Shared fixtures: a local Ray for in-process distributed tests, and a real embedded stack
(`selfsup up`: Ray head with the Jobs API, SQLite job store, MLflow on SQLite) for tests that
go through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Short socket paths (Ray's unix sockets live under its temp dir) and no usage reporting.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
SELFSUP = str(Path(sys.executable).with_name("selfsup"))


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
        result = subprocess.run(
            [SELFSUP, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"selfsup {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
            )
        return result

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.home / 'mlflow.db'}"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("selfsup-home")
    running = Stack(home)
    running.cli("up", "--num-cpus", "2", check=True, timeout=180)
    yield running
    running.cli("down", timeout=120)
