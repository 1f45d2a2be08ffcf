"""Where the embedded stack keeps its state, and how every part finds it.

One folder (``./.selfsup`` unless ``SELFSUP_HOME`` says otherwise) holds everything:
the job store, MLflow's database and artifacts, Ray Train's run storage, the stack's
address file and logs. The CLI finds it with no flags, so commands run in the same folder
see the same jobs and encoders.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HOME_ENV = "SELFSUP_HOME"
DEFAULT_HOME = ".selfsup"


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @classmethod
    def discover(cls, explicit: str | os.PathLike[str] | None = None) -> StatePaths:
        chosen = explicit or os.environ.get(HOME_ENV) or DEFAULT_HOME
        return cls(Path(chosen).expanduser().resolve())

    @property
    def store_url(self) -> str:
        return f"sqlite:///{self.root / 'jobs.db'}"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def runs(self) -> Path:
        """Ray Train's storage_path: checkpoints live at runs/<job id>/."""
        return self.root / "runs"

    @property
    def stack_file(self) -> Path:
        return self.root / "stack.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def ray_temp_dir(self) -> Path:
        """The Ray head's own temp dir. Ray's job supervisor finds the cluster a driver joins
        through ``<temp dir>/ray_current_cluster``, which the latest cluster started with the
        same temp dir overwrites: every stack needs its own. Kept short (Unix socket paths
        under it are limited to ~107 bytes) and derived from the state folder."""
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"selfsup-ray-{digest}"

    @property
    def api_token_file(self) -> Path:
        """The controller token `selfsup up` made for the local user, an admin (mode 0600)."""
        return self.root / "token"

    @property
    def server_config(self) -> Path:
        """The settings `selfsup up` gives its controller server."""
        return self.root / "server.yaml"

    @property
    def ray_token_file(self) -> Path:
        """The embedded Ray cluster's authentication token (mode 0600)."""
        return self.root / "ray-auth-token"

    @property
    def production_secrets(self) -> Path:
        """`selfsup up --production`: its S3 key and MLflow admin password (mode 0600)."""
        return self.root / "production-secrets.json"

    @property
    def postgres_root(self) -> Path:
        """`selfsup up --production`: its PostgreSQL cluster, under the temp dir (the
        postgres user, which runs the server, must reach it; a state folder may be private)."""
        return self.ray_temp_dir.with_name(self.ray_temp_dir.name.replace("-ray-", "-pg-"))


@dataclass(frozen=True)
class StackInfo:
    """What `selfsup up` wrote: how to reach the running Ray head and how big it is."""

    ray_address: str
    dashboard_url: str
    head_pid: int
    num_cpus: float
    num_gpus: float
    api_url: str | None = None  # the controller server's address
    server_pid: int | None = None
    # `up --production`: the other processes' groups by name, in the order they started
    # (S3, MLflow, Ray worker nodes), the addresses of S3 and MLflow, PostgreSQL's port.
    services: dict[str, int] = field(default_factory=dict)
    endpoints: dict[str, str] = field(default_factory=dict)  # "s3", "mlflow": their URLs
    postgres_port: int | None = None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> StackInfo | None:
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))
