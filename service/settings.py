"""The controller server's settings: one YAML file, environment variables over it.

`selfsup server --config FILE` (or ``SELFSUP_CONFIG=FILE``) reads the file; then every
setting can be overridden by ``SELFSUP_<NAME>`` in the environment, e.g.
``SELFSUP_STORE_URL=postgresql+psycopg://...``, ``SELFSUP_RAY_DASHBOARD_URL=http://head:8265``,
``SELFSUP_TRACKING_URI=http://mlflow:5000``. `selfsup up` writes the embedded stack's file
to ``<state folder>/server.yaml``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

CONFIG_ENV = "SELFSUP_CONFIG"
ENV_PREFIX = "SELFSUP_"


class SettingsError(Exception):
    pass


def _no_credentials(uri: str) -> str:
    """A URI travels in job payloads and run records: credentials belong in the environment
    (AWS_* variables, a profile), never in it."""
    parts = urlsplit(uri)
    if "@" in parts.netloc or parts.query or parts.fragment:
        # Not echoed: the value itself is what must not reach a log.
        raise ValueError(
            "the URI carries credentials or a query; give S3 credentials through AWS_* "
            "variables or a profile"
        )
    return uri


def _storage_location(location: str) -> str:
    """Where Ray Train writes checkpoints: an absolute folder, or s3://bucket/prefix."""
    scheme = urlsplit(location).scheme
    if not scheme and not Path(location).is_absolute():
        raise ValueError(f"{location!r} is neither an absolute folder nor s3://bucket/prefix")
    if scheme and (scheme != "s3" or not urlsplit(location).netloc):
        raise ValueError(f"{location!r}: checkpoints go to a folder or to s3://bucket/prefix")
    return _no_credentials(location)


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8470
    store_url: str  # SQLAlchemy URL of the job store: sqlite:///... or postgresql+psycopg://...
    tracking_uri: str  # MLflow tracking and registry URI
    # The MLflow experiment's artifact location, if new: a folder or s3://bucket/prefix.
    artifact_root: Annotated[str, AfterValidator(_no_credentials)] | None = None
    mlflow_ui_url: str | None = None  # where users open runs; default: the tracking URI if HTTP
    ray_dashboard_url: str  # the Ray Jobs API (the head's dashboard address)
    ray_token_file: str | None = None  # the Ray cluster's auth token, if it uses one
    # Ray Train's storage (a folder or s3://bucket/prefix): checkpoints at <storage_path>/<job id>
    storage_path: Annotated[str, AfterValidator(_storage_location)]
    # A custom resource every Ray Train worker asks one unit of (per CPU it takes): only the
    # nodes that offer it run training, e.g. worker nodes and not the head.
    worker_resource: str | None = None
    driver_python: str = sys.executable  # the Python that runs a job's driver on the head
    cluster_cpus: Annotated[float, Field(ge=0)] | None = None  # default: ask Ray
    cluster_gpus: Annotated[float, Field(ge=0)] | None = None
    # Processes that serve the HTTP API beside the one that runs the loop (service/server.py).
    # Unset: one on SQLite, whose writers take turns on one lock (a second process's writes
    # wait in SQLite's sleeping busy handler), two on PostgreSQL, where one process spends
    # much of a submit waiting on round trips (benchmarks/bench_controller.py, docs/results.md).
    api_processes: Annotated[int, Field(ge=1, le=64)] | None = None
    tick_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    aging_per_minute: Annotated[float, Field(ge=0)] = 0.1  # priority gained per minute queued
    max_workers_per_user: Annotated[int, Field(gt=0)] | None = None
    # Fair share between users: priority lost per worker a user already runs, over the
    # user's weight (user_weights: {"alice": 2.0}; 1 for anyone not named). 0: off.
    fair_share_per_worker: Annotated[float, Field(ge=0)] = 0.0
    user_weights: dict[str, Annotated[float, Field(gt=0)]] = {}
    # A job that does not fit may stop running jobs of lower priority, which go back to the
    # queue and resume from their latest checkpoint (service/scheduler.py says which).
    preemption: Literal["never", "lower_priority"] = "never"
    # A running elastic gang below its most grows (a restart with more workers) once it has
    # run this long at its size and no queued job waits for capacity.
    elastic_grow_after_s: Annotated[float, Field(ge=0)] = 60.0
    watchdog_s: Annotated[float, Field(gt=0)] = 900.0  # no training progress this long: retry
    retry_backoff_s: Annotated[float, Field(ge=0)] = 10.0  # doubled for each further retry
    retry_backoff_max_s: Annotated[float, Field(ge=0)] = 600.0
    # A finished job's checkpoints (<storage_path>/<job id>) are deleted this many days after
    # it ended; None keeps them. Registered encoders live in MLflow's artifacts: never touched.
    checkpoint_retention_days: Annotated[float, Field(gt=0)] | None = None

    @property
    def api_process_count(self) -> int:
        if self.api_processes is not None:
            return self.api_processes
        return 1 if self.store_url.startswith("sqlite") else 2

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.model_dump(), sort_keys=False))


def _mapping(text: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # validation says what is wrong with it


def load_settings(
    config_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] = os.environ
) -> ServerSettings:
    chosen = config_file or env.get(CONFIG_ENV)
    document: dict = {}
    if chosen:
        try:
            document = yaml.safe_load(Path(chosen).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise SettingsError(f"cannot read the server config {chosen}: {error}") from None
        if not isinstance(document, dict):
            raise SettingsError(f"the server config {chosen} must be a mapping of settings")
    for name in ServerSettings.model_fields:
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None:
            # A mapping (user_weights) comes as YAML or JSON text: {"alice": 2}.
            mapping = get_origin(ServerSettings.model_fields[name].annotation) is dict
            document[name] = None if value == "" else _mapping(value) if mapping else value
    try:
        return ServerSettings.model_validate(document, strict=False)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, item['loc'])) or 'config'}: {item['msg']}"
            for item in error.errors()
        )
        raise SettingsError(
            f"invalid server settings ({chosen or 'environment'}): {problems}. Set them in the "
            f"config file or as {ENV_PREFIX}<NAME> environment variables"
        ) from None
