"""Admission, as a pure function of the queue, what runs, and the cluster's size.

Order: effective priority (the spec's priority plus ``aging_per_minute`` for every minute a
job has waited, so a low-priority job is never starved forever), then age. A job is admitted
as a gang: all its workers' CPUs and GPUs must fit what the cluster has free, or none start.

Strict order for capacity: when the head of the queue does not fit, nothing behind it is
admitted, so a stream of narrow jobs can never starve a wide one. A job held back by its
owner's cap on running workers does not block the others: the cap is about fairness between
users, not about the cluster.

Preemption (``Policy.preemption = "lower_priority"``): when the head of the queue does not
fit, running jobs of lower priority (both the spec's and the effective one, so the victims
queue behind it again and cannot take their room back) are chosen to make room: lowest
priority first, then the latest started, who lose the least work; no more than needed, and
none if even all of them would not make room. The controller stops them and requeues them;
they resume from their latest checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, tzinfo
from typing import Literal

from service.store import Admissible, aware

Schedulable = Admissible  # what admission reads of a job; the tests pass look-alikes


def _training_cpus(job: Schedulable) -> float:
    """The CPUs the job's Train workers take on the nodes that train."""
    return job.cpus if job.worker_cpus is None else job.worker_cpus


@dataclass(frozen=True)
class Resources:
    """What the cluster has (or has free): CPUs, GPUs, and ``training_cpus``, the units of
    the settings' worker_resource that the nodes that train offer (unlimited without one)."""

    cpus: float
    gpus: float
    training_cpus: float = math.inf

    def fits(self, job: Schedulable) -> bool:
        return (
            job.cpus <= self.cpus + 1e-9
            and job.gpus <= self.gpus + 1e-9
            and _training_cpus(job) <= self.training_cpus + 1e-9
        )

    def minus(self, job: Schedulable) -> Resources:
        return Resources(
            self.cpus - job.cpus, self.gpus - job.gpus, self.training_cpus - _training_cpus(job)
        )

    def plus(self, job: Schedulable) -> Resources:
        return Resources(
            self.cpus + job.cpus, self.gpus + job.gpus, self.training_cpus + _training_cpus(job)
        )


@dataclass(frozen=True)
class Policy:
    aging_per_minute: float = 0.1
    max_workers_per_user: int | None = None
    paused: bool = False
    # Fair share: priority a job loses for each worker its owner already runs, divided by
    # the owner's weight (1 unless ``user_weights`` says otherwise). 0: no fair share.
    fair_share_per_worker: float = 0.0
    user_weights: Mapping[str, float] = field(default_factory=dict)
    preemption: Literal["never", "lower_priority"] = "never"
    # An elastic job grows (a restart from its latest checkpoint) only after running this long
    # at its size, so that capacity freeing in steps does not restart it at every step.
    grow_after_s: float = 60.0

    def share_penalty(self, owner: str, running_workers: int) -> float:
        return self.fair_share_per_worker * running_workers / self.user_weights.get(owner, 1.0)


@dataclass
class Plan:
    admit: list[Schedulable] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)  # job id -> why it waits
    blocked: Schedulable | None = None  # the first job that waits for capacity
    free: Resources | None = None  # what is free once the admitted jobs start
    preempt: list[Schedulable] = field(default_factory=list)  # running jobs to stop for blocked
    grow: list[Schedulable] = field(default_factory=list)  # running elastic jobs, at their new size


def end_estimate(
    started_at: datetime, epochs_done: int | None, epochs: int, now: datetime
) -> datetime | None:
    """When a running job ends if its remaining epochs go as fast as its first ones went
    (start-up included, so rather late than early); None before an epoch has ended."""
    if not epochs_done:
        return None
    elapsed = max((now - started_at).total_seconds(), 0.0)
    return now + timedelta(seconds=elapsed * max(epochs - epochs_done, 0) / epochs_done)


def start_estimate(
    job: Schedulable, free: Resources, ending: list[tuple[datetime | None, Schedulable]]
) -> datetime | None:
    """When ``job`` fits, if the running jobs end when estimated: the end of the one whose
    resources complete the gang. None if that one (or one before it) has no estimate yet."""
    for end, running in sorted(ending, key=lambda pair: (pair[0] is None, pair[0] or 0)):
        if end is None:
            return None
        free = free.plus(running)
        if free.fits(job):
            return end
    return None


