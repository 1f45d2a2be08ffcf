"""The submit path without Ray: a submit stores the job and answers before its MLflow run
exists; the controller's loop makes one run per queued job (two controllers on one store
included), none for a job cancelled first. Real SQLite stores and MLflow; the queue paused
so no job is handed to Ray."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.pretrain import checkpoint_config
from pipelines.spec import SpecError, apply_overrides, load_spec_text
from service import controller as controller_module
from service.auth import USER, Principal
from service.controller import PAUSED_FLAG, Controller
from service.settings import ServerSettings
from service.store import JobState, utcnow

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


def test_a_job_waits_for_its_dependencies_and_fails_with_theirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(controller_module, "SUBMITS_QUIET_S", 0.0)
    controller = paused_controller(tmp_path)
    first, _ = controller.submit(ALICE, TINY)
    second, _ = controller.submit(ALICE, TINY + f"depends_on: [{first.id}]\n")
    assert controller.store.get(second.id).depends_on == first.id
    held, broken = controller._dependencies()
    assert held == {second.id: f"waits for {first.id} (QUEUED) to succeed (depends_on)"}
    assert not broken
    # Only jobs the user sees, and that may still succeed, can be waited for.
    bobs, _ = controller.submit(Principal("bob", USER), TINY)
    for missing in ("job-000000000000", bobs.id):
        with pytest.raises(SpecError, match=f"no job {missing} visible to you"):
            controller.submit(ALICE, TINY + f"depends_on: [{missing}]\n")
    with pytest.raises(SpecError, match="lists a job twice"):
        controller.submit(ALICE, TINY + f"depends_on: [{first.id}, {first.id}]\n")

    # Once the first has succeeded, the second is admitted like any job.
    controller.store.transition(first.id, [JobState.QUEUED], JobState.SUCCEEDED, "test", "done")
    controller.set_paused(False)
    held, _ = controller._dependencies()
    assert second.id not in held and second.id in [job.id for job in controller.plan(held).admit]
    controller.set_paused(True)

    # A job whose dependency is cancelled fails at the loop's next turn, saying why.
    doomed_dependency, _ = controller.submit(ALICE, TINY)
    dependent, _ = controller.submit(ALICE, TINY + f"depends_on: [{doomed_dependency.id}]\n")
    controller.cancel(ALICE, doomed_dependency.id)
    controller.tick()
    failed = controller.store.get(dependent.id)
    assert failed.state == JobState.FAILED
    assert (
        failed.message == f"depends_on: {doomed_dependency.id} CANCELLED, so this job will not run"
    )
    (run,) = runs_named(controller, dependent.id)
    assert run.info.status == "FAILED"
    with pytest.raises(SpecError, match="is CANCELLED: it will not succeed"):
        controller.submit(ALICE, TINY + f"depends_on: [{doomed_dependency.id}]\n")


def test_checkpoints_past_retention_are_deleted_once(tmp_path: Path) -> None:
    """With ``checkpoint_retention_days``, the loop deletes <storage_path>/<job id> of jobs that
    ended longer ago than that, each once (the store keeps how far it got); recent, queued
    and unknown folders stay. How many checkpoints a job keeps while it runs is its spec's
    ``train.keep_checkpoints``, which is not part of what its config hash says trains."""
    controller = paused_controller(tmp_path)
    controller.settings = controller.settings.model_copy(update={"checkpoint_retention_days": 7})
    old, _ = controller.submit(ALICE, TINY)
    recent, _ = controller.submit(ALICE, TINY)
    queued, _ = controller.submit(ALICE, TINY)
    for job in (old, recent):
        controller.cancel(ALICE, job.id)
    now = utcnow()
    controller.store.update(old.id, finished_at=now - timedelta(days=10))
    storage = Path(controller.settings.storage_path)
    for name in (old.id, recent.id, queued.id, "not-a-job"):
        (storage / name / "checkpoint_000000").mkdir(parents=True)
        (storage / name / "checkpoint_000000" / "state.pt").write_bytes(b"state")

    assert controller.collect_checkpoints(now) == [old.id]
    assert not (storage / old.id).exists()
    assert all((storage / name).is_dir() for name in (recent.id, queued.id, "not-a-job"))
    assert controller.collect_checkpoints(now) == []  # nothing new has passed retention
    # Ten days on, the recent one has too.
    assert controller.collect_checkpoints(now + timedelta(days=10)) == [recent.id]

    kept = load_spec_text(apply_overrides(TINY, ["train.keep_checkpoints=5"]))
    assert kept.train.keep_checkpoints == 5
    assert kept.config_hash() == load_spec_text(TINY).config_hash()
    # Keep-best: Ray Train keeps the N lowest epoch losses (and the latest, to resume from).
    best = load_spec_text(apply_overrides(TINY, ["train.keep_by=lowest_loss"]))
    config = checkpoint_config(best.train)
    assert (config.num_to_keep, config.checkpoint_score_attribute) == (2, "loss")
    assert config.checkpoint_score_order == "min" and best.config_hash() == kept.config_hash()
    assert checkpoint_config(kept.train).checkpoint_score_attribute is None


def test_an_elastic_job_is_stored_with_its_range_and_planned_at_what_fits(tmp_path: Path) -> None:
    """The 2-CPU cluster: a gang of 1 to 3 one-CPU workers is accepted (its least fits) and
    planned with 2; one whose least is 3 is refused at submit."""
    controller = paused_controller(tmp_path)
    elastic = apply_overrides(
        TINY,
        [
            "resources.workers={min: 1, max: 3}",
            "resources.cpus_per_worker=1",
            "train.batch_size=240",
        ],
    )
    job, _ = controller.submit(ALICE, elastic)
    stored = controller.store.get(job.id)
    assert (stored.workers, stored.min_workers, stored.max_workers, stored.cpus) == (3, 1, 3, 3.0)
    controller.set_paused(False)
    (admitted,) = controller.plan().admit
    assert (admitted.id, admitted.workers, admitted.cpus) == (job.id, 2, 2.0)
    with pytest.raises(SpecError, match="the job needs 3 CPUs and 0 GPUs at once"):
        controller.submit(ALICE, apply_overrides(elastic, ["resources.workers={min: 3, max: 4}"]))


def test_the_loop_writes_why_a_job_waits_where_the_api_reads_it(tmp_path: Path) -> None:
    """The loop and the API run in processes of their own (service/server.py): the API reads
    a queued job's wait from the store, as the loop's latest turn wrote it, and a job queued
    again has its earlier wait cleared until the loop plans it anew."""
    loop = paused_controller(tmp_path)
    loop.settings = loop.settings.model_copy(update={"max_workers_per_user": 1})
    api = Controller(loop.settings)
    two_workers = apply_overrides(TINY, ["resources.workers=2", "resources.cpus_per_worker=1"])
    job, _ = api.submit(ALICE, two_workers)
    assert api.waiting_reason(api.get(ALICE, job.id)) == "the queue is paused by an admin"
    loop.tick()
    assert api.store.get(job.id).waiting == "the queue is paused by an admin"
    loop.set_paused(False)
    loop.tick()
    capped = "user alice has 0 workers running; this job's 2 more would pass the per-user cap of 1"
    assert api.waiting_reason(api.get(ALICE, job.id)) == capped
    api.cancel(ALICE, job.id)
    api.retry(ALICE, job.id)
    assert api.store.get(job.id).waiting is None  # queued again: not planned yet
    loop.tick()  # the same plan as before it left the queue, written again
    assert api.waiting_reason(api.get(ALICE, job.id)) == capped
    assert api.estimated_start(api.get(ALICE, job.id)) is None  # nothing runs to estimate from
