"""A private PostgreSQL server: Debian's binaries, a cluster of its own in a folder, listening
on a free loopback port. The tests and benchmarks run the job store's production backend on
a throwaway one (`postgres_server`); `selfsup up --production` keeps one for its job store,
MLflow's tracking store and MLflow's user store."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service.ports import free_port

USER = "selfsup"  # the cluster's superuser; local connections are trusted (loopback only)


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres(command: list[str]) -> list[str]:
    # initdb and the server refuse to run as root; these machines run tests as root.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass(frozen=True)
class PrivateCluster:
    """A cluster in ``root`` (data/, sockets/, server.log) serving on ``port``. Its folder
    must be reachable by the postgres user when running as root: keep it under /tmp."""

    root: Path
    port: int

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of its ``postgres`` database."""
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise FileNotFoundError("no PostgreSQL server binaries under /usr/lib/postgresql")
        command = [str(bin_dir / "pg_ctl"), "-D", str(self.root / "data"), *args]
        subprocess.run(_as_postgres(command), check=check, capture_output=True)

    def start(self) -> None:
        """Make the cluster if it is new, then start it and wait until it takes connections."""
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise FileNotFoundError("no PostgreSQL server binaries under /usr/lib/postgresql")
        sockets = self.root / "sockets"
        if not (self.root / "data").is_dir():
            sockets.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(self.root, "postgres")
                shutil.chown(sockets, "postgres")
            initdb = [str(bin_dir / "initdb"), "-D", str(self.root / "data"), "-U", USER]
            subprocess.run(
                _as_postgres([*initdb, "--auth=trust", "--no-sync"]),
                check=True,
                capture_output=True,
            )
        options = f"-p {self.port} -h 127.0.0.1 -k {sockets} -c fsync=off"
        self._pg_ctl("-o", options, "-l", str(self.root / "server.log"), "-w", "start")

    def running(self) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "stop", check=False)


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a throwaway server; yield its SQLAlchemy URL."""
    cluster = PrivateCluster(Path(tempfile.mkdtemp(prefix="selfsup-pg-")), free_port())
    cluster.start()
    try:
        yield cluster.url
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def create_database(server_url: str, name: str, exist_ok: bool = False) -> str:
    """Make the empty database ``name`` on the server at ``server_url`` (unless ``exist_ok``
    and it is there); its URL."""
    from sqlalchemy import create_engine, text

    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")  # no CREATE in a transaction
    with engine.connect() as connection:
        found = connection.execute(
            text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
        ).first()
        if not (found and exist_ok):
            connection.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"
