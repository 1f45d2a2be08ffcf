"""The control plane's use of MLflow: one run per job, progress read back, and the registry.

No torch here: MLflow's client alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines import tags
from pipelines.spec import JobSpec

EXPERIMENT = "selfsup"
# A client whose server is gone would otherwise retry for minutes before failing.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


class TrackingError(Exception):
    """A registry or tracking lookup that failed; the message is for the user."""


@dataclass(frozen=True)
class Progress:
    epoch: int | None
    step: int | None
    loss: float | None
    samples_per_sec: float | None


@dataclass(frozen=True)
class ModelVersionView:
    name: str
    version: str
    aliases: list[str]
    run_id: str | None
    tags: dict[str, str]
    created_at_ms: int
    description: str = ""
    model_id: str | None = None  # MLflow's logged model, which evaluation metrics link to


def _log_path(attempt: int) -> str:
    return f"logs/attempt-{attempt}.txt"


class Tracking:
    def __init__(self, tracking_uri: str, artifact_root: str | Path | None = None) -> None:
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.artifact_root = artifact_root
        self._experiment: str | None = None
        # MLflow on SQLite takes one writer at a time: concurrent writers from this process's
        # threads (the controller's API) would queue inside MLflow's connection pool until they
        # time out, so they take turns here instead.
        sqlite = tracking_uri.startswith("sqlite")
        self._writes = threading.Lock() if sqlite else contextlib.nullcontext()

    def _experiment_id(self) -> str:
        if self._experiment is None:
            self._experiment = self._get_or_create_experiment()
        return self._experiment

    def _get_or_create_experiment(self) -> str:
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.artifact_root:  # a folder, or a URI such as s3://bucket/prefix
            root = str(self.artifact_root)
            location = root if "://" in root else Path(root).resolve().as_uri()
        try:
            return self.client.create_experiment(EXPERIMENT, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            return self.client.get_experiment_by_name(EXPERIMENT).experiment_id

    def create_job_run(self, job_id: str, spec: JobSpec) -> str:
        with self._writes:
            return self._create_job_run(job_id, spec)

    def _create_job_run(self, job_id: str, spec: JobSpec) -> str:
        run = self.client.create_run(
            self._experiment_id(),
            run_name=job_id,
            tags={
                tags.JOB_ID: job_id,
                "selfsup.spec_name": spec.name,
                "selfsup.method": spec.method.name,
                "selfsup.config_hash": spec.config_hash(),
                "selfsup.dataset": spec.data.source,
            },
        )
        run_id = run.info.run_id
        params = spec.flat_params()
        keys = sorted(params)
        for start in range(0, len(keys), 100):
            chunk = [Param(key, params[key][:6000]) for key in keys[start : start + 100]]
            self.client.log_batch(run_id, params=chunk)
        return run_id

    def create_evaluation_run(self, run_name: str, run_tags: dict[str, str]) -> str:
        """A run for ``selfsup eval``, beside the jobs' runs in the same experiment."""
        return self.client.create_run(
            self._experiment_id(), run_name=run_name, tags=run_tags
        ).info.run_id

    def run_url_hint(self, run_id: str) -> str:
        """The run's page in the MLflow UI, relative to the UI's address (every selfsup run
        lives in the one experiment)."""
        return f"#/experiments/{self._experiment_id()}/runs/{run_id}"

    def progress(self, run_id: str) -> Progress:
        metrics = self.client.get_run(run_id).data.metrics
        return Progress(
            epoch=int(metrics["train.epoch"]) if "train.epoch" in metrics else None,
            step=int(metrics["train.step"]) if "train.step" in metrics else None,
            loss=metrics.get("train.loss"),
            samples_per_sec=metrics.get("train.samples_per_sec"),
        )

    def run_metrics_and_tags(self, run_id: str) -> tuple[dict[str, float], dict[str, str]]:
        data = self.client.get_run(run_id).data
        return dict(data.metrics), dict(data.tags)

    def mark_run(self, run_id: str, status: RunStatus) -> None:
        run = self.client.get_run(run_id)
        if run.info.status in ("RUNNING", "SCHEDULED"):
            with self._writes:
                self.client.set_terminated(run_id, status=RunStatus.to_string(status))

    def requeue_run(self, run_id: str) -> None:
        """A preempted job's run waits to be continued (MLflow's SCHEDULED), not ended."""
        with self._writes:
            self.client.update_run(run_id, status="SCHEDULED")

    def reopen_run(self, run_id: str) -> None:
        """A retried job logs into its run again."""
        with self._writes:
            self.client.update_run(run_id, status="RUNNING")

    def archive_logs(self, run_id: str, attempt: int, text: str) -> None:
        """An attempt's Ray logs as an artifact of the job's run: Ray forgets finished jobs
        (a new head, a cleanup), MLflow keeps them."""
        with self._writes:
            self.client.log_text(run_id, text, _log_path(attempt))

    def archived_logs(self, run_id: str, attempt: int) -> str | None:
        """The logs ``archive_logs`` kept for that attempt, or None."""
        with tempfile.TemporaryDirectory(prefix="selfsup-logs-") as scratch:
            try:
                path = self.client.download_artifacts(run_id, _log_path(attempt), scratch)
                return Path(path).read_text()
            except (MlflowException, OSError):
                return None

    def delete_run(self, run_id: str) -> None:
        with self._writes:
            self.client.delete_run(run_id)

    # ---- registry -------------------------------------------------------------------------

    def model_versions(self, name: str | None = None) -> list[ModelVersionView]:
        query = f"name='{name}'" if name else ""
        try:
            versions = self.client.search_model_versions(query)
        except MlflowException as error:
            raise TrackingError(f"cannot read the model registry at {self.uri}: {error}") from None
        aliases: dict[tuple[str, str], list[str]] = {}
        for model_name in {version.name for version in versions}:
            for alias, version in self.client.get_registered_model(model_name).aliases.items():
                aliases.setdefault((model_name, str(version)), []).append(alias)
        views = [
            ModelVersionView(
                name=version.name,
                version=str(version.version),
                aliases=sorted(aliases.get((version.name, str(version.version)), [])),
                run_id=version.run_id,
                tags=dict(version.tags),
                created_at_ms=version.creation_timestamp,
                description=version.description or "",
                model_id=version.model_id or _logged_model_id(version.source),
            )
            for version in versions
        ]
        return sorted(views, key=lambda view: (view.name, int(view.version)))


