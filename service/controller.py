"""The job controller: queues jobs, admits them as gangs, runs each as a Ray Job (submission
id = job id), follows them, retries what failed for reasons not the user's, and cancels.

User requests (submit, cancel, retry) come from the API's processes; `tick()` runs in the
server's loop, a process of its own (service/server.py). Every state change is a
compare-and-set in the store, and what the loop plans (why a job waits, when it should
start) is written there for the API to read. A cancel moves the job first and stops its Ray
job after; the loop, having handed a job to Ray, looks at its state again and stops what was
cancelled meanwhile: so a cancel can never slip between "admitted" and "handed to Ray". The
store and Ray are the whole truth: a controller that was killed and started again
reconciles every unfinished job with Ray's view of it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from pipelines import tags
from pipelines.evaluation_job import AnyJobSpec, EvaluationJobSpec, load_job_text
from pipelines.sources import source_problems
from pipelines.spec import JobSpec, SpecError, parse_spec
from service.auth import Principal
from service.checkpoints import delete_checkpoints
from service.errors import IdempotencyConflict, JobConflict, JobNotFound
from service.ray_jobs import RayJobPhase, RayJobs, submission_id
from service.registry import Registry, RegistryError, parse_reference
from service.scheduler import (
    Plan,
    Policy,
    Resources,
    Schedulable,
    end_estimate,
    plan,
    start_estimate,
)
from service.settings import ServerSettings
from service.store import ACTIVE_STATES, Job, JobState, JobStore, aware, utcnow
from service.sweeps import Sweeps
from service.tracking import Accounts, Progress, Tracking

CONTROLLER = "controller"
PAUSED_FLAG = "queue.paused"
CAPACITY_REFRESH_S = 30.0
PAUSED_REREAD_S = 1.0  # an API process reads the queue's pause again after this long
RUNS_PER_TURN_S = 0.5  # at most this long making new jobs' MLflow runs in one turn
# ... and only once no submit came for this long: the runs are CPU-heavy work that would
# take a core from a burst of submits and slow every answer down.
SUBMITS_QUIET_S = 0.2
CHECKPOINT_GC_EVERY_S = 3600.0  # how often the loop looks for checkpoints past retention
CHECKPOINTS_COLLECTED_UNTIL = "checkpoints.collected_until"  # the store flag: an ISO time


def ray_id(job: Job) -> str:
    """The Ray job of the job's latest attempt."""
    return submission_id(job.id, job.attempts)


_log = logging.getLogger(__name__)


def gang_resources(spec: JobSpec, workers: int | None = None) -> tuple[float, float]:
    """CPUs and GPUs the whole gang of workers (of ``workers``, default the most it may
    have) needs at once, with the CPUs that decode a user's images beside it."""
    resources = spec.resources
    workers = workers or resources.workers
    cpus = workers * resources.cpus_per_worker + (resources.data_cpus or 0.0)
    return cpus, workers * resources.gpus_per_worker


def data_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """What keeps a user's images (and labelled evaluation images) from being read: one
    bounded listing each, so a prefix of a million objects is checked in one page."""
    if not spec.data.is_user_data:
        return []
    columns = {"image_column": spec.data.image_column, "label_column": spec.data.label_column}
    problems = source_problems(spec.data.source, "data.source", **columns)
    if spec.evaluate.data is not None:
        problems += source_problems(spec.evaluate.data, "evaluate.data", **columns)
    return problems


