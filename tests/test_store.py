"""The job store: compare-and-set transitions and the append-only transition log."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service.store import Job, JobState, JobStore, utcnow


def new_job(job_id: str) -> Job:
    now = utcnow()
    return Job(
        id=job_id,
        name="n",
        owner="alice",
        state=str(JobState.QUEUED),
        priority=0,
        spec_yaml="name: n",
        spec={"name": "n"},
        config_hash="abc",
        cpus=2.0,
        gpus=0.0,
        attempts=0,
        created_at=now,
        updated_at=now,
    )


def test_transition_is_compare_and_set_and_logged(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.add(new_job("job-1"), actor="alice", reason="submitted")

    assert not store.transition("job-1", [JobState.RUNNING], JobState.SUCCEEDED, "ctl")
    assert store.transition("job-1", [JobState.QUEUED], JobState.RUNNING, "ctl", "admitted")
    assert store.get("job-1").state == JobState.RUNNING
    assert not store.transition("job-1", [JobState.QUEUED], JobState.RUNNING, "ctl")
    assert not store.transition("missing", [JobState.QUEUED], JobState.RUNNING, "ctl")

    log = [(t.from_state, t.to_state, t.actor, t.reason) for t in store.transitions("job-1")]
    assert log == [(None, "QUEUED", "alice", "submitted"), ("QUEUED", "RUNNING", "ctl", "admitted")]


def test_only_one_of_many_racing_writers_moves_a_job(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    JobStore(url).add(new_job("job-1"), actor="alice", reason="submitted")

    def attempt(worker: int) -> bool:
        # A store per thread: separate connections, as separate CLI processes would have.
        return JobStore(url).transition(
            "job-1", [JobState.QUEUED], JobState.RUNNING, f"w{worker}", "race"
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(attempt, range(16)))
    assert outcomes.count(True) == 1
    moves = [t for t in JobStore(url).transitions("job-1") if t.to_state == "RUNNING"]
    assert len(moves) == 1


def test_state_survives_a_new_store_on_the_same_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    JobStore(url).add(new_job("job-1"), actor="alice", reason="submitted")
    JobStore(url).transition("job-1", [JobState.QUEUED], JobState.CANCELLED, "alice", "no")
    reopened = JobStore(url)
    assert [job.id for job in reopened.list([JobState.CANCELLED])] == ["job-1"]
    assert reopened.list([JobState.QUEUED]) == []
