"""The controller under load: submit latency and throughput of its HTTP API, and the
scheduler's decision time with a deep queue. Each figure has a reference measured beside it
in the same run, because this machine is shared and noisy.

API: a real `selfsup server` (its loop's process and its API processes, as many as the
settings give for the backend: one on SQLite, two on PostgreSQL) with the queue paused, so
only the submit path is measured, on each backend asked for: `sqlite` (job store and MLflow
on SQLite files, as `selfsup up` runs it) and `postgresql` (both on a private PostgreSQL
server on loopback, service/postgres.py). N submissions, each with its own idempotency key,
from C concurrent clients. A submit stores the job and answers; the controller's loop makes
each job's MLflow run after it, so the figures also say how long until every job had its
run. References in the same run: GET /healthz from the same clients (the HTTP round trip
alone), and one MLflow run made directly, one after another (the tracking work the loop
does per job).

Scheduler: Q queued jobs of random owners, priorities and ages in the job store of each
backend, each row holding a spec as a submit stores it (its YAML and its parsed form); one
decision = read the queue and the running jobs from the store (the columns admission needs,
as the controller's loop reads them), then `scheduler.plan`. The reference is Python's sort
of the same jobs by (priority, age). The loop's first turn reads every job, later turns
only those changed since (one submitted between two turns here); the first read is given
beside. Then what the loop's turn writes: every queued job's wait (the first turn after a
start), and the read that finds waits cleared (every turn).

    .venv/bin/python -m benchmarks.bench_controller                    # 1000 x 20, 10000 queued
    .venv/bin/python -m benchmarks.bench_controller --submissions 200 --queued 1000
    .venv/bin/python -m benchmarks.bench_controller --backends sqlite  # no PostgreSQL here
    .venv/bin/python -m benchmarks.bench_controller --parts scheduler  # no server
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from pipelines.spec import load_spec_text
from service.auth import ADMIN, create_token
from service.client import ApiClient
from service.controller import PAUSED_FLAG, gang_resources
from service.ports import free_port
from service.postgres import create_database, postgres_server
from service.scheduler import Policy, Resources, plan
from service.settings import ServerSettings
from service.store import ACTIVE_STATES, REREAD_OVERLAP, Job, JobState, JobStore, utcnow
from service.tracking import Tracking

SPEC = Path(__file__).parent.parent / "tests" / "specs" / "tiny-pca.yaml"


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


@contextlib.contextmanager
def backend_urls(backend: str, folder: Path) -> Iterator[tuple[str, str]]:
    """(job store URL, MLflow tracking URI) on ``backend``, for as long as the context."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'jobs.db'}", f"sqlite:///{folder / 'mlflow.db'}"
        return
    with postgres_server() as server:
        yield create_database(server, "jobs"), create_database(server, "mlflow")


def start_server(
    folder: Path, store_url: str, tracking_uri: str
) -> tuple[subprocess.Popen, ApiClient, ServerSettings]:
    settings = ServerSettings(
        port=free_port(),
        store_url=store_url,
        tracking_uri=tracking_uri,
        artifact_root=str(folder / "artifacts"),
        ray_dashboard_url="http://127.0.0.1:9",  # never called: the queue stays paused
        storage_path=str(folder / "runs"),
        cluster_cpus=2,
        cluster_gpus=0,
    )
    settings.save(folder / "server.yaml")
    store = JobStore(settings.store_url)
    store.set_flag(PAUSED_FLAG, "true")
    token = create_token(store, "bench", ADMIN)
    server = subprocess.Popen(
        [sys.executable, "-m", "service.server", "--config", str(folder / "server.yaml")],
        stdout=(folder / "server.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{settings.port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: see {folder / 'server.log'}") from None
            time.sleep(0.2)
    return server, ApiClient(url, token), settings


def timed_calls(count: int, clients: int, call: callable) -> tuple[list[float], float]:
    def one(_index: int) -> float:
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = list(pool.map(one, range(count)))
    return latencies, time.perf_counter() - started


def seconds_until_every_job_has_a_run(store: JobStore, started: float, timeout: float) -> float:
    while store.without_run(JobState.QUEUED, limit=1):
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"jobs still without an MLflow run after {timeout:.0f} s")
        time.sleep(0.05)
    return time.perf_counter() - started


