"""Admission as a pure function: gangs never over-commit, priority then age, aging, per-user
caps, a reason for every job that waits, and which running jobs a blocked one preempts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from service.scheduler import (
    Policy,
    Resources,
    end_estimate,
    plan,
    queue_order,
    start_estimate,
)

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


@dataclass
class FakeJob:  # the scheduler's Schedulable protocol; the store's Job has the same fields
    id: str
    owner: str = "alice"
    priority: int = 0
    created_at: datetime = NOW
    workers: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    worker_cpus: float | None = None
    started_at: datetime | None = None
    min_workers: int | None = None
    max_workers: int | None = None


def test_priority_then_age() -> None:
    old_low = FakeJob("old-low", priority=0, created_at=NOW - timedelta(seconds=30))
    new_high = FakeJob("new-high", priority=5)
    old_high = FakeJob("old-high", priority=5, created_at=NOW - timedelta(seconds=10))
    order = queue_order([old_low, new_high, old_high], NOW, Policy(aging_per_minute=0))
    assert [job.id for job in order] == ["old-high", "new-high", "old-low"]


def test_aging_lifts_a_long_waiting_low_priority_job() -> None:
    starving = FakeJob("starving", priority=0, created_at=NOW - timedelta(hours=2))
    fresh = FakeJob("fresh", priority=10)
    policy = Policy(aging_per_minute=0.1)  # 2 h = 120 min -> +12
    assert [job.id for job in queue_order([fresh, starving], NOW, policy)] == [
        "starving",
        "fresh",
    ]
    no_aging = Policy(aging_per_minute=0)
    assert queue_order([fresh, starving], NOW, no_aging)[0].id == "fresh"


def test_gang_that_does_not_fit_waits_and_blocks_those_behind_it() -> None:
    running = [FakeJob("running", cpus=1)]
    wide = FakeJob("wide", priority=5, workers=2, cpus=2)
    narrow = FakeJob("narrow", priority=0, cpus=1)
    result = plan([wide, narrow], running, Resources(2, 0), Policy(), NOW)
    assert result.admit == []
    assert "needs 2 CPUs" in result.waiting["wide"] and "free now 1 CPUs" in result.waiting["wide"]
    assert "behind wide" in result.waiting["narrow"]


def test_gpus_are_part_of_the_gang() -> None:
    gpu_job = FakeJob("gpu", cpus=1, gpus=2)
    result = plan([gpu_job], [], Resources(8, 1), Policy(), NOW)
    assert result.admit == [] and "2 GPUs" in result.waiting["gpu"]


def test_per_user_cap_holds_back_only_that_user() -> None:
    running = [FakeJob("a1", owner="alice", workers=2, cpus=2)]
    alice_next = FakeJob("a2", owner="alice", priority=9, workers=1, cpus=1)
    bob = FakeJob("b1", owner="bob", workers=1, cpus=1)
    result = plan([alice_next, bob], running, Resources(8, 0), Policy(max_workers_per_user=2), NOW)
    assert [job.id for job in result.admit] == ["b1"]
    assert "per-user cap of 2" in result.waiting["a2"]


def test_training_cpus_are_counted_apart_when_only_some_nodes_train() -> None:
    """A head with 1 CPU and three one-CPU worker nodes: 4 CPUs, 3 of them train. Two gangs
    of two one-CPU workers fit the CPUs but not the training nodes: the second waits."""
    total = Resources(4, 0, training_cpus=3)
    first = FakeJob("first", workers=2, cpus=2, worker_cpus=2)
    second = FakeJob("second", workers=2, cpus=2, worker_cpus=2)
    result = plan([first, second], [], total, Policy(aging_per_minute=0), NOW)
    assert [job.id for job in result.admit] == ["first"]
    assert (
        "its workers need 2 CPUs on the nodes that train, 1 free there of 3"
        in (result.waiting["second"])
    )
    older = FakeJob("older", cpus=3)  # stored before worker_cpus: all its CPUs count
    assert not Resources(4, 0, training_cpus=2).fits(older)


def test_a_running_jobs_end_is_estimated_from_its_epochs_so_far() -> None:
    started = NOW - timedelta(minutes=10)
    assert end_estimate(started, 2, 10, NOW) == NOW + timedelta(minutes=40)  # 5 min an epoch
    assert end_estimate(started, None, 10, NOW) is None  # no epoch has ended yet
    assert end_estimate(started, 10, 10, NOW) == NOW


def test_the_first_waiting_gang_starts_when_enough_running_jobs_end() -> None:
    """Free 1 CPU; running jobs of 1 and 2 CPUs end in 5 and 20 minutes: a 3-CPU gang fits
    once both have ended, a 2-CPU gang after the first; unknown ends give no estimate."""
    soon, late = NOW + timedelta(minutes=5), NOW + timedelta(minutes=20)
    small, big = FakeJob("small", cpus=1), FakeJob("big", cpus=2)
    free = Resources(1, 0)
    ending = [(late, big), (soon, small)]
    assert start_estimate(FakeJob("w3", cpus=3), free, ending) == late
    assert start_estimate(FakeJob("w2", cpus=2), free, ending) == soon
    assert start_estimate(FakeJob("w4", cpus=4), free, [(None, big), (soon, small)]) is None
    assert start_estimate(FakeJob("w9", cpus=9), free, ending) is None  # never fits
    waiting = [FakeJob("wide", cpus=4)]
    result = plan(waiting, [small, big], Resources(4, 0), Policy(), NOW)
    assert result.blocked is waiting[0] and result.free == Resources(1, 0)


def test_fair_share_puts_the_user_running_less_first() -> None:
    """alice runs 4 workers, bob none; alice's next job has priority 1, bob's 0. Without
    fair share alice's goes first; with 0.5 a worker she loses 2 and bob's goes first; with
    weight 4 she loses only 0.5 and hers goes first again."""
    running = [FakeJob("a-running", owner="alice", workers=4, cpus=4)]
    alice = FakeJob("alice-next", owner="alice", priority=1)
    bob = FakeJob("bob-next", owner="bob")
    total = Resources(5, 0)  # one more one-CPU job fits
    share = {"aging_per_minute": 0, "fair_share_per_worker": 0.5}
    for policy, first in (
        (Policy(aging_per_minute=0), "alice-next"),
        (Policy(**share), "bob-next"),
        (Policy(**share, user_weights={"alice": 4}), "alice-next"),
    ):
        admitted = plan([alice, bob], running, total, policy, NOW).admit
        assert [job.id for job in admitted] == [first], policy


def test_paused_queue_admits_nothing() -> None:
    result = plan([FakeJob("j")], [], Resources(8, 0), Policy(paused=True), NOW)
    assert result.admit == [] and "paused" in result.waiting["j"]


job_strategy = st.builds(
    FakeJob,
    id=st.uuids().map(str),
    owner=st.sampled_from(["alice", "bob", "carol"]),
    priority=st.integers(-5, 5),
    created_at=st.integers(0, 3600).map(lambda s: NOW - timedelta(seconds=s)),
    workers=st.integers(1, 4),
    cpus=st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.0]),
    gpus=st.sampled_from([0.0, 0.0, 1.0, 2.0]),
    worker_cpus=st.one_of(st.none(), st.sampled_from([0.5, 1.0, 2.0])),
)


@settings(max_examples=200, deadline=None)
@given(
    waiting=st.lists(job_strategy, max_size=25),
    running=st.lists(job_strategy, max_size=3),
    cpus=st.sampled_from([2.0, 4.0, 8.0, 16.0]),
    gpus=st.sampled_from([0.0, 1.0, 4.0]),
    cap=st.one_of(st.none(), st.integers(1, 8)),
    training=st.sampled_from([math.inf, 1.0, 3.0, 8.0]),
)
def test_plan_never_overcommits_and_explains_every_wait(
    waiting: list[FakeJob],
    running: list[FakeJob],
    cpus: float,
    gpus: float,
    cap: int | None,
    training: float,
) -> None:
    total = Resources(cpus, gpus, training)
    result = plan(waiting, running, total, Policy(max_workers_per_user=cap), NOW)
    admitted_ids = {job.id for job in result.admit}
    # Every queued job is either admitted whole or has a reason, never both.
    assert admitted_ids.isdisjoint(result.waiting)
    assert admitted_ids | set(result.waiting) == {job.id for job in waiting}
    # What runs after admission fits beside what ran before it (a gang fits whole or waits).
    used_cpus = sum(job.cpus for job in running)
    used_gpus = sum(job.gpus for job in running)

    def trains(job: FakeJob) -> float:
        return job.cpus if job.worker_cpus is None else job.worker_cpus

    used_training = sum(trains(job) for job in running)
    if used_cpus <= cpus and used_gpus <= gpus and used_training <= training:
        assert used_cpus + sum(j.cpus for j in result.admit) <= cpus + 1e-9
        assert used_gpus + sum(j.gpus for j in result.admit) <= gpus + 1e-9
        assert used_training + sum(trains(j) for j in result.admit) <= training + 1e-9
    # No user passes the cap through what is admitted now.
    if cap is not None:
        for owner in {job.owner for job in result.admit}:
            before = sum(job.workers for job in running if job.owner == owner)
            added = sum(job.workers for job in result.admit if job.owner == owner)
            assert before + added <= max(cap, before)
            assert added == 0 or before + added <= cap
    # Admission follows queue order up to the first gang that does not fit.
    order = [job.id for job in queue_order(waiting, NOW, Policy())]
    admitted_positions = [order.index(job.id) for job in result.admit]
    assert admitted_positions == sorted(admitted_positions)


PREEMPTING = Policy(aging_per_minute=0, preemption="lower_priority")


def running_job(name: str, priority: int, minutes_ago: int, cpus: float = 1.0) -> FakeJob:
    started = NOW - timedelta(minutes=minutes_ago)
    return FakeJob(name, priority=priority, created_at=started, cpus=cpus, started_at=started)


def test_a_blocked_job_preempts_the_lowest_priority_then_the_latest_started() -> None:
    old_low = running_job("old-low", 0, minutes_ago=30)
    new_low = running_job("new-low", 0, minutes_ago=2)
    middle = running_job("middle", 3, minutes_ago=1)
    active = [old_low, new_low, middle]
    one = FakeJob("urgent", priority=5, cpus=1)
    result = plan([one], active, Resources(3, 0), PREEMPTING, NOW)
    assert result.admit == [] and [job.id for job in result.preempt] == ["new-low"]
    assert "preempting new-low (priority 0)" in result.waiting["urgent"]
    two = FakeJob("urgent", priority=5, cpus=2)
    assert [j.id for j in plan([two], active, Resources(3, 0), PREEMPTING, NOW).preempt] == [
        "new-low",
        "old-low",
    ]
    # Off by default; equal priority is never preempted; nor is anything if it cannot help.
    assert plan([two], active, Resources(3, 0), Policy(aging_per_minute=0), NOW).preempt == []
    assert (
        plan([FakeJob("same", priority=0)], active, Resources(3, 0), PREEMPTING, NOW).preempt == []
    )
    four = FakeJob("huge", priority=3, cpus=4)  # the two below it free 3 of the 4 CPUs
    assert plan([four], active, Resources(4, 0), PREEMPTING, NOW).preempt == []


def test_preemption_gives_back_victims_the_gang_fits_without() -> None:
    narrow = running_job("narrow", 0, minutes_ago=1, cpus=1)
    wide = running_job("wide", 1, minutes_ago=1, cpus=2)
    blocked = FakeJob("blocked", priority=5, cpus=2)
    result = plan([blocked], [narrow, wide], Resources(3, 0), PREEMPTING, NOW)
    assert [job.id for job in result.preempt] == ["wide"]  # narrow was chosen first, then freed


def test_a_victim_that_would_queue_ahead_of_the_blocked_job_is_not_preempted() -> None:
    """Aging lifted the running job's effective priority above the newcomer's: stopping it
    would only requeue it ahead, to take its room back and be stopped again."""
    aged = FakeJob("aged", priority=0, created_at=NOW - timedelta(hours=3), started_at=NOW)
    newcomer = FakeJob("newcomer", priority=10)
    policy = Policy(aging_per_minute=0.1, preemption="lower_priority")  # 180 min -> +18
    assert plan([newcomer], [aged], Resources(1, 0), policy, NOW).preempt == []


@settings(max_examples=200, deadline=None)
@given(
    waiting=st.lists(job_strategy, max_size=10),
    running=st.lists(job_strategy, max_size=6),
    cpus=st.sampled_from([4.0, 8.0, 16.0]),
    gpus=st.sampled_from([0.0, 4.0]),
)
def test_preemption_frees_just_enough_and_only_of_lower_priority(
    waiting: list[FakeJob], running: list[FakeJob], cpus: float, gpus: float
) -> None:
    total = Resources(cpus, gpus)
    result = plan(waiting, running, total, PREEMPTING, NOW)
    if not result.preempt:
        return
    blocked = result.blocked
    assert blocked is not None
    assert all(job.priority < blocked.priority for job in result.preempt)
    assert len({job.id for job in result.preempt}) == len(result.preempt)
    assert {job.id for job in result.preempt} <= {job.id for job in running}
    free = result.free
    assert free is not None and not free.fits(blocked)
    for job in result.preempt:
        free = free.plus(job)
    assert free.fits(blocked)  # once the victims are gone, the gang fits ...
    for job in result.preempt:  # ... and it would not with any one of them left running
        assert not free.minus(job).fits(blocked)


def elastic(
    name: str, low: int, high: int, workers: int | None = None, **fields: object
) -> FakeJob:
    """An elastic gang of one CPU a worker and half a CPU decoding data, at ``workers``."""
    size = workers or high
    return FakeJob(
        name,
        workers=size,
        cpus=size + 0.5,
        worker_cpus=float(size),
        min_workers=low,
        max_workers=high,
        **fields,
    )


def test_an_elastic_job_starts_with_the_most_workers_that_fit() -> None:
    job = elastic("elastic", 2, 4)
    (admitted,) = plan([job], [], Resources(3.5, 0), Policy(), NOW).admit
    assert (admitted.workers, admitted.cpus, admitted.worker_cpus) == (3, 3.5, 3.0)
    capped = plan([job], [], Resources(8, 0), Policy(max_workers_per_user=2), NOW).admit
    assert [j.workers for j in capped] == [2]  # the owner's cap bounds the size too
    narrow = FakeJob("narrow", created_at=NOW + timedelta(seconds=1))
    waiting = plan([job, narrow], [], Resources(2, 0), Policy(aging_per_minute=0), NOW)
    assert (
        waiting.admit == []
        and "the gang (at least 2 workers) needs 2.5 CPUs" in waiting.waiting["elastic"]
    )
    assert waiting.blocked is not None and waiting.blocked.workers == 2
    assert "behind elastic" in waiting.waiting["narrow"]  # its minimum blocks the queue


def test_a_running_elastic_job_grows_when_no_one_waits_for_capacity() -> None:
    settled = elastic("settled", 2, 4, workers=2, started_at=NOW - timedelta(minutes=5))
    fresh = elastic("fresh", 2, 4, workers=2, started_at=NOW - timedelta(seconds=10))
    (grown,) = plan([], [settled, fresh], Resources(8, 0), Policy(), NOW).grow
    assert (grown.id, grown.workers, grown.cpus) == ("settled", 4, 4.5)  # fresh: too soon
    wide = FakeJob("wide", cpus=4)
    behind_a_waiter = plan([wide], [settled, fresh], Resources(8, 0), Policy(), NOW)
    assert behind_a_waiter.grow == [] and "capacity" in behind_a_waiter.waiting["wide"]


@settings(max_examples=200, deadline=None)
@given(
    queued=st.lists(
        st.tuples(st.integers(1, 3), st.integers(0, 3), st.integers(-2, 2)), max_size=6
    ),
    running=st.lists(
        st.tuples(st.integers(1, 3), st.integers(0, 3), st.integers(0, 10)), max_size=4
    ),
    cpus=st.sampled_from([2.0, 5.0, 9.0]),
)
def test_elastic_sizes_stay_in_range_and_never_overcommit(
    queued: list[tuple[int, int, int]], running: list[tuple[int, int, int]], cpus: float
) -> None:
    waiting = [
        elastic(f"q{i}", low, low + extra, priority=priority)
        for i, (low, extra, priority) in enumerate(queued)
    ]
    active = [
        elastic(f"r{i}", low, low + extra, workers=low, started_at=NOW - timedelta(minutes=minutes))
        for i, (low, extra, minutes) in enumerate(running)
    ]
    result = plan(waiting, active, Resources(cpus, 0), Policy(), NOW)
    for job in [*result.admit, *result.grow]:
        assert job.min_workers <= job.workers <= job.max_workers
        assert job.cpus == job.workers + 0.5 and job.worker_cpus == job.workers
    grown = {job.id: job for job in result.grow}
    after = [grown.get(job.id, job) for job in active] + result.admit
    if sum(job.cpus for job in active) <= cpus:
        assert sum(job.cpus for job in after) <= cpus + 1e-9
    assert not (result.grow and result.blocked)  # growth only when no one waits for room