def _logged_model_id(source: str | None) -> str | None:
    """The logged model a version was registered from. MLflow 3's SQL registry leaves the
    version's ``model_id`` empty; its source is then ``models:/<model id>``."""
    match = re.fullmatch(r"models:/(m-[0-9a-f]+)", source or "")
    return match[1] if match else None


class Accounts:
    """Users and registry permissions on an MLflow server that runs the basic-auth app
    (`mlflow server --app-name basic-auth`), managed with an MLflow admin's credentials
    (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in this process's environment).

    selfsup's rule: a registered model is written (new versions, aliases) only by the users
    granted it, who are the owners of the jobs that registered it, and by admins.

    The app's REST API is called directly: MLflow's own client for it imports the whole
    server package (~4 s), which `selfsup token create` would pay on every call."""

    WRITE = ("EDIT", "MANAGE")

    def __init__(self, tracking_uri: str) -> None:
        self.uri = tracking_uri
        self.tracking = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    @staticmethod
    def on(tracking_uri: str, env: Mapping[str, str] = os.environ) -> bool:
        """Whether this process manages accounts: an HTTP tracking server and credentials."""
        return tracking_uri.startswith(("http://", "https://")) and bool(
            env.get("MLFLOW_TRACKING_USERNAME")
        )

    def _call(self, method: str, endpoint: str, **request: Any) -> dict[str, Any]:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        response = http_request(get_default_host_creds(self.uri), endpoint, method, **request)
        verify_rest_response(response, endpoint)
        return response.json() if response.content else {}

    def set_password(self, user: str, password: str, admin: bool) -> None:
        """Make ``user``'s account, or give the one there this password; and the role."""
        account = {"username": user, "password": password}
        try:
            try:
                self._call("POST", "/api/2.0/mlflow/users/create", json=account)
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                self._call("PATCH", "/api/2.0/mlflow/users/update-password", json=account)
            role = {"username": user, "is_admin": admin}
            self._call("PATCH", "/api/2.0/mlflow/users/update-admin", json=role)
        except MlflowException as error:
            raise TrackingError(f"cannot set up the MLflow account {user}: {error}") from None

    def may_write_model(self, user: str, model: str) -> bool:
        """True if ``model`` is not registered yet, or ``user`` may write it."""
        try:
            self.tracking.get_registered_model(model)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return True
            raise
        query = {"username": user, "resource_type": "registered_model", "resource_id": model}
        try:
            found = self._call("GET", "/api/3.0/mlflow/users/permissions/get", params=query)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":  # no MLflow account at all
                return False
            raise
        return found.get("permission") in self.WRITE

    def grant_model(self, user: str, model: str) -> None:
        """Let ``user`` write ``model`` (MANAGE: versions, aliases, and who else may)."""
        if not self.may_write_model(user, model):
            grant = {
                "username": user,
                "resource_type": "registered_model",
                "resource_id": model,
                "permission": "MANAGE",
            }
            self._call("POST", "/api/3.0/mlflow/users/permissions/grant", json=grant)