def bench_api(backend: str, submissions: int, clients: int) -> dict:
    spec_text = SPEC.read_text()
    with (
        tempfile.TemporaryDirectory(prefix="bench-api-") as scratch,
        backend_urls(backend, Path(scratch)) as (store_url, tracking_uri),
    ):
        server, api, settings = start_server(Path(scratch), store_url, tracking_uri)
        store = JobStore(settings.store_url)
        try:
            body = {"spec": spec_text}
            started = time.perf_counter()
            submit_latencies, submit_wall = timed_calls(
                submissions,
                clients,
                lambda: api.request(
                    "POST", "/v1/jobs", body, headers={"Idempotency-Key": uuid.uuid4().hex}
                ),
            )
            every_run = seconds_until_every_job_has_a_run(store, started, timeout=600)
            health_latencies, health_wall = timed_calls(
                submissions, clients, lambda: api.request("GET", "/healthz")
            )
            stored = store.count()
        finally:
            server.terminate()
            server.wait(timeout=30)
        # The reference: the same run, made directly on the same backend (a fresh SQLite
        # file; the same PostgreSQL database, the server stopped).
        fresh = f"sqlite:///{Path(scratch) / 'mlflow-direct.db'}"
        tracking = Tracking(fresh if backend == "sqlite" else tracking_uri)
        spec = load_spec_text(spec_text)
        direct = []
        for _ in range(min(submissions, 200)):
            started = time.perf_counter()
            tracking.create_job_run(f"job-{uuid.uuid4().hex[:12]}", spec)
            direct.append(time.perf_counter() - started)
    assert stored == submissions, (stored, submissions)
    return {
        "backend": backend,
        "api_processes": settings.api_process_count,
        "submissions": submissions,
        "clients": clients,
        "submit": percentiles(submit_latencies) | {"per_s": submissions / submit_wall},
        "every_job_has_its_run_s": every_run,
        "healthz": percentiles(health_latencies) | {"per_s": submissions / health_wall},
        "mlflow_run_direct": percentiles(direct),
    }


