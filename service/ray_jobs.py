"""The controller's view of Ray: jobs run as Ray Jobs (submission id = job id), so the
controller can exit and come back without killing them."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from ray.dashboard.modules.job.common import JOB_ACTOR_NAME_TEMPLATE
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_actors, list_nodes

STOP_GRACE_S = 30.0


class RayJobPhase(enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    MISSING = "MISSING"  # Ray has never heard of it (or forgot it after a restart)


@dataclass(frozen=True)
class RayJobView:
    phase: RayJobPhase
    message: str


class RayJobs:
    def __init__(self, dashboard_url: str) -> None:
        self.address = dashboard_url
        self._client: JobSubmissionClient | None = None

    @property
    def client(self) -> JobSubmissionClient:
        # Connected on first use: the controller can start (and serve its API) before the Ray
        # cluster answers, and keeps trying on each turn of its loop.
        if self._client is None:
            self._client = JobSubmissionClient(self.address)
        return self._client

    def submit(self, job_id: str, entrypoint: str, env: dict[str, str]) -> None:
        phase = self.view(job_id).phase
        if phase in (RayJobPhase.PENDING, RayJobPhase.RUNNING):
            return  # already submitted by an earlier, interrupted call: submitting is idempotent
        if phase is not RayJobPhase.MISSING:
            # A finished earlier attempt holds the id; its logs go, its checkpoints stay.
            self.client.delete_job(job_id)
            self._wait_for_supervisor_exit(job_id)
        self.client.submit_job(
            entrypoint=entrypoint, submission_id=job_id, runtime_env={"env_vars": env}
        )

    def _wait_for_supervisor_exit(self, job_id: str) -> None:
        """Wait (a bounded time) until the earlier attempt's supervisor actor is gone. Ray
        reports a stopped job as STOPPED before that actor, named after the submission id,
        has exited; a new attempt under the same id submitted meanwhile fails to start with
        "The name _ray_internal_job_actor_<id> ... is already taken"."""
        name = JOB_ACTOR_NAME_TEMPLATE.format(job_id=job_id)
        filters = [("name", "=", name), ("state", "!=", "DEAD")]
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            if not list_actors(self.address, filters, raise_on_missing_output=False):
                return
            time.sleep(0.25)

    def view(self, job_id: str) -> RayJobView:
        try:
            info = self.client.get_job_info(job_id)
        except RuntimeError as error:
            if "does not exist" in str(error) or "404" in str(error):
                return RayJobView(RayJobPhase.MISSING, "")
            raise
        phase = {
            JobStatus.PENDING: RayJobPhase.PENDING,
            JobStatus.RUNNING: RayJobPhase.RUNNING,
            JobStatus.SUCCEEDED: RayJobPhase.SUCCEEDED,
            JobStatus.FAILED: RayJobPhase.FAILED,
            JobStatus.STOPPED: RayJobPhase.STOPPED,
        }[info.status]
        return RayJobView(phase, info.message or "")

    def stop(self, job_id: str) -> None:
        """Stop the job and wait (a bounded time) until Ray has ended it, so that a retry that
        follows never mistakes the dying attempt for a live one."""
        if self.view(job_id).phase not in (RayJobPhase.PENDING, RayJobPhase.RUNNING):
            return
        self.client.stop_job(job_id)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            if self.view(job_id).phase not in (RayJobPhase.PENDING, RayJobPhase.RUNNING):
                return
            time.sleep(0.25)

    def logs(self, job_id: str) -> str:
        return self.client.get_job_logs(job_id)

    def cluster_resources(self) -> tuple[float, float]:
        """CPUs and GPUs of the cluster's live nodes, as Ray counts them."""
        nodes = list_nodes(address=self.address, detail=True, raise_on_missing_output=False)
        alive = [node for node in nodes if node.state == "ALIVE"]
        cpus = sum(node.resources_total.get("CPU", 0.0) for node in alive)
        gpus = sum(node.resources_total.get("GPU", 0.0) for node in alive)
        return float(cpus), float(gpus)
