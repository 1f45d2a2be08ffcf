"""The controller's HTTP API on the real stack: bearer tokens and ownership, idempotent
submission under concurrency, and a reason for every job that waits. The queue is paused
(`selfsup queue pause`) so these jobs stay queued and no training runs."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from service.client import ApiClient, ApiError
from tests.conftest import Stack

TINY = Path(__file__).parent / "specs" / "tiny-pca.yaml"


def spec_text(name: str = "tiny-pca", priority: int = 0) -> str:
    text = TINY.read_text().replace("name: tiny-pca", f"name: {name}")
    return text + f"priority: {priority}\n"


def routes(job_id: str) -> list[tuple[str, str]]:
    return [
        ("GET", "/v1/jobs"),
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/transitions"),
        ("GET", f"/v1/jobs/{job_id}/logs"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("POST", f"/v1/jobs/{job_id}/retry"),
        ("GET", "/v1/queue"),
    ]


def status_of(client: ApiClient, method: str, path: str, body: dict | None = None) -> int:
    """The HTTP status the API answers ``client``'s request with."""
    try:
        client.request(method, path, body)
    except ApiError as error:
        return error.status
    return 200


def test_tokens_and_ownership(stack: Stack) -> None:
    alice, bob = stack.api(stack.token("alice")), stack.api(stack.token("bob"))
    admin = stack.api(stack.token("ops", admin=True))
    with stack.paused():
        job = alice.request("POST", "/v1/jobs", {"spec": spec_text("alice-job")})
        job_id = job["id"]
        assert job["owner"] == "alice" and job["state"] == "QUEUED"
        assert "paused" in job["waiting"]
        # Answered before its MLflow run exists: the loop makes it within a turn or so, and
        # the job's status links it from then on, paused queue or not.
        assert job["mlflow_run_id"] is None and job["run_url"] is None
        job = stack.wait_for_run(job_id)
        assert job["mlflow_run_id"] in job["run_url"]
        count = len(admin.request("GET", "/v1/jobs", query={"all": "true"}))

        # No token, a wrong token: 401 on every route, and a POST makes no job.
        for client in (stack.api(None), stack.api("ssp_not-a-real-token")):
            for method, path in routes(job_id):
                assert status_of(client, method, path) == 401, (method, path)
            assert status_of(client, "POST", "/v1/jobs", {"spec": spec_text()}) == 401
        assert len(admin.request("GET", "/v1/jobs", query={"all": "true"})) == count

        # Another user: the job does not exist for them, and is not in their list.
        for method, path in routes(job_id)[1:-1]:
            assert status_of(bob, method, path) == 404, (method, path)
        assert job_id not in {j["id"] for j in bob.request("GET", "/v1/jobs")}
        assert job_id not in {
            j["id"] for j in bob.request("GET", "/v1/jobs", query={"all": "true"})
        }
        assert status_of(bob, "POST", "/v1/queue/resume") == 403

        # Through the CLI: exit 3 for another user's token and for a wrong one.
        for token in (bob.token, "ssp_wrong"):
            env = {**stack.env, "SELFSUP_TOKEN": token}
            denied = stack.run_cli(env, "job", "status", job_id)
            assert denied.returncode == 3 and "Traceback" not in denied.stderr

        # The owner and an admin succeed.
        assert alice.request("GET", f"/v1/jobs/{job_id}")["id"] == job_id
        assert job_id in {j["id"] for j in admin.request("GET", "/v1/jobs", query={"all": "true"})}
        cancelled = admin.request("POST", f"/v1/jobs/{job_id}/cancel")
        assert cancelled["state"] == "CANCELLED"
        history = alice.request("GET", f"/v1/jobs/{job_id}/transitions")
        assert [(h["from"], h["to"], h["actor"]) for h in history] == [
            (None, "QUEUED", "alice"),
            ("QUEUED", "CANCELLED", "ops"),
        ]
        run = MlflowClient(stack.tracking_uri).get_run(job["mlflow_run_id"])
        assert run.info.status == "KILLED"
        retried = alice.request("POST", f"/v1/jobs/{job_id}/retry")
        assert retried["state"] == "QUEUED"
        alice.request("POST", f"/v1/jobs/{job_id}/cancel")


def test_concurrent_submissions_with_idempotency_keys(stack: Stack) -> None:
    carol = stack.api(stack.token("carol"))
    keys = [f"key-{index}" for index in range(100)] * 2
    random.Random(0).shuffle(keys)
    text = spec_text("carol-job")

    def submit(key: str) -> tuple[str, str]:
        job = carol.request("POST", "/v1/jobs", {"spec": text}, headers={"Idempotency-Key": key})
        return key, job["id"]

    with stack.paused():
        with ThreadPoolExecutor(max_workers=200) as pool:
            answers = list(pool.map(submit, keys))
        ids_by_key: dict[str, set[str]] = defaultdict(set)
        for key, job_id in answers:
            ids_by_key[key].add(job_id)
        assert len(ids_by_key) == 100 and all(len(ids) == 1 for ids in ids_by_key.values())
        jobs = carol.request("GET", "/v1/jobs")
        assert len(jobs) == 100
        assert {job["id"] for job in jobs} == {id_ for ids in ids_by_key.values() for id_ in ids}
        # One MLflow run per job: a repeated key made no second run.
        for job in jobs:
            stack.wait_for_run(job["id"])
        client = MlflowClient(stack.tracking_uri)
        experiment = client.get_experiment_by_name("selfsup").experiment_id
        runs = client.search_runs([experiment], "tags.`selfsup.spec_name` = 'carol-job'")
        assert len(runs) == 100

        # The same key with another spec is a conflict, not a silent answer.
        with pytest.raises(ApiError) as conflict:
            carol.request(
                "POST",
                "/v1/jobs",
                {"spec": spec_text("other-spec")},
                headers={"Idempotency-Key": "key-0"},
            )
        assert conflict.value.status == 409
        for job in jobs:
            carol.request("POST", f"/v1/jobs/{job['id']}/cancel")


def test_status_says_why_a_job_waits_and_outputs_parse(stack: Stack) -> None:
    with stack.paused():
        path = Path(stack.home / "wait.yaml")
        path.write_text(spec_text("waiting-job"))
        submitted = json.loads(
            stack.cli("job", "submit", str(path), "-o", "json", check=True).stdout
        )
        as_yaml = stack.cli("job", "status", submitted["id"], "-o", "yaml", check=True).stdout
        assert f"id: {submitted['id']}" in as_yaml and "paused" in as_yaml
        table = stack.cli("job", "status", submitted["id"], check=True).stdout
        assert "waiting:" in table and "paused by an admin" in table
        schema = stack.admin.request("GET", "/openapi.json")
        assert "/v1/jobs/{job_id}/cancel" in schema["paths"]
        stack.cli("job", "cancel", submitted["id"], check=True)
