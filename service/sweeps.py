"""Sweeps on the controller: a sweep's trials are submitted as ordinary jobs (cancel, retry,
logs as any job), at most ``max_parallel`` of them admitted at once; the sweep ends when they
all have, ranked by its metric, and the best trial's encoder gets the ``promote`` alias.

The ranking reads each trial's result (the controller copies the sweep's metric there when
the trial ends), so `selfsup sweep status` costs no call to MLflow.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlflow.exceptions import MlflowException

from pipelines.spec import SpecError
from pipelines.sweep import load_sweep_text
from service.auth import Principal
from service.errors import JobConflict, JobNotFound
from service.registry import Registry, RegistryError
from service.store import Job, JobState, Sweep, utcnow

if TYPE_CHECKING:
    from service.controller import Controller

# A trial in these states holds one of the sweep's parallel slots (RETRYING comes back).
BUSY_STATES = (JobState.STARTING, JobState.RUNNING, JobState.RETRYING)


@dataclass(frozen=True)
class TrialView:
    job: Job
    values: dict[str, Any]
    value: float | None  # the sweep's metric, once the trial succeeded and reported it


def ranked(sweep: Sweep, trials: list[Job]) -> list[TrialView]:
    """The trials best first by the metric (in the sweep's mode), then those without a value
    in their order."""
    values = {entry["job_id"]: entry["values"] for entry in sweep.trials}
    order = {job_id: index for index, job_id in enumerate(values)}
    views = [
        TrialView(job, values.get(job.id, {}), _metric(job, sweep.metric))
        for job in sorted(trials, key=lambda job: order.get(job.id, len(order)))
    ]
    sign = -1.0 if sweep.mode == "max" else 1.0
    return sorted(views, key=lambda view: (view.value is None, sign * (view.value or 0.0)))


def _metric(job: Job, metric: str) -> float | None:
    value = (job.result or {}).get(metric) if job.state == JobState.SUCCEEDED else None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def slots_held(sweep: Sweep, trials: list[tuple[str, JobState]]) -> dict[str, str]:
    """Queued trials (job id, state, in trial order) beyond the sweep's free parallel slots ->
    why they wait."""
    busy = sum(state in BUSY_STATES for _, state in trials)
    queued = [job_id for job_id, state in trials if state is JobState.QUEUED]
    free = max(sweep.max_parallel - busy, 0)
    reason = (
        f"trial of {sweep.id}, which runs at most {sweep.max_parallel} trials at once "
        f"({busy} running)"
    )
    return {job_id: reason for job_id in queued[free:]}


class Sweeps:
    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.store = controller.store

    def submit(self, principal: Principal, text: str) -> Sweep:
        """Expand and check every trial as a submit would, then store the sweep and its
        trials' jobs together: a SpecError (naming the trial) leaves nothing behind."""
        parsed = load_sweep_text(text)
        sweep_id = f"sweep-{uuid.uuid4().hex[:12]}"
        jobs = []
        for trial in parsed.trials:
            try:
                gang = self.controller.check(principal, trial.spec)
            except SpecError as error:
                raise SpecError(
                    [(f"sweep trial {trial.index}: {f}", why) for f, why in error.problems]
                ) from None
            jobs.append(
                self.controller.new_job(
                    principal, trial.spec, trial.spec_text, gang, sweep_id=sweep_id
                )
            )
        settings = parsed.sweep
        sweep = Sweep(
            id=sweep_id,
            name=parsed.name,
            owner=principal.user,
            state=str(JobState.RUNNING),
            spec_yaml=text,
            metric=settings.metric,
            mode=settings.mode,
            max_parallel=settings.max_parallel,
            promote=settings.promote,
            trials=[
                {"job_id": job.id, "values": trial.values}
                for job, trial in zip(jobs, parsed.trials, strict=True)
            ],
            created_at=utcnow(),
        )
        self.store.add_sweep(sweep, jobs, actor=principal.user)
        return sweep

    def get(self, principal: Principal, sweep_id: str) -> tuple[Sweep, list[TrialView]]:
        sweep = self.store.sweep(sweep_id)
        if sweep is None or not principal.may_see(sweep.owner):
            raise JobNotFound(f"no sweep {sweep_id!r} visible to {principal.user}")
        return sweep, ranked(sweep, self.store.trials([sweep.id]))

    def list(self, principal: Principal) -> list[Sweep]:
        return self.store.sweeps(owner=None if principal.is_admin else principal.user)

    def cancel(self, principal: Principal, sweep_id: str) -> Sweep:
        """The sweep first (so the loop cannot end it meanwhile), then every unfinished trial."""
        sweep, trials = self.get(principal, sweep_id)
        reason = f"cancelled by {principal.user}"
        if not self.store.end_sweep(sweep.id, JobState.CANCELLED, message=reason):
            raise JobConflict(f"sweep {sweep_id} is already {self.store.sweep(sweep_id).state}")
        for view in trials:
            if not JobState(view.job.state).is_final:
                with contextlib.suppress(JobConflict):  # it ended meanwhile
                    self.controller.cancel(principal, view.job.id)
        return self.get(principal, sweep_id)[0]

    def metric_of(self, job: Job) -> str | None:
        """The metric the sweep of a trial ranks by; None for a job of its own."""
        sweep = self.store.sweep(job.sweep_id) if job.sweep_id else None
        return sweep.metric if sweep else None

    # ---- the loop's part --------------------------------------------------------------------

    def tick(self) -> dict[str, str]:
        """End the running sweeps whose trials have all ended; the queued trials that wait for
        a parallel slot (id -> why), for admission to hold."""
        held: dict[str, str] = {}
        running = self.store.sweeps([JobState.RUNNING])
        states: dict[str, list[tuple[str, JobState]]] = {sweep.id: [] for sweep in running}
        for sweep_id, job_id, state in self.store.trial_states(states):
            states[sweep_id].append((job_id, state))
        for sweep in running:
            if all(state.is_final for _, state in states[sweep.id]):
                self._end(sweep, self.store.trials([sweep.id]))
            else:
                held |= slots_held(sweep, states[sweep.id])
        return held

    def _end(self, sweep: Sweep, trials: list[Job]) -> None:
        views = ranked(sweep, trials)
        scored = {view.job.id: view.value for view in views if view.value is not None}
        if not scored:
            self.store.end_sweep(
                sweep.id,
                JobState.FAILED,
                message=f"no trial succeeded with a value of {sweep.metric}",
                result={"values": {}},
            )
            return
        best = views[0]
        result: dict[str, Any] = {
            "best_job": best.job.id,
            "best_value": best.value,
            "best_values": best.values,
            "values": scored,
        }
        message = f"best: {best.job.id}, {sweep.metric} = {best.value:.4f}"
        if sweep.promote:
            message += self._promote(sweep, best.job, result)
        self.store.end_sweep(sweep.id, JobState.SUCCEEDED, message=message, result=result)

    def _promote(self, sweep: Sweep, best: Job, result: dict[str, Any]) -> str:
        """Point the sweep's alias at the best trial's version, guarded as `encoder promote`
        is (higher is better there, so a sweep that minimises promotes without the guard)."""
        outcome = best.result or {}
        if "model_name" not in outcome or "model_version" not in outcome:
            return f"; not promoted: {best.id} registered no encoder"
        registry = Registry(self.controller.settings.tracking_uri)
        try:
            promotion = registry.promote(
                outcome["model_name"],
                str(outcome["model_version"]),
                sweep.promote or "",
                sweep.metric,
                force=sweep.mode == "min",
            )
        except (RegistryError, MlflowException) as error:
            return f"; not promoted: {error}"
        result["promoted"] = f"{promotion.name}@{promotion.alias} -> version {promotion.version}"
        return f"; {result['promoted']}"