class Controller:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.store = JobStore(settings.store_url)
        self.tracking = Tracking(settings.tracking_uri, settings.artifact_root)
        # With MLflow's auth on, the registry's write permissions follow the jobs' owners.
        on = Accounts.on(settings.tracking_uri)
        self.accounts = Accounts(settings.tracking_uri) if on else None
        self.ray = RayJobs(settings.ray_dashboard_url)
        self.sweeps = Sweeps(self)
        self._lock = threading.RLock()  # one user request or loop turn at a time in a process
        self._last_checkpoint_gc = -math.inf  # time.monotonic() of the latest collection
        self._capacity: tuple[float, Resources] | None = None
        self._paused: tuple[float, bool] | None = None  # (time.monotonic() read, paused)
        # The waits the loop last wrote to the store (job id -> (why, estimated start)): it
        # writes only what changed.
        self._waits_written: dict[str, tuple[str, datetime | None]] = {}
        self._epochs_done: dict[
            str, int
        ] = {}  # running job id -> epochs ended (the watchdog's read)

    # ---- the cluster ------------------------------------------------------------------------

    def _asks_ray(self) -> bool:
        """Whether the cluster's size comes from Ray, not from the settings alone."""
        settings = self.settings
        return (
            settings.cluster_cpus is None
            or settings.cluster_gpus is None
            or bool(settings.worker_resource)
        )

    def _capacity_cached(self) -> bool:
        """Whether ``capacity()`` answers without asking Ray."""
        fresh = self._capacity is not None and (
            time.monotonic() - self._capacity[0] <= CAPACITY_REFRESH_S
        )
        return fresh or not self._asks_ray()

    def capacity(self) -> Resources:
        """The cluster's whole size (settings first, else Ray's live nodes), briefly cached,
        with the units of the settings' worker_resource that the nodes that train offer."""
        now = time.monotonic()
        if self._capacity is None or now - self._capacity[0] > CAPACITY_REFRESH_S:
            cpus, gpus = self.settings.cluster_cpus, self.settings.cluster_gpus
            units = math.inf  # no worker_resource: any node trains
            if self._asks_ray():
                totals = self.ray.cluster_resources()
                cpus = totals.get("CPU", 0.0) if cpus is None else cpus
                gpus = totals.get("GPU", 0.0) if gpus is None else gpus
                if self.settings.worker_resource:
                    units = totals.get(self.settings.worker_resource, 0.0)
            self._capacity = (now, Resources(cpus, gpus, units))
        return self._capacity[1]

    def policy(self) -> Policy:
        return Policy(
            aging_per_minute=self.settings.aging_per_minute,
            max_workers_per_user=self.settings.max_workers_per_user,
            paused=self.store.flag(PAUSED_FLAG) == "true",
            fair_share_per_worker=self.settings.fair_share_per_worker,
            user_weights=self.settings.user_weights,
            preemption=self.settings.preemption,
            grow_after_s=self.settings.elastic_grow_after_s,
        )

    def set_paused(self, paused: bool) -> None:
        self.store.set_flag(PAUSED_FLAG, "true" if paused else "false")
        self._paused = (time.monotonic(), paused)

    def queue_paused(self) -> bool:
        """Whether an admin paused the queue, as read at most ``PAUSED_REREAD_S`` ago in this
        process: what a new job's status says before the loop's next turn plans it."""
        now = time.monotonic()
        if self._paused is None or now - self._paused[0] > PAUSED_REREAD_S:
            self._paused = (now, self.store.flag(PAUSED_FLAG) == "true")
        return self._paused[1]

    # ---- user requests ----------------------------------------------------------------------

    def validate(self, principal: Principal, spec_text: str) -> tuple[AnyJobSpec, float, float]:
        """Every submit-time check, nothing stored: the spec, its data source listed, the jobs
        it depends on, its gang against the cluster. The spec and the gang's CPUs and GPUs; a
        SpecError if it fails."""
        spec = load_job_text(spec_text)
        return (spec, *self.check(principal, spec))

    def check(self, principal: Principal, spec: AnyJobSpec) -> tuple[float, float]:
        """The checks of a parsed spec beyond its own fields; the gang's CPUs and GPUs."""
        if isinstance(spec, EvaluationJobSpec):
            return self._check_evaluation(principal, spec)
        if problems := data_problems(spec) + self._dependency_problems(principal, spec):
            raise SpecError(problems)
        # An elastic gang must fit at its smallest; it is admitted with as many as fit.
        fewest = spec.resources.sizes[0]
        cpus, gpus = gang_resources(spec, fewest)
        total = self.capacity()
        if cpus > total.cpus + 1e-9 or gpus > total.gpus + 1e-9:
            raise SpecError(
                [
                    (
                        "resources",
                        f"the job needs {cpus:g} CPUs and {gpus:g} GPUs at once; the cluster "
                        f"has {total.cpus:g} CPUs and {total.gpus:g} GPUs",
                    )
                ]
            )
        asked = fewest * spec.resources.cpus_per_worker
        if asked > total.training_cpus + 1e-9:
            raise SpecError(
                [
                    (
                        "resources",
                        f"the gang's workers take {asked:g} CPUs at once on nodes that train "
                        f"(offering {self.settings.worker_resource}); the cluster's have "
                        f"{total.training_cpus:g}",
                    )
                ]
            )
        return gang_resources(spec)

    def _check_evaluation(
        self, principal: Principal, spec: EvaluationJobSpec
    ) -> tuple[float, float]:
        """The encoder is registered (unless a job it depends on may register it), the data
        source can be read, the CPUs exist."""
        problems = self._dependency_problems(principal, spec)
        try:
            if not spec.depends_on:
                Registry(self.settings.tracking_uri).resolve(parse_reference(spec.encoder))
        except RegistryError as error:
            problems.append(("encoder", str(error)))
        if spec.data and spec.data.startswith(("file://", "s3://")):
            problems += source_problems(spec.data, "data")
        if spec.resources.cpus > (cpus := self.capacity().cpus) + 1e-9:
            problems.append(("resources.cpus", f"the cluster has {cpus:g} CPUs"))
        if problems:
            raise SpecError(problems)
        return spec.resources.cpus, 0.0

    def checks_reach_out(self, spec: AnyJobSpec) -> bool:
        """Whether checking ``spec`` may wait on more than the store: a listing of a folder or
        of S3, MLflow's registry, or Ray for the cluster's size."""
        if isinstance(spec, EvaluationJobSpec):
            return True
        return spec.data.is_user_data or not self._capacity_cached()  # as data_problems

    def submit(
        self, principal: Principal, spec_text: str, key: str | None = None
    ) -> tuple[Job, bool]:
        """Validate, then store the job QUEUED; (job, True) if new, (the key's earlier job,
        False) if the key was seen. A SpecError leaves nothing behind."""
        return self.submit_spec(principal, load_job_text(spec_text), spec_text, key)

    def submit_spec(
        self, principal: Principal, spec: AnyJobSpec, spec_text: str, key: str | None = None
    ) -> tuple[Job, bool]:
        """``submit`` of a spec already parsed from ``spec_text``."""
        cpus, gpus = self.check(principal, spec)
        job = self.new_job(principal, spec, spec_text, (cpus, gpus), key)
        # The job's MLflow run is made by the loop (``_open_runs``), not here: a submit
        # answers as soon as the job is stored, never waiting on the tracking store's lock.
        # Insert first, look up on a clash: a repeated key costs the lookup, a new job not.
        added = self.store.add(job, actor=principal.user, reason="submitted")
        if added is None:  # the key names a job stored before (by this or another request)
            return self._by_key(principal, key or "", spec_text), False
        return added, True

    def new_job(
        self,
        principal: Principal,
        spec: AnyJobSpec,
        spec_text: str,
        gang: tuple[float, float],
        key: str | None = None,
        sweep_id: str | None = None,
    ) -> Job:
        """A QUEUED job, not stored yet, for a checked spec and its gang's CPUs and GPUs."""
        now = utcnow()
        job = Job(
            id=f"job-{uuid.uuid4().hex[:12]}",
            name=spec.name,
            owner=principal.user,
            idempotency_key=key,
            state=str(JobState.QUEUED),
            priority=spec.priority,
            spec_yaml=spec_text,
            spec=spec.model_dump(mode="json"),
            config_hash=spec.config_hash(),
            cpus=gang[0],
            gpus=gang[1],
            max_retries=spec.max_retries,
            depends_on=" ".join(spec.depends_on) or None,
            sweep_id=sweep_id,
            created_at=now,
            updated_at=now,
        )
        if isinstance(spec, EvaluationJobSpec):  # the driver alone: no Train workers
            job.kind, job.workers, job.worker_cpus = spec.kind, 0, 0.0
            return job
        resources = spec.resources
        job.kind, job.workers = "pretrain", resources.workers
        job.worker_cpus = resources.workers * resources.cpus_per_worker
        job.min_workers = resources.min_workers
        job.max_workers = resources.workers if resources.min_workers else None
        return job

    def _dependency_problems(self, principal: Principal, spec: JobSpec) -> list[tuple[str, str]]:
        """depends_on names jobs the user can see that may still succeed."""
        problems = []
        for position, job_id in enumerate(spec.depends_on):
            job = self.store.get(job_id)
            if job is None or not principal.may_see(job.owner):
                problems.append((f"depends_on.{position}", f"no job {job_id} visible to you"))
            elif job.state in (JobState.FAILED, JobState.CANCELLED):
                problems.append(
                    (f"depends_on.{position}", f"{job_id} is {job.state}: it will not succeed")
                )
        return problems

    def _by_key(self, principal: Principal, key: str, spec_text: str) -> Job | None:
        job = self.store.by_key(principal.user, key)
        if job is not None and job.spec_yaml != spec_text:
            raise IdempotencyConflict(
                f"idempotency key {key!r} was used for job {job.id} with a different spec"
            )
        return job

    def get(self, principal: Principal, job_id: str) -> Job:
        """A job the principal may see; another user's job is as unknown as a missing one."""
        job = self.store.get(job_id)
        if job is None or not principal.may_see(job.owner):
            raise JobNotFound(f"no job {job_id!r} visible to {principal.user}")
        return job

    def list(
        self,
        principal: Principal,
        everyone: bool = False,
        states: list[JobState] | None = None,
        name_contains: str | None = None,
        since: datetime | None = None,
    ) -> list[Job]:
        owner = None if (everyone and principal.is_admin) else principal.user
        return self.store.list(states, owner, name_contains, since)

    def cancel(self, principal: Principal, job_id: str) -> Job:
        """Stop the Ray job if one runs; checkpoints and the MLflow run stay (marked killed)."""
        with self._lock:
            # The state first, Ray after: the loop, which may admit the job meanwhile in its
            # own process, stops the Ray job it handed over if it finds the job cancelled.
            while True:
                job = self.get(principal, job_id)
                state = JobState(job.state)
                if state.is_final:
                    raise JobConflict(f"job {job_id} is already {job.state}")
                if self.store.transition(
                    job_id,
                    [state],
                    JobState.CANCELLED,
                    principal.user,
                    f"cancelled by {principal.user}",
                    finished_at=utcnow(),
                    message=f"cancelled by {principal.user}",
                ):
                    break  # else the loop moved it meanwhile: cancel from its new state
            if state in ACTIVE_STATES:
                self.ray.stop(ray_id(job))
            if job.mlflow_run_id:
                self.tracking.mark_run(job.mlflow_run_id, RunStatus.KILLED)
            return self.get(principal, job_id)

    def retry(self, principal: Principal, job_id: str) -> Job:
        """Requeue a failed or cancelled job under the same id: it resumes from its latest
        checkpoint and keeps logging into the same MLflow run."""
        with self._lock:
            job = self.get(principal, job_id)
            if job.state not in (JobState.FAILED, JobState.CANCELLED):
                raise JobConflict(
                    f"job {job_id} is {job.state}: only FAILED or CANCELLED jobs can be retried"
                )
            self.store.transition(
                job_id,
                [JobState(job.state)],
                JobState.QUEUED,
                principal.user,
                f"retried by {principal.user}",
                finished_at=None,
                message=None,
                retries=0,
                not_before=None,
            )
            return self.get(principal, job_id)

    def _preempt(self, job_id: str, blocked: Schedulable | None) -> None:
        """Stop a running job to make room for ``blocked``, and queue it again under the same
        id: it resumes from its latest checkpoint, in the same MLflow run, when it is admitted
        again. The transition says who preempted whom."""
        job = self.store.get(job_id)
        if job is None or blocked is None:
            return
        self._stop_attempt(job)
        reason = (
            f"preempted by {blocked.id} (priority {blocked.priority} over {job.priority}): "
            "queued again, to resume from its latest checkpoint"
        )
        if (
            self.store.transition(
                job.id, ACTIVE_STATES, JobState.QUEUED, CONTROLLER, reason, message=reason
            )
            and job.mlflow_run_id
        ):
            self.tracking.requeue_run(job.mlflow_run_id)

    def logs(self, job: Job) -> str:
        """The job's logs: those of its latest attempt, from Ray while it knows the attempt,
        else as archived in the job's MLflow run when the attempt ended; empty before the
        first attempt."""
        if job.attempts == 0:
            return ""
        if self.ray.view(ray_id(job)).phase is not RayJobPhase.MISSING:
            return self.ray.logs(ray_id(job))
        if job.mlflow_run_id:
            return self.tracking.archived_logs(job.mlflow_run_id, job.attempts) or ""
        return ""

    def _stop_attempt(self, job: Job) -> None:
        """End the job's running attempt in Ray, its logs kept, for another to follow."""
        self.ray.stop(ray_id(job))
        self._archive_logs(job)

    def _archive_logs(self, job: Job) -> None:
        """Keep the ending attempt's logs in MLflow. Best effort: the job ends either way."""
        if not job.mlflow_run_id or job.attempts == 0:
            return
        try:
            text = self.ray.logs(ray_id(job))
            self.tracking.archive_logs(job.mlflow_run_id, job.attempts, text)
        except Exception as error:  # noqa: BLE001 - Ray or MLflow away: the job still ends
            _log.warning("could not archive the logs of %s: %s", ray_id(job), error)

    def waiting_reason(self, job: Job) -> str | None:
        """Why a job waits, as the loop's latest plan says (planning again for every status
        request would cost a pass over the whole queue)."""
        if job.state == JobState.RETRYING and job.not_before:
            return f"retry backoff until {aware(job.not_before).isoformat(timespec='seconds')}"
        if job.state != JobState.QUEUED:
            return None
        if job.waiting:
            return job.waiting
        if self.queue_paused():
            return "the queue is paused by an admin"
        return "queued: the controller considers it at its next turn"

    def progress(self, job: Job) -> Progress | None:
        if job.state != JobState.RUNNING or not job.mlflow_run_id:
            return None
        return self.tracking.progress(job.mlflow_run_id)

    def run_url(self, job: Job) -> str | None:
        base = self.settings.mlflow_ui_url or (
            self.settings.tracking_uri if self.settings.tracking_uri.startswith("http") else None
        )
        if not job.mlflow_run_id or base is None:
            return None
        return base.rstrip("/") + "/" + self.tracking.run_url_hint(job.mlflow_run_id)

    # ---- the loop's one turn ----------------------------------------------------------------

    def tick(self) -> None:
        """Make new jobs' MLflow runs, reconcile active jobs with Ray, requeue retries whose
        backoff is over, admit."""
        self._open_runs()
        with self._lock:
            now = utcnow()
            active = self.store.list(ACTIVE_STATES)
            for job in active:
                self._reconcile(job, now)
            running = {job.id for job in active}
            self._epochs_done = {k: v for k, v in self._epochs_done.items() if k in running}
            for job in self.store.list([JobState.RETRYING]):
                if job.not_before is None or aware(job.not_before) <= now:
                    self.store.transition(
                        job.id,
                        [JobState.RETRYING],
                        JobState.QUEUED,
                        CONTROLLER,
                        "backoff over: requeued",
                    )
            if time.monotonic() - self._last_checkpoint_gc > CHECKPOINT_GC_EVERY_S:
                self._last_checkpoint_gc = time.monotonic()
                self.collect_checkpoints(now)
            held, broken = self._dependencies()
            for job_id, reason in broken.items():
                self._fail_queued(job_id, reason)
            held = self.sweeps.tick() | held  # a trial waits for its sweep's slot, or as above
            decision = self.plan(held)
            self._record_waits(decision, now)
            for victim in decision.preempt:  # the blocked job starts on a later turn
                self._preempt(victim.id, decision.blocked)
            for admitted in decision.admit:
                job = self.store.get(admitted.id)
                if job is not None:
                    self._start(job, admitted)
            for grown in decision.grow:
                self._grow(grown)

    def plan(self, held: dict[str, str] | None = None) -> Plan:
        return plan(
            self.store.schedulable([JobState.QUEUED]),
            self.store.schedulable(ACTIVE_STATES),
            self.capacity(),
            self.policy(),
            utcnow(),
            held,
        )

    def _record_waits(self, decision: Plan, now: datetime) -> None:
        """Write to the store why each queued job waits and when the first one waiting for
        capacity should start: what changed since the last turn, in one statement."""
        waits = {job_id: (reason, None) for job_id, reason in decision.waiting.items()}
        if (estimate := self._estimate_start(decision, now)) is not None:
            blocked, start = estimate
            waits[blocked] = (
                f"{waits[blocked][0]}; estimated to start at about {start:%Y-%m-%d %H:%M:%S} "
                "UTC, from the running jobs' progress",
                start,
            )
        # A job queued again since (retried, preempted) had its wait cleared by that move.
        cleared = self.store.unplanned(waits)
        changed = {
            job_id: wait
            for job_id, wait in waits.items()
            if job_id in cleared or self._waits_written.get(job_id) != wait
        }
        self.store.set_waiting(changed)
        self._waits_written = waits

    def _estimate_start(self, decision: Plan, now: datetime) -> tuple[str, datetime] | None:
        """When the first job that waits for capacity should start, from the running jobs'
        progress (scheduler.start_estimate): (its id, the time), if it can be told."""
        blocked = decision.blocked
        if blocked is None or decision.free is None:
            return None
        ending = [
            (
                end_estimate(
                    aware(job.started_at or now),
                    self._epochs_done.get(job.id),
                    job.spec["train"]["epochs"],
                    now,
                )
                if job.kind == "pretrain"
                else None,  # an evaluation reports no epochs
                job,
            )
            for job in self.store.list(ACTIVE_STATES)
        ]
        start = start_estimate(blocked, decision.free, ending)
        return None if start is None else (blocked.id, start)

    def estimated_start(self, job: Job) -> datetime | None:
        if job.state != JobState.QUEUED or job.estimated_start is None:
            return None
        return aware(job.estimated_start)

    def _dependencies(self) -> tuple[dict[str, str], dict[str, str]]:
        """Queued jobs that wait for others (id -> why), and those whose dependency ended
        without success (id -> why they fail), from one read of the dependencies' states."""
        waits = self.store.dependencies()
        states = self.store.states(job_id for ids in waits.values() for job_id in ids)
        held: dict[str, str] = {}
        broken: dict[str, str] = {}
        for job_id, ids in waits.items():
            ended = [d for d in ids if states.get(d) in (None, JobState.FAILED, JobState.CANCELLED)]
            pending = [d for d in ids if states.get(d) is not JobState.SUCCEEDED]
            if ended:
                what = ", ".join(f"{d} {states.get(d, 'was deleted')}" for d in ended)
                broken[job_id] = f"depends_on: {what}, so this job will not run"
            elif pending:
                what = ", ".join(f"{d} ({states[d]})" for d in pending)
                held[job_id] = f"waits for {what} to succeed (depends_on)"
        return held, broken

    def collect_checkpoints(self, now: datetime) -> list[str]:
        """Delete the checkpoints of jobs that ended more than ``checkpoint_retention_days``
        ago (since the last collection: the store keeps how far it got); the ids deleted. A
        job retried later starts from scratch. Registered encoders are MLflow's artifacts,
        elsewhere: untouched."""
        days = self.settings.checkpoint_retention_days
        if days is None:
            return []
        cutoff = now - timedelta(days=days)
        mark = self.store.flag(CHECKPOINTS_COLLECTED_UNTIL)
        since = datetime.fromisoformat(mark) if mark else datetime(1970, 1, 1, tzinfo=UTC)
        deleted = []
        for job_id in self.store.finished_between(since, cutoff):
            try:
                if delete_checkpoints(self.settings.storage_path, job_id):
                    deleted.append(job_id)
            except OSError as error:  # storage away: the next collection tries again
                _log.warning("could not delete the checkpoints of %s: %s", job_id, error)
                return deleted
        self.store.set_flag(CHECKPOINTS_COLLECTED_UNTIL, cutoff.isoformat())
        return deleted

    def _fail_queued(self, job_id: str, reason: str) -> None:
        """A queued job that will never be admitted: FAILED with the reason, its run too."""
        if self.store.transition(
            job_id,
            [JobState.QUEUED],
            JobState.FAILED,
            CONTROLLER,
            reason,
            finished_at=utcnow(),
            message=reason,
        ):
            job = self.store.get(job_id)
            if job is not None and job.mlflow_run_id:
                self.tracking.mark_run(job.mlflow_run_id, RunStatus.FAILED)

    def _open_runs(self) -> None:
        """MLflow runs for queued jobs that have none yet, oldest first, while submits are
        quiet and for at most ``RUNS_PER_TURN_S`` (a burst of submissions must not hold up the
        rest of the turn); admission makes the run of a job it admits before this did."""
        deadline = time.monotonic() + RUNS_PER_TURN_S

        def may_go_on() -> bool:
            latest = self.store.latest_submit()
            quiet = latest is None or (utcnow() - aware(latest)).total_seconds() >= SUBMITS_QUIET_S
            return quiet and time.monotonic() <= deadline

        if not may_go_on():  # not even the query while submits come in
            return
        for job in self.store.without_run(JobState.QUEUED, limit=100):
            if not may_go_on():
                return
            self._open_run(job)

    def _open_run(self, job: Job) -> str | None:
        """The job's MLflow run, made now if it has none; None if the job ended meanwhile."""
        if job.mlflow_run_id:
            return job.mlflow_run_id
        if job.kind == "pretrain":
            run_id = self.tracking.create_job_run(job.id, parse_spec(job.spec))
        else:
            run_tags = {tags.JOB_ID: job.id, tags.RUN_KIND: "evaluation"}
            run_id = self.tracking.create_evaluation_run(job.id, run_tags)
        if not self.store.set_run(job.id, run_id):  # another controller made it first
            self.tracking.delete_run(run_id)
        stored = self.store.get(job.id)
        if stored is None or JobState(stored.state).is_final:
            if stored is not None and stored.mlflow_run_id:
                self.tracking.mark_run(stored.mlflow_run_id, RunStatus.KILLED)
            return None
        return stored.mlflow_run_id

    def _start(self, job: Job, size: Schedulable) -> None:
        """Admit the job at ``size`` (an elastic gang's admitted number of workers)."""
        if self._open_run(job) is None:
            return
        if (refusal := self._registry_refusal(job)) is not None:
            self._fail_queued(job.id, refusal)
            return
        reason = "admitted: the gang fits"
        if job.min_workers:
            reason += f" with {size.workers} workers ({job.min_workers} to {job.max_workers})"
        self._begin_attempt(job, [JobState.QUEUED], size, reason)

    def _grow(self, size: Schedulable) -> None:
        """Restart a running elastic job with more workers, from its latest checkpoint."""
        job = self.store.get(size.id)
        if job is None or job.state != JobState.RUNNING:
            return
        self._stop_attempt(job)
        reason = (
            f"grows from {job.workers} to {size.workers} workers, as capacity freed: resumes "
            "from its latest checkpoint"
        )
        self._begin_attempt(job, [JobState.RUNNING], size, reason)

    def _begin_attempt(
        self, job: Job, states: list[JobState], size: Schedulable, reason: str
    ) -> None:
        """A new attempt of the job at ``size``, handed to Ray."""
        now = utcnow()
        moved = self.store.transition(
            job.id,
            states,
            JobState.STARTING,
            CONTROLLER,
            reason,
            started_at=now,
            attempts=job.attempts + 1,
            message=None,  # the last attempt's account (a failure, a preemption) is history
            progress_step=None,
            progress_at=now,  # the watchdog counts from the admission
            workers=size.workers,
            cpus=size.cpus,
            gpus=size.gpus,
            worker_cpus=size.worker_cpus,
        )
        if not moved:
            return
        admitted = self.store.get(job.id)  # with its run and the attempt's number
        if admitted is None:
            return
        self.tracking.reopen_run(admitted.mlflow_run_id)
        self._hand_over(admitted)
        after = self.store.get(job.id)
        if after is not None and JobState(after.state).is_final:  # cancelled meanwhile
            self.ray.stop(ray_id(admitted))

    def _registry_refusal(self, job: Job) -> str | None:
        """Why the job may not register its encoder where its spec says, if it may not: the
        model is another user's. Its driver writes with the controller's MLflow account, so
        the check is the controller's, before any training."""
        if self.accounts is None or job.kind != "pretrain":
            return None
        registration = parse_spec(job.spec).registration
        if registration is None:
            return None
        if self.accounts.may_write_model(job.owner, registration.model):
            return None
        return (
            f"register.model: {registration.model!r} is registered by another user, and "
            f"{job.owner} may not add versions to it (ask its owner or an admin for MLflow's "
            "EDIT permission on it, or choose another name)"
        )

    def _grant(self, job: Job, result: dict) -> str:
        """Let the owner write the model the job registered (before the job ends, so that a
        controller dying in between grants on its next look); a note if that failed."""
        if self.accounts is None or job.kind != "pretrain" or "model_name" not in result:
            return ""  # an evaluation names the model it read, and registers nothing
        try:
            self.accounts.grant_model(job.owner, result["model_name"])
        except MlflowException as error:
            return f" (but {job.owner} could not be given MLflow's write permission on it: {error})"
        return ""

    def _hand_over(self, job: Job) -> None:
        # The attempt's own size: an elastic gang runs with workers from its min to the
        # number admitted (Ray Train shrinks it on a lost node, and grows it back).
        spec = job.spec
        if job.kind == "pretrain":
            spec = {**spec, "resources": {**spec["resources"], "workers": job.workers}}
        payload = {
            "kind": job.kind,
            "job_id": job.id,
            "spec": spec,
            "run_id": job.mlflow_run_id,
            "tracking_uri": self.settings.tracking_uri,
            "storage_path": self.settings.storage_path,
            "worker_resource": self.settings.worker_resource,
        }
        entrypoint = f"{self.settings.driver_python} -m pipelines.driver"
        try:
            self.ray.submit(ray_id(job), entrypoint, env={"SELFSUP_JOB": json.dumps(payload)})
        except Exception as error:  # noqa: BLE001 - any failure to hand over is retried
            self._failed(job, f"could not submit to Ray: {error}", user_error=False)

    def _reconcile(self, job: Job, now: datetime) -> None:
        view = self.ray.view(ray_id(job))
        state = JobState(job.state)
        if view.phase is RayJobPhase.MISSING and state is JobState.STARTING:
            self._hand_over(job)  # the controller died between admitting and handing over
        elif view.phase is RayJobPhase.PENDING:
            return
        elif view.phase is RayJobPhase.RUNNING:
            if state is JobState.STARTING:
                self.store.transition(
                    job.id, [state], JobState.RUNNING, CONTROLLER, "the driver is running"
                )
            self._watch(job, now)
        elif view.phase is RayJobPhase.SUCCEEDED:
            result = self._result(job)
            self._end(job, JobState.SUCCEEDED, "finished" + self._grant(job, result), result=result)
        elif view.phase is RayJobPhase.STOPPED:
            self._end(job, JobState.CANCELLED, "stopped in Ray, outside selfsup")
        elif view.phase is RayJobPhase.MISSING:
            self._failed(job, "the Ray cluster no longer knows this job", user_error=False)
        else:
            reason, user_error = self._failure(job, view.message)
            self._failed(job, reason, user_error)

    def _watch(self, job: Job, now: datetime) -> None:
        """The watchdog: a running job whose training step has not moved for watchdog_s is
        stopped and handled as a failure that is not the user's. Evaluations report no steps."""
        if not job.mlflow_run_id or job.kind != "pretrain":
            return
        progress = self.tracking.progress(job.mlflow_run_id)
        if progress.epoch is not None:
            self._epochs_done[job.id] = progress.epoch + 1  # train.epoch: the epoch that ended
        step = progress.step
        if step is not None and step != job.progress_step:
            self.store.update(job.id, progress_step=step, progress_at=now)
            return
        since = aware(job.progress_at or job.started_at or now)
        if (now - since).total_seconds() > self.settings.watchdog_s:
            self.ray.stop(ray_id(job))
            self._failed(
                job,
                f"no training progress for {self.settings.watchdog_s:g} s (watchdog)",
                user_error=False,
            )

    def _failure(self, job: Job, ray_message: str) -> tuple[str, bool]:
        """The driver's own account of a failure, and whether it was the user's."""
        if job.mlflow_run_id:
            _, run_tags = self.tracking.run_metrics_and_tags(job.mlflow_run_id)
            if tags.ERROR in run_tags:
                kind = run_tags.get(tags.ERROR_KIND, tags.USER_ERROR)
                return run_tags[tags.ERROR], kind == tags.USER_ERROR
        # No account: the driver process itself died (killed, out of memory, node lost).
        return ray_message or "the driver exited without a reason", False

    def _failed(self, job: Job, reason: str, user_error: bool) -> None:
        if user_error or job.retries >= job.max_retries:
            note = "" if user_error or not job.max_retries else f" (after {job.retries} retries)"
            self._end(job, JobState.FAILED, reason + note)
            return
        self._archive_logs(job)
        delay = min(
            self.settings.retry_backoff_s * 2**job.retries, self.settings.retry_backoff_max_s
        )
        message = f"{reason}; retry {job.retries + 1} of {job.max_retries} in {delay:g} s"
        self.store.transition(
            job.id,
            ACTIVE_STATES,
            JobState.RETRYING,
            CONTROLLER,
            message,
            retries=job.retries + 1,
            not_before=utcnow() + timedelta(seconds=delay),
            message=message,
        )

    def _result(self, job: Job) -> dict:
        if not job.mlflow_run_id:
            return {}
        metrics, run_tags = self.tracking.run_metrics_and_tags(job.mlflow_run_id)
        result: dict = {
            key: value for key, value in metrics.items() if key.startswith(("eval.", "baseline."))
        }
        if (metric := self.sweeps.metric_of(job)) and metric in metrics:
            result[metric] = metrics[metric]  # what the trial's sweep ranks it by
        for key in (tags.MODEL_NAME, tags.MODEL_VERSION, tags.MODEL_ALIAS):
            if key in run_tags:
                result[key.removeprefix("selfsup.")] = run_tags[key]
        if tags.EVAL_SKIPPED in run_tags:  # a dataset without labels: say why there are no scores
            result["evaluation_skipped"] = run_tags[tags.EVAL_SKIPPED]
        return result

    def _end(self, job: Job, state: JobState, reason: str, result: dict | None = None) -> None:
        self._archive_logs(job)
        fields = {"finished_at": utcnow(), "message": reason}
        if result is not None:
            fields["result"] = result
        moved = self.store.transition(job.id, ACTIVE_STATES, state, CONTROLLER, reason, **fields)
        if moved and job.mlflow_run_id and state is not JobState.SUCCEEDED:
            status = RunStatus.KILLED if state is JobState.CANCELLED else RunStatus.FAILED
            self.tracking.mark_run(job.mlflow_run_id, status)
