"""The job controller, embedded form: validates and queues jobs, admits them as gangs when
their workers fit the cluster, runs each as a Ray Job, and reconciles its store with Ray.

It has no loop of its own yet: every CLI command that reads or changes jobs first calls
``tick()``, which reconciles running jobs and admits queued ones. That is enough for one
user on one machine, and the same methods serve a long-running server loop.
"""

from __future__ import annotations

import getpass
import json
import sys
import uuid
from dataclasses import dataclass

from mlflow.entities import RunStatus

from pipelines import tags
from pipelines.spec import JobSpec, SpecError, load_spec_text
from service.config import StackInfo, StatePaths
from service.ray_jobs import RayJobPhase, RayJobs
from service.stack import running_stack
from service.store import FINAL_STATES, Job, JobState, JobStore, utcnow
from service.tracking import Tracking


class JobNotFound(Exception):
    pass


class StackNotRunning(Exception):
    pass


class JobConflict(Exception):
    """The job is not in a state that allows the requested change."""


@dataclass(frozen=True)
class Capacity:
    cpus: float
    gpus: float

    def fits(self, job: Job) -> bool:
        return job.cpus <= self.cpus + 1e-9 and job.gpus <= self.gpus + 1e-9


def gang_resources(spec: JobSpec) -> tuple[float, float]:
    """CPUs and GPUs the whole gang of workers needs at once."""
    workers = spec.resources.workers
    return workers * spec.resources.cpus_per_worker, workers * spec.resources.gpus_per_worker