def bench_scheduler(backend: str, queued: int, repeats: int) -> dict:
    rng = random.Random(0)
    spec_text = SPEC.read_text()
    spec = load_spec_text(spec_text)
    cpus, gpus = gang_resources(spec)
    now = utcnow()

    def add_job(index: int, state: JobState) -> None:
        created = now - timedelta(seconds=rng.uniform(0, 86_400))
        job = Job(
            id=f"job-{index:06d}",
            name="bench",
            owner=f"user-{rng.randrange(50)}",
            state=str(state),
            priority=rng.randint(-10, 10),
            spec_yaml=spec_text,  # rows as large as a submit stores them
            spec=spec.model_dump(mode="json"),
            config_hash="",
            workers=rng.choice([1, 2, 4]),
            cpus=cpus * rng.choice([1, 2, 4]),
            gpus=gpus,
            created_at=created,
            updated_at=created,
        )
        store.add(job, actor="bench", reason="benchmark")

    with (
        tempfile.TemporaryDirectory(prefix="bench-sched-") as scratch,
        backend_urls(backend, Path(scratch)) as (store_url, _),
    ):
        store = JobStore(store_url)
        for index in range(queued + 4):
            add_job(index, JobState.RUNNING if index < 4 else JobState.QUEUED)
        if backend == "postgresql":  # table statistics, as autovacuum keeps them up to date
            with store.engine.begin() as connection:
                connection.exec_driver_sql("ANALYZE jobs")
        policy = Policy(max_workers_per_user=8)
        total = Resources(64, 0)
        # The loop's first turn reads every job; later turns the jobs changed since (and all
        # again every minute). Then the queue settles as in a loop that has run a while.
        started = time.perf_counter()
        store.schedulable([JobState.QUEUED])
        store.schedulable(ACTIVE_STATES)
        full_read = time.perf_counter() - started
        time.sleep(REREAD_OVERLAP.total_seconds())
        decide, plan_only, sort_only, write_all, find_cleared = [], [], [], [], []
        for repeat in range(repeats):
            add_job(queued + 4 + repeat, JobState.QUEUED)  # a submit between two turns
            started = time.perf_counter()
            waiting = store.schedulable([JobState.QUEUED])
            active = store.schedulable(ACTIVE_STATES)
            loaded = time.perf_counter()
            result = plan(waiting, active, total, policy, utcnow())
            finished = time.perf_counter()
            sorted(waiting, key=lambda job: (-job.priority, job.created_at))
            sort_only.append(time.perf_counter() - finished)
            decide.append(finished - started)
            plan_only.append(finished - loaded)
            waits = {job_id: (reason, None) for job_id, reason in result.waiting.items()}
            started = time.perf_counter()
            store.set_waiting(waits)
            written = time.perf_counter()
            store.unplanned(waits)
            find_cleared.append(time.perf_counter() - written)
            write_all.append(written - started)
        store.engine.dispose()  # before the PostgreSQL server stops
    assert len(result.admit) + len(result.waiting) == queued + repeats
    return {
        "backend": backend,
        "queued": queued,
        "decision_with_store_ms": 1000 * statistics.median(decide),
        "plan_only_ms": 1000 * statistics.median(plan_only),
        "python_sort_ms": 1000 * statistics.median(sort_only),
        "first_read_ms": 1000 * full_read,
        "write_every_wait_ms": 1000 * statistics.median(write_all),
        "find_cleared_waits_ms": 1000 * statistics.median(find_cleared),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--backends", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql"
    )
    parser.add_argument("--parts", default="api,scheduler", help="comma-separated: api, scheduler")
    args = parser.parse_args()
    backends, parts = args.backends.split(","), args.parts.split(",")
    apis = [
        bench_api(backend, args.submissions, args.clients) for backend in backends if "api" in parts
    ]
    schedulers = [
        bench_scheduler(backend, args.queued, args.repeats)
        for backend in backends
        if "scheduler" in parts
    ]
    print(json.dumps({"api": apis, "scheduler": schedulers}, indent=2))
    print()
    for api in apis:
        submit, health = api["submit"], api["healthz"]
        print(
            f"{api['backend']} ({api['api_processes']} API processes): submit p50 "
            f"{submit['p50_ms']:.1f} ms, p99 "
            f"{submit['p99_ms']:.1f} ms, {submit['per_s']:.0f}/s ({args.submissions} from "
            f"{args.clients} clients); every job had its MLflow run "
            f"{api['every_job_has_its_run_s']:.1f} s after the first submit; healthz p50 "
            f"{health['p50_ms']:.1f} ms, p99 {health['p99_ms']:.1f} ms, {health['per_s']:.0f}/s; "
            f"one MLflow run made directly: p50 {api['mlflow_run_direct']['p50_ms']:.1f} ms"
        )
    for scheduler in schedulers:
        print(
            f"{scheduler['backend']} scheduler, {args.queued} queued: "
            f"{scheduler['decision_with_store_ms']:.0f} ms per "
            f"decision with the store reads, plan alone {scheduler['plan_only_ms']:.1f} ms, "
            f"Python's sort of the same jobs {scheduler['python_sort_ms']:.1f} ms; writing every "
            f"job's wait {scheduler['write_every_wait_ms']:.0f} ms, finding cleared waits "
            f"{scheduler['find_cleared_waits_ms']:.1f} ms; the first turn's read of every job "
            f"{scheduler['first_read_ms']:.0f} ms"
        )


if __name__ == "__main__":
    main()
