"""The submit path without Ray: a submit stores the job and answers before its MLflow run
exists; the controller's loop makes one run per queued job (two controllers on one store
included), none for a job cancelled first. Real SQLite stores and MLflow; the queue paused
so no job is handed to Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from service import controller as controller_module
from service.auth import USER, Principal
from service.controller import PAUSED_FLAG, Controller
from service.settings import ServerSettings
from service.store import JobState

TINY = (Path(__file__).parent / "specs" / "tiny-pca.yaml").read_text()
ALICE = Principal("alice", USER)


def paused_controller(folder: Path) -> Controller:
    settings = ServerSettings(
        store_url=f"sqlite:///{folder / 'jobs.db'}",
        tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
        artifact_root=str(folder / "artifacts"),
        storage_path=str(folder / "runs"),
        ray_dashboard_url="http://127.0.0.1:9",  # never called: nothing is admitted
        cluster_cpus=2,
        cluster_gpus=0,
    )
    controller = Controller(settings)
    controller.set_paused(True)
    return controller


def runs_named(controller: Controller, job_id: str) -> list:
    client = MlflowClient(controller.settings.tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`selfsup.job_id` = '{job_id}'")


def test_a_submit_answers_first_and_the_loop_makes_one_run_per_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop waits for a pause in submits before making runs; this test submits, then
    # runs turns by hand.
    monkeypatch.setattr(controller_module, "SUBMITS_QUIET_S", 0.0)
    first = paused_controller(tmp_path)
    second = Controller(first.settings)  # another controller process on the same store
    kept, created = first.submit(ALICE, TINY, key="k1")
    again, created_again = first.submit(ALICE, TINY, key="k1")
    cancelled, _ = first.submit(ALICE, TINY, key="k2")
    assert created and not created_again and again.id == kept.id
    assert kept.mlflow_run_id is None  # answered before the run exists
    first.cancel(ALICE, cancelled.id)

    second.tick()  # makes the queued job's run; none for the cancelled one
    stored = first.store.get(kept.id)
    assert stored.state == JobState.QUEUED and stored.mlflow_run_id
    # The first controller, still holding the job as it was before, loses the race to
    # record a run: it deletes the one it made and takes the recorded one.
    assert first._open_run(kept) == stored.mlflow_run_id
    first.tick()
    (run,) = runs_named(first, kept.id)
    assert run.info.run_id == stored.mlflow_run_id
    assert run.data.params["method.name"] == "pca" and run.info.run_name == kept.id
    assert first.store.get(cancelled.id).mlflow_run_id is None
    assert runs_named(first, cancelled.id) == []
    assert first.store.flag(PAUSED_FLAG) == "true"