class Controller:
    def __init__(self, paths: StatePaths, actor: str | None = None) -> None:
        self.paths = paths
        paths.root.mkdir(parents=True, exist_ok=True)
        self.actor = actor or getpass.getuser()
        self.store = JobStore(paths.store_url)
        self.tracking = Tracking(paths.tracking_uri, paths.artifacts)

    # ---- the cluster ----------------------------------------------------------------------

    def stack(self) -> StackInfo | None:
        return running_stack(self.paths)

    def _ray(self) -> tuple[StackInfo, RayJobs]:
        stack = self.stack()
        if stack is None:
            raise StackNotRunning(
                f"no selfsup stack is running for {self.paths.root}: start it with `selfsup up`"
            )
        return stack, RayJobs(stack.dashboard_url)

    # ---- user requests --------------------------------------------------------------------

    def submit(self, spec_text: str) -> Job:
        """Validate, then queue. A SpecError leaves nothing behind."""
        spec = load_spec_text(spec_text)
        stack, _ = self._ray()
        cpus, gpus = gang_resources(spec)
        if cpus > stack.num_cpus or gpus > stack.num_gpus:
            raise SpecError(
                [
                    (
                        "resources",
                        f"the job needs {cpus:g} CPUs and {gpus:g} GPUs at once; the cluster "
                        f"has {stack.num_cpus:g} CPUs and {stack.num_gpus:g} GPUs",
                    )
                ]
            )
        job_id = f"job-{uuid.uuid4().hex[:10]}"
        run_id = self.tracking.create_job_run(job_id, spec)
        now = utcnow()
        job = Job(
            id=job_id,
            name=spec.name,
            owner=self.actor,
            state=str(JobState.QUEUED),
            priority=spec.priority,
            spec_yaml=spec_text,
            spec=spec.model_dump(mode="json"),
            config_hash=spec.config_hash(),
            cpus=cpus,
            gpus=gpus,
            attempts=0,
            mlflow_run_id=run_id,
            created_at=now,
            updated_at=now,
        )
        return self.store.add(job, actor=self.actor, reason="submitted")

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} in {self.paths.root}")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if JobState(job.state).is_final:
            raise JobConflict(f"job {job_id} is already {job.state}")
        if job.state == JobState.RUNNING:
            _, ray = self._ray()
            ray.stop(job_id)
        self.store.transition(
            job_id,
            [JobState(job.state)],
            JobState.CANCELLED,
            self.actor,
            "cancelled by user",
            finished_at=utcnow(),
        )
        if job.mlflow_run_id:
            self.tracking.mark_run(job.mlflow_run_id, RunStatus.KILLED)
        return self.get(job_id)

    def retry(self, job_id: str) -> Job:
        """Requeue a failed or cancelled job under the same id: it resumes from its latest
        checkpoint, and keeps logging into the same MLflow run."""
        job = self.get(job_id)
        if job.state not in (JobState.FAILED, JobState.CANCELLED):
            raise JobConflict(f"job {job_id} is {job.state}: only FAILED or CANCELLED jobs retry")
        self.store.transition(
            job_id,
            [JobState(job.state)],
            JobState.QUEUED,
            self.actor,
            "retried by user",
            finished_at=None,
            message=None,
        )
        if job.mlflow_run_id:
            self.tracking.client.update_run(job.mlflow_run_id, status="RUNNING")
        return self.get(job_id)

    def logs(self, job_id: str) -> str:
        self.get(job_id)
        _, ray = self._ray()
        if ray.view(job_id).phase is RayJobPhase.MISSING:
            return ""
        return ray.logs(job_id)

    # ---- the control loop's one turn ------------------------------------------------------

    def tick(self) -> None:
        """Reconcile running jobs with Ray, then admit what fits. No-op without a stack."""
        if self.stack() is None:
            return
        self.reconcile()
        self.schedule()

    def free_capacity(self, stack: StackInfo) -> Capacity:
        running = self.store.list([JobState.RUNNING])
        return Capacity(
            cpus=stack.num_cpus - sum(job.cpus for job in running),
            gpus=stack.num_gpus - sum(job.gpus for job in running),
        )

    def schedule(self) -> None:
        stack, ray = self._ray()
        free = self.free_capacity(stack)
        queued = sorted(
            self.store.list([JobState.QUEUED]),
            key=lambda job: (-job.priority, job.created_at),
        )
        for job in queued:
            # Strict order: a gang that does not fit waits, and nothing behind it jumps ahead,
            # so a wide job cannot be starved by a stream of narrow ones.
            if not free.fits(job):
                break
            self._start(job, ray)
            free = Capacity(free.cpus - job.cpus, free.gpus - job.gpus)

    def _start(self, job: Job, ray: RayJobs) -> None:
        job_dir = self.paths.jobs / job.id
        job_dir.mkdir(parents=True, exist_ok=True)
        job_file = job_dir / "job.json"
        job_file.write_text(
            json.dumps(
                {
                    "job_id": job.id,
                    "spec": job.spec,
                    "run_id": job.mlflow_run_id,
                    "tracking_uri": self.paths.tracking_uri,
                    "storage_path": str(self.paths.runs),
                },
                indent=2,
            )
        )
        moved = self.store.transition(
            job.id,
            [JobState.QUEUED],
            JobState.RUNNING,
            "controller",
            "admitted: gang fits",
            started_at=utcnow(),
            attempts=job.attempts + 1,
        )
        if not moved:
            return  # another process admitted it first
        try:
            ray.submit(job.id, f"{sys.executable} -m pipelines.driver {job_file}", env={})
        except Exception as error:  # noqa: BLE001 - any failure to hand over fails the job
            self._finish(job, JobState.FAILED, f"could not submit to Ray: {error}")

    def reconcile(self) -> None:
        _, ray = self._ray()
        for job in self.store.list([JobState.RUNNING]):
            view = ray.view(job.id)
            if view.phase in (RayJobPhase.PENDING, RayJobPhase.RUNNING):
                continue
            if view.phase is RayJobPhase.SUCCEEDED:
                self._finish(job, JobState.SUCCEEDED, "finished", result=self._result(job))
            elif view.phase is RayJobPhase.STOPPED:
                self._finish(job, JobState.CANCELLED, "stopped in Ray")
            elif view.phase is RayJobPhase.MISSING:
                self._finish(job, JobState.FAILED, "the Ray cluster no longer knows this job")
            else:
                self._finish(job, JobState.FAILED, self._failure_reason(job, view.message))

    def _result(self, job: Job) -> dict:
        if not job.mlflow_run_id:
            return {}
        metrics, run_tags = self.tracking.run_metrics_and_tags(job.mlflow_run_id)
        result: dict = {
            key: value for key, value in metrics.items() if key.startswith(("eval.", "baseline."))
        }
        for key in (tags.MODEL_NAME, tags.MODEL_VERSION, tags.MODEL_ALIAS):
            if key in run_tags:
                result[key.removeprefix("selfsup.")] = run_tags[key]
        if tags.EVAL_SKIPPED in run_tags:  # a dataset without labels: say why there are no scores
            result["evaluation_skipped"] = run_tags[tags.EVAL_SKIPPED]
        return result

    def _failure_reason(self, job: Job, ray_message: str) -> str:
        if job.mlflow_run_id:
            _, run_tags = self.tracking.run_metrics_and_tags(job.mlflow_run_id)
            if tags.ERROR in run_tags:
                return run_tags[tags.ERROR]
        return ray_message or "the driver failed; see `selfsup job logs`"

    def _finish(self, job: Job, state: JobState, reason: str, result: dict | None = None) -> None:
        fields = {"finished_at": utcnow(), "message": reason}
        if result is not None:
            fields["result"] = result
        moved = self.store.transition(
            job.id, [JobState.RUNNING], state, "controller", reason, **fields
        )
        if moved and job.mlflow_run_id and state is not JobState.SUCCEEDED:
            status = RunStatus.KILLED if state is JobState.CANCELLED else RunStatus.FAILED
            self.tracking.mark_run(job.mlflow_run_id, status)

    def is_final(self, job_id: str) -> bool:
        return JobState(self.get(job_id).state) in FINAL_STATES
