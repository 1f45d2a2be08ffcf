"""The controller's view of Ray: each attempt of a job runs as a Ray Job, so the controller
can exit and come back without killing it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_nodes

STOP_GRACE_S = 30.0


def submission_id(job_id: str, attempt: int) -> str:
    """Ray's id for one attempt of a job. Every attempt gets its own: Ray names an attempt's
    supervisor actor after its id and releases that name some time after it reports the
    attempt ended, so a retry under the same id could fail with "... is already taken"."""
    return f"{job_id}-{attempt}"


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

    def submit(self, submission_id: str, entrypoint: str, env: dict[str, str]) -> None:
        if self.view(submission_id).phase is not RayJobPhase.MISSING:
            return  # already submitted by an earlier, interrupted call: submitting is idempotent
        self.client.submit_job(
            entrypoint=entrypoint, submission_id=submission_id, runtime_env={"env_vars": env}
        )

    def view(self, submission_id: str) -> RayJobView:
        try:
            info = self.client.get_job_info(submission_id)
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

    def stop(self, submission_id: str) -> None:
        """Stop the attempt and wait (a bounded time) until Ray has ended it, so that the job's
        state never says it stopped while its driver still writes."""
        if self.view(submission_id).phase not in (RayJobPhase.PENDING, RayJobPhase.RUNNING):
            return
        self.client.stop_job(submission_id)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            if self.view(submission_id).phase not in (RayJobPhase.PENDING, RayJobPhase.RUNNING):
                return
            time.sleep(0.25)

    def logs(self, submission_id: str) -> str:
        return self.client.get_job_logs(submission_id)

    def cluster_resources(self) -> dict[str, float]:
        """Every resource of the cluster's live nodes (CPU, GPU, custom ones), as Ray counts."""
        nodes = list_nodes(address=self.address, detail=True, raise_on_missing_output=False)
        totals: dict[str, float] = {}
        for node in nodes:
            if node.state == "ALIVE":
                for name, amount in node.resources_total.items():
                    totals[name] = totals.get(name, 0.0) + float(amount)
        return totals