def _effective_priorities(
    jobs: Iterable[Schedulable], policy: Policy, now: datetime, penalty: Mapping[str, float]
) -> list[tuple[float, float]]:
    """Each job's effective priority, and how long it has waited in seconds: the spec's
    priority, plus aging, minus the owner's fair-share penalty for the workers they run."""
    # Each job's time is subtracted from "now" in its own tzinfo: SQLite hands back naive
    # UTC times (a datetime.replace per job was most of a decision's time with 10,000
    # queued), PostgreSQL times in the connection's zone, and two times of one tzinfo object
    # subtract without calling utcoffset() on either (4x faster). One loop here, not a
    # function called per job: the calls were a third of the queue's sort.
    now = aware(now)
    now_in: dict[tzinfo | None, datetime] = {None: now.replace(tzinfo=None)}
    aging_per_s = policy.aging_per_minute / 60
    ranked = []
    for job in jobs:
        created = job.created_at
        if (same_zone_now := now_in.get(created.tzinfo)) is None:
            same_zone_now = now_in[created.tzinfo] = now.astimezone(created.tzinfo)
        waited_s = (same_zone_now - created).total_seconds()
        priority = job.priority + aging_per_s * max(0.0, waited_s) - penalty.get(job.owner, 0.0)
        ranked.append((priority, waited_s))
    return ranked


def _penalties(policy: Policy, running_workers: Mapping[str, int] | None) -> dict[str, float]:
    return {
        owner: policy.share_penalty(owner, workers)
        for owner, workers in (running_workers or {}).items()
    }


def queue_order(
    queued: list[Schedulable],
    now: datetime,
    policy: Policy,
    running_workers: Mapping[str, int] | None = None,
) -> list[Schedulable]:
    """Highest effective priority first, then the longest waiting."""
    ranked = _effective_priorities(queued, policy, now, _penalties(policy, running_workers))
    keyed = sorted(
        (-priority, -waited_s, index) for index, (priority, waited_s) in enumerate(ranked)
    )
    return [queued[index] for _, _, index in keyed]


def victims(
    blocked: Schedulable,
    active: list[Schedulable],
    free: Resources,
    policy: Policy,
    now: datetime,
    running_workers: Mapping[str, int],
) -> list[Schedulable]:
    """The running jobs to stop so that ``blocked`` fits ``free``: those below it in spec and
    in effective priority (as they would be once queued again, their own workers no longer
    counted against their owner's share), lowest first, then latest started; none if they
    cannot make room."""
    penalty = _penalties(policy, running_workers)
    (rank, _), *ranked = _effective_priorities([blocked, *active], policy, now, penalty)
    requeued_rank = {
        job.id: priority + policy.share_penalty(job.owner, job.workers)
        for job, (priority, _) in zip(active, ranked, strict=True)
    }

    candidates = sorted(
        (job for job in active if job.priority < blocked.priority and requeued_rank[job.id] < rank),
        key=lambda job: (job.priority, -aware(job.started_at or now).timestamp()),
    )
    chosen: list[Schedulable] = []
    for job in candidates:
        if free.fits(blocked):
            break
        chosen.append(job)
        free = free.plus(job)
    if not free.fits(blocked):
        return []
    # Greedy order can over-shoot (a wide job chosen before the narrow one that was enough):
    # give back, latest chosen first, every victim the gang fits without.
    for job in reversed(list(chosen)):
        if free.minus(job).fits(blocked):
            chosen.remove(job)
            free = free.minus(job)
    return chosen


def sized(job: Schedulable, workers: int) -> Schedulable:
    """An elastic job as a gang of ``workers``: CPUs and GPUs per worker as at its current
    size, the CPUs that decode its data unchanged."""
    if workers == job.workers:
        return job
    per_worker = _training_cpus(job) / job.workers
    return replace(
        job,
        workers=workers,
        cpus=job.cpus - _training_cpus(job) + per_worker * workers,
        gpus=job.gpus / job.workers * workers,
        worker_cpus=per_worker * workers,
    )


def _largest_fit(job: Schedulable, free: Resources, workers_left: float) -> Schedulable | None:
    """The job at the most workers of its range that fit ``free`` and the owner's cap."""
    low, high = (job.min_workers, job.max_workers) if job.min_workers else (job.workers,) * 2
    for workers in range(min(high or job.workers, int(min(workers_left, 1 << 20))), low - 1, -1):
        if free.fits(candidate := sized(job, workers)):
            return candidate
    return None


