"""The job store, on SQLite and on a real PostgreSQL server: compare-and-set transitions and
the append-only transition log."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine, text, update

from service import store as store_module
from service.auth import ADMIN, Authenticator, AuthError, authenticate, create_token
from service.store import ACTIVE_STATES, REREAD_OVERLAP, Job, JobState, JobStore, utcnow


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
        workers=2,
        cpus=2.0,
        gpus=0.0,
        attempts=0,
        created_at=now,
        updated_at=now,
    )


def test_transition_is_compare_and_set_and_logged(store_url: str) -> None:
    store = JobStore(store_url)
    store.add(new_job("job-1"), actor="alice", reason="submitted")

    assert not store.transition("job-1", [JobState.RUNNING], JobState.SUCCEEDED, "ctl")
    assert store.transition("job-1", [JobState.QUEUED], JobState.RUNNING, "ctl", "admitted")
    assert store.get("job-1").state == JobState.RUNNING
    assert not store.transition("job-1", [JobState.QUEUED], JobState.RUNNING, "ctl")
    assert not store.transition("missing", [JobState.QUEUED], JobState.RUNNING, "ctl")

    log = [(t.from_state, t.to_state, t.actor, t.reason) for t in store.transitions("job-1")]
    assert log == [(None, "QUEUED", "alice", "submitted"), ("QUEUED", "RUNNING", "ctl", "admitted")]


def test_only_one_of_many_racing_writers_moves_a_job(store_url: str) -> None:
    JobStore(store_url).add(new_job("job-1"), actor="alice", reason="submitted")

    def attempt(worker: int) -> bool:
        # A store per thread: separate connections, as separate CLI processes would have.
        return JobStore(store_url).transition(
            "job-1", [JobState.QUEUED], JobState.RUNNING, f"w{worker}", "race"
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(attempt, range(16)))
    assert outcomes.count(True) == 1
    moves = [t for t in JobStore(store_url).transitions("job-1") if t.to_state == "RUNNING"]
    assert len(moves) == 1


def test_state_survives_a_new_store_on_the_same_database(store_url: str) -> None:
    JobStore(store_url).add(new_job("job-1"), actor="alice", reason="submitted")
    JobStore(store_url).transition("job-1", [JobState.QUEUED], JobState.CANCELLED, "alice", "no")
    reopened = JobStore(store_url)
    assert [job.id for job in reopened.list([JobState.CANCELLED])] == ["job-1"]
    assert reopened.list([JobState.QUEUED]) == []


def test_an_idempotency_key_names_one_job_per_owner(store_url: str) -> None:
    store = JobStore(store_url)

    def keyed(job_id: str, owner: str, key: str) -> Job:
        job = new_job(job_id)
        job.owner, job.idempotency_key = owner, key
        return job

    assert store.add(keyed("job-1", "alice", "k"), actor="alice", reason="submitted")
    assert store.add(keyed("job-2", "alice", "k"), actor="alice", reason="again") is None
    assert store.add(keyed("job-3", "bob", "k"), actor="bob", reason="another owner")
    assert store.by_key("alice", "k").id == "job-1"
    assert store.get("job-2") is None and store.transitions("job-2") == []
    assert store.count() == 2


def test_tokens_are_stored_as_hashes_and_map_to_users(store_url: str) -> None:
    store = JobStore(store_url)
    token = create_token(store, "alice", ADMIN)
    principal = authenticate(store, f"Bearer {token}")
    assert (principal.user, principal.is_admin) == ("alice", True)
    with create_engine(store_url).connect() as connection:
        stored = connection.execute(text("SELECT digest FROM api_tokens")).scalars().all()
    assert token not in stored and len(stored) == 1
    for header in (None, "", token, "Basic abc", f"Bearer {token}x"):
        with pytest.raises(AuthError):
            authenticate(store, header)
    assert store.revoke_tokens("alice") == 1
    with pytest.raises(AuthError):
        authenticate(store, f"Bearer {token}")


def test_a_server_remembers_a_token_for_a_bounded_time_and_never_an_unknown_one(
    store_url: str,
) -> None:
    store = JobStore(store_url)
    token = create_token(store, "alice")
    server = Authenticator(store, remember_s=0.5)
    assert server(f"Bearer {token}").user == "alice"
    assert store.revoke_tokens("alice") == 1
    assert server(f"Bearer {token}").user == "alice"  # remembered, within the bound
    time.sleep(0.6)
    with pytest.raises(AuthError, match="unknown or revoked"):
        server(f"Bearer {token}")
    later = create_token(store, "bob")  # a token made after a miss is found at once
    assert server(f"Bearer {later}").user == "bob"


def test_admission_reads_see_every_change_by_any_process(store_url: str) -> None:
    """After its first read, schedulable() reads only the rows changed since: changes made
    through another store object (another process) are seen all the same."""
    loop, api = JobStore(store_url), JobStore(store_url)
    for job_id in ("job-1", "job-2"):
        api.add(new_job(job_id), actor="alice", reason="submitted")
    queued = [JobState.QUEUED]
    assert [job.id for job in loop.schedulable(queued)] == ["job-1", "job-2"]
    assert loop.schedulable(list(ACTIVE_STATES)) == []
    assert api.transition("job-1", queued, JobState.STARTING, "ctl", workers=3, cpus=3.0)
    assert [job.id for job in loop.schedulable(queued)] == ["job-2"]
    (started,) = loop.schedulable(list(ACTIVE_STATES))
    assert (started.id, started.workers, started.cpus) == ("job-1", 3, 3.0)
    api.transition("job-1", list(ACTIVE_STATES), JobState.QUEUED, "ctl", workers=1, cpus=1.0)
    again = {job.id: job for job in loop.schedulable(queued)}
    assert set(again) == {"job-1", "job-2"}
    assert (again["job-1"].workers, again["job-1"].cpus) == (1, 1.0)
    assert loop.schedulable(list(ACTIVE_STATES)) == []


def test_admission_reads_catch_late_commits_and_read_every_job_now_and_then(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its first read, schedulable() reads the rows changed since its last read, and a
    little before (a write that took its updated_at before another's that committed first);
    every job is read again every _FULL_READ_EVERY_S, whatever their updated_at says."""
    loop, api = JobStore(store_url), JobStore(store_url)
    api.add(new_job("job-1"), actor="alice", reason="submitted")
    queued = [JobState.QUEUED]

    def priority_seen() -> int:
        (job,) = loop.schedulable(queued)
        return job.priority

    def write_late(priority: int, age: float) -> None:
        """A change committed now whose updated_at is ``age`` overlaps before now."""
        with api.engine.begin() as connection:
            connection.execute(
                update(Job)
                .where(Job.id == "job-1")
                .values(priority=priority, updated_at=utcnow() - age * REREAD_OVERLAP)
            )

    assert priority_seen() == 0
    write_late(7, age=0.5)
    assert priority_seen() == 7
    write_late(9, age=2)
    assert priority_seen() == 7  # too late even for the overlap: ...
    monkeypatch.setattr(store_module, "_FULL_READ_EVERY_S", 0.0)
    assert priority_seen() == 9  # ... until the next read of every job
