"""The controller's HTTP API (FastAPI; the OpenAPI schema is served at /openapi.json and the
docs at /docs). Every route but /healthz needs ``Authorization: Bearer <token>``.

    POST /v1/jobs                 submit {"spec": "<YAML>"}; header Idempotency-Key optional
    GET  /v1/jobs[?all=true]      your jobs (an admin's ?all=true: everyone's)
    GET  /v1/jobs/{id}            one job: state, why it waits, progress, run URL, result
    GET  /v1/jobs/{id}/transitions  its append-only history
    GET  /v1/jobs/{id}/logs?offset=N  its Ray job logs from byte N on
    POST /v1/jobs/{id}/cancel | /retry
    GET  /v1/queue, POST /v1/queue/pause | /resume (admin)
    POST /v1/sweeps               submit {"spec": "<YAML with a sweep: section>"}
    GET  /v1/sweeps, GET /v1/sweeps/{id} (its trials ranked), POST /v1/sweeps/{id}/cancel
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from pipelines.evaluation_job import load_job_text
from pipelines.spec import SpecError
from service.auth import Authenticator, AuthError, Principal
from service.controller import Controller, IdempotencyConflict, JobConflict, JobNotFound
from service.store import ACTIVE_STATES, Job, JobState, Sweep
from service.sweeps import TrialView


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: str  # the job spec's YAML text, validated exactly as `selfsup job submit` does


async def _principal(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    # On the event loop, as submit: a remembered token, or one indexed SELECT, costs less
    # than a worker thread's hop.
    return request.app.state.authenticate(authorization)


User = Annotated[Principal, Depends(_principal)]


def _admin(user: User) -> Principal:
    if not user.is_admin:
        raise HTTPException(403, f"{user.user} is not an admin")
    return user


Admin = Annotated[Principal, Depends(_admin)]


def job_view(controller: Controller, job: Job, detail: bool = False) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "owner": job.owner,
        "state": job.state,
        "priority": job.priority,
        "workers": job.workers,
        "min_workers": job.min_workers,  # an elastic gang's range; None for a fixed one
        "max_workers": job.max_workers,
        "cpus": job.cpus,
        "gpus": job.gpus,
        "attempts": job.attempts,
        "retries": job.retries,
        "max_retries": job.max_retries,
        "created": job.created_at.isoformat(),
        "started": job.started_at.isoformat() if job.started_at else None,
        "finished": job.finished_at.isoformat() if job.finished_at else None,
        "message": job.message,
        "mlflow_run_id": job.mlflow_run_id,
        "result": job.result or {},
        "sweep_id": job.sweep_id,
        "kind": job.kind,
    }
    if detail:
        progress = controller.progress(job)
        view |= {
            "waiting": controller.waiting_reason(job),
            "estimated_start": (
                start.isoformat(timespec="seconds")
                if (start := controller.estimated_start(job))
                else None
            ),
            "progress": asdict(progress) if progress else None,
            "epochs": job.spec["train"]["epochs"] if job.kind == "pretrain" else None,
            "run_url": controller.run_url(job),
        }
    return view


def sweep_view(sweep: Sweep, trials: list[TrialView] | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": sweep.id,
        "name": sweep.name,
        "owner": sweep.owner,
        "state": sweep.state,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "max_parallel": sweep.max_parallel,
        "promote": sweep.promote,
        "trial_count": len(sweep.trials),
        "created": sweep.created_at.isoformat(),
        "finished": sweep.finished_at.isoformat() if sweep.finished_at else None,
        "message": sweep.message,
        "result": sweep.result or {},
    }
    if trials is not None:  # best first
        view["trials"] = [
            {
                "job_id": trial.job.id,
                "name": trial.job.name,
                "state": trial.job.state,
                "values": trial.values,
                "value": trial.value,
                "message": trial.job.message,
            }
            for trial in trials
        ]
    return view


def create_app(controller: Controller) -> FastAPI:
    """The API over ``controller``, whose loop runs elsewhere (service/server.py)."""
    app = FastAPI(title="selfsup controller", version="1")
    app.state.controller = controller
    app.state.authenticate = Authenticator(controller.store)

    @app.exception_handler(AuthError)
    async def unauthorized(_request: Request, error: AuthError) -> JSONResponse:
        return JSONResponse(
            {"detail": str(error)}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )

    @app.exception_handler(SpecError)
    async def invalid_spec(_request: Request, error: SpecError) -> JSONResponse:
        problems = [{"field": field, "message": message} for field, message in error.problems]
        return JSONResponse({"detail": str(error), "problems": problems}, status_code=422)

    for error_type, status in ((JobNotFound, 404), (JobConflict, 409), (IdempotencyConflict, 409)):

        async def handler(_request: Request, error: Exception, status: int = status) -> Any:
            return JSONResponse({"detail": str(error)}, status_code=status)

        app.add_exception_handler(error_type, handler)

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/v1/whoami")
    def whoami(user: User) -> dict[str, str]:
        return {"user": user.user, "role": user.role}

    @app.post("/v1/jobs", status_code=201)
    async def submit(
        request: SubmitRequest,
        user: User,
        idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
    ) -> Any:
        """On the event loop: parsing the spec and the store's few short statements cost less
        than a worker thread's hop (~1 ms a submit, measured by benchmarks/bench_controller).
        A spec whose checks reach a folder, S3, MLflow or Ray is checked in a thread."""
        spec = load_job_text(request.spec)
        if controller.checks_reach_out(spec):
            job, created = await run_in_threadpool(
                controller.submit_spec, user, spec, request.spec, idempotency_key
            )
        else:
            job, created = controller.submit_spec(user, spec, request.spec, idempotency_key)
        body = job_view(controller, job, detail=True)
        return body if created else JSONResponse(body, status_code=200)

    @app.post("/v1/specs/validate")
    def validate(request: SubmitRequest, user: User) -> dict[str, Any]:
        """The submit-time checks of a spec, nothing stored (`selfsup spec validate`)."""
        spec, cpus, gpus = controller.validate(user, request.spec)
        return {
            "name": spec.name,
            "kind": getattr(spec, "kind", "pretrain"),
            "config_hash": spec.config_hash(),
            "workers": getattr(spec.resources, "workers", 0),
            "cpus": cpus,
            "gpus": gpus,
            "spec": spec.model_dump(mode="json", by_alias=True),
        }

    @app.get("/v1/jobs")
    def list_jobs(
        user: User,
        all: bool = False,  # noqa: A002
        state: Annotated[list[JobState] | None, Query()] = None,
        name: Annotated[str | None, Query(max_length=128)] = None,
        since: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first; ``state`` repeats, ``name`` matches a part, ``since`` an ISO time."""
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)  # a time without a zone is UTC, as the API's are
        jobs = controller.list(user, all, state, name, since)
        return [job_view(controller, job) for job in jobs]

    @app.get("/v1/jobs/{job_id}")
    def status(job_id: str, user: User) -> dict[str, Any]:
        return job_view(controller, controller.get(user, job_id), detail=True)

    @app.get("/v1/jobs/{job_id}/transitions")
    def transitions(job_id: str, user: User) -> list[dict[str, Any]]:
        controller.get(user, job_id)
        return [
            {
                "from": row.from_state,
                "to": row.to_state,
                "actor": row.actor,
                "reason": row.reason,
                "at": row.at.isoformat(),
            }
            for row in controller.store.transitions(job_id)
        ]

    @app.get("/v1/jobs/{job_id}/logs")
    def logs(job_id: str, user: User, offset: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
        job = controller.get(user, job_id)
        text, state = controller.logs(job), job.state
        if len(text) < offset:  # a new attempt started its own, shorter logs: from its start
            offset = 0
        return {"text": text[offset:], "offset": len(text), "state": state}

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, user: User) -> dict[str, Any]:
        return job_view(controller, controller.cancel(user, job_id))

    @app.post("/v1/jobs/{job_id}/retry")
    def retry(job_id: str, user: User) -> dict[str, Any]:
        return job_view(controller, controller.retry(user, job_id), detail=True)

    @app.post("/v1/sweeps", status_code=201)
    def submit_sweep(request: SubmitRequest, user: User) -> dict[str, Any]:
        return sweep_view(
            *controller.sweeps.get(user, controller.sweeps.submit(user, request.spec).id)
        )

    @app.get("/v1/sweeps")
    def list_sweeps(user: User) -> list[dict[str, Any]]:
        return [sweep_view(sweep) for sweep in controller.sweeps.list(user)]

    @app.get("/v1/sweeps/{sweep_id}")
    def sweep_status(sweep_id: str, user: User) -> dict[str, Any]:
        return sweep_view(*controller.sweeps.get(user, sweep_id))

    @app.post("/v1/sweeps/{sweep_id}/cancel")
    def cancel_sweep(sweep_id: str, user: User) -> dict[str, Any]:
        return sweep_view(controller.sweeps.cancel(user, sweep_id))

    @app.get("/v1/queue")
    def queue(user: User) -> dict[str, Any]:
        total = controller.capacity()
        return {
            "paused": controller.policy().paused,
            "cluster": {"cpus": total.cpus, "gpus": total.gpus},
            "queued": len(controller.store.schedulable([JobState.QUEUED])),
            "active": len(controller.store.schedulable(ACTIVE_STATES)),
        }

    @app.post("/v1/queue/pause")
    def pause(user: Admin) -> dict[str, bool]:
        controller.set_paused(True)
        return {"paused": True}

    @app.post("/v1/queue/resume")
    def resume(user: Admin) -> dict[str, bool]:
        controller.set_paused(False)
        return {"paused": False}

    return app