def plan(
    queued: list[Schedulable],
    active: list[Schedulable],
    total: Resources,
    policy: Policy,
    now: datetime,
    held: Mapping[str, str] | None = None,
) -> Plan:
    """Which queued jobs to start now (an elastic one at the most workers that fit), and for
    each other one, why it waits; and when no job waits for capacity, which running elastic
    jobs grow into what is free. ``held`` maps the jobs that wait for other jobs to why: they
    are not admitted and, since capacity is not what they wait for, block no one behind them."""
    held = held or {}
    result = Plan()
    if policy.paused:
        result.waiting = {job.id: "the queue is paused by an admin" for job in queued}
        return result
    free = total
    workers_by_owner: dict[str, int] = {}
    for job in active:
        free = free.minus(job)
        workers_by_owner[job.owner] = workers_by_owner.get(job.owner, 0) + job.workers
    blocker: Schedulable | None = None
    ordered = queue_order(queued, now, policy, dict(workers_by_owner))
    cap = policy.max_workers_per_user
    for position, job in enumerate(ordered, start=1):
        owned = workers_by_owner.get(job.owner, 0)
        smallest = sized(job, job.min_workers) if job.min_workers else job
        if job.id in held:
            result.waiting[job.id] = held[job.id]
        elif cap is not None and owned + smallest.workers > cap:
            result.waiting[job.id] = (
                f"user {job.owner} has {owned} workers running; this job's {smallest.workers} "
                f"more would pass the per-user cap of {cap}"
            )
        elif blocker is not None:
            result.waiting[job.id] = (
                f"position {position} in the queue, behind {blocker.id}, which waits for "
                "capacity (no job jumps ahead of a gang that does not fit)"
            )
        elif (fitted := _largest_fit(job, free, math.inf if cap is None else cap - owned)) is None:
            blocker = result.blocked = smallest
            result.waiting[job.id] = _capacity_reason(smallest, free, total)
        else:
            result.admit.append(fitted)
            free = free.minus(fitted)
            workers_by_owner[job.owner] = owned + fitted.workers
    if blocker is None:
        free = _grow(active, free, workers_by_owner, policy, now, result)
    result.free = free
    if blocker is not None and policy.preemption == "lower_priority":
        result.preempt = victims(blocker, active, free, policy, now, workers_by_owner)
        if result.preempt:
            result.waiting[blocker.id] += "; preempting " + ", ".join(
                f"{job.id} (priority {job.priority})" for job in result.preempt
            )
    return result


def _capacity_reason(job: Schedulable, free: Resources, total: Resources) -> str:
    least = f" (at least {job.workers} workers)" if job.min_workers else ""
    reason = (
        f"waiting for capacity: the gang{least} needs {job.cpus:g} CPUs and {job.gpus:g} GPUs "
        f"at once; free now {max(free.cpus, 0):g} CPUs and {max(free.gpus, 0):g} GPUs "
        f"of {total.cpus:g} and {total.gpus:g}"
    )
    if _training_cpus(job) > free.training_cpus + 1e-9:
        reason += (
            f"; its workers need {_training_cpus(job):g} CPUs on the nodes that train, "
            f"{max(free.training_cpus, 0):g} free there of {total.training_cpus:g}"
        )
    return reason


def _grow(
    active: list[Schedulable],
    free: Resources,
    workers_by_owner: dict[str, int],
    policy: Policy,
    now: datetime,
    result: Plan,
) -> Resources:
    """Running elastic jobs below their most, that have run ``grow_after_s`` at their size,
    grow into what no queued job waits for, the longest running first; the free left."""
    growable = [
        job
        for job in active
        if job.max_workers
        and job.workers < job.max_workers
        and job.started_at is not None
        and (aware(now) - aware(job.started_at)).total_seconds() >= policy.grow_after_s
    ]
    for job in sorted(growable, key=lambda job: aware(job.started_at or now)):
        cap = policy.max_workers_per_user
        owned = workers_by_owner.get(job.owner, 0) - job.workers
        grown = _largest_fit(job, free.plus(job), math.inf if cap is None else cap - owned)
        if grown is not None and grown.workers > job.workers:
            result.grow.append(grown)
            free = free.plus(job).minus(grown)
            workers_by_owner[job.owner] = owned + grown.workers
    return free
