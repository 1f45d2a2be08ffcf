"""Users' images through the full job path: a folder of crops of bundled photographs at mixed
sizes, grey, colour and RGBA (SimCLR): CLI -> controller -> Ray Job -> Ray Data decode tasks
-> Ray Train (2 gloo workers) -> MLflow -> evaluation on another labelled folder -> Model
Registry -> selfsup.load_encoder. (PIRL on an S3 bucket with corrupt files among the images
is in tests/test_s3_storage.py, on a controller that keeps everything on S3.) Then every bad
input: refused at submit (exit 2 or HTTP 422, the field named, nothing stored), or, for too
many unreadable files in the bucket, a job that fails as a user error and leaves what was
stored before untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from examples.make_image_folder import generate_images, write_image_folder, write_parquet_shards
from pipelines.sources import _s3_client, _s3_client_for, source_problems
from pipelines.spec import load_spec_text
from service.client import ApiError
from service.controller import data_problems
from tests.conftest import Stack
from tests.s3 import S3Endpoint
from tests.train_loop_runs import assert_loads_and_reproduces
from tests.user_images import BROKEN, BUCKET, CLASSES, PER_CLASS, PREFIX, job_document, rgba_png
from workers.train_loop import REFERENCE_FILE


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("user-images")
    write_image_folder(root, PER_CLASS, seed=0, classes=CLASSES)
    (root / "coffee" / "rgba.png").write_bytes(rgba_png(0))
    (root / "coffee" / "notes.txt").write_text("not an image: skipped by the listing")
    return root


def assert_registered_and_loads(stack: Stack, job: dict, model: str) -> None:
    # The registry named outright: other tests in this process set MLflow's default one.
    registry = MlflowClient(stack.tracking_uri, registry_uri=stack.tracking_uri)
    version = registry.get_model_version(model, "1")
    assert version.tags["selfsup.input_shape"] == "3x32x32"
    assert len(version.tags["selfsup.split.digest"]) == 16
    (checkpoint,) = {
        path.parent for path in (stack.home / "runs" / job["id"]).glob(f"*/{REFERENCE_FILE}")
    }
    assert_loads_and_reproduces(model, stack.tracking_uri, checkpoint)


def test_simclr_trains_on_a_folder_of_images(stack: Stack, folder: Path, tmp_path: Path) -> None:
    """Evaluated on another labelled folder (evaluate.data): other pictures than pretraining
    saw, as a downstream task would be."""
    labelled = tmp_path / "labelled"
    write_image_folder(labelled, 30, seed=5, classes=("rocket", "coins", "retina"))
    method = {"name": "simclr", "temperature": 0.2, "projection_dim": 32, "hidden_dim": 64}
    document = job_document("test-simclr-folder", method, f"file://{folder}")
    document["evaluate"]["data"] = f"file://{labelled}"
    job, stderr = stack.submit_and_wait(document, tmp_path)
    assert job["state"] == "SUCCEEDED", (job["message"], stderr[-3000:])

    run = MlflowClient(stack.tracking_uri).get_run(job["mlflow_run_id"])
    assert run.data.metrics["data.bad_samples"] == 0
    # 5 classes x 40 + the RGBA image, a quarter held out: 150 training images, 2 steps of 64
    # an epoch (2 ranks x 32).
    assert run.data.metrics["train.step"] == 4
    # Crops of three different pictures: any working encoder tells most of them apart.
    assert run.data.metrics["eval.linear.top1"] > 0.6
    assert run.data.metrics["eval.knn.top1"] > 0.6
    assert_registered_and_loads(stack, job, document["name"])
    # `selfsup eval --data` on the same labelled folder decodes, subsets and splits it as the
    # job's evaluate.data did: the same number, as a run of its own.
    evaluated = stack.cli(
        "eval", f"{document['name']}@candidate", "--data", f"file://{labelled}", "-o", "json"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads(evaluated.stdout)
    assert again["split"]["source"] == f"file://{labelled}"
    assert again["metrics"]["eval.linear.top1"] == pytest.approx(
        run.data.metrics["eval.linear.top1"], abs=1e-9
    )
    refused = stack.cli("eval", f"{document['name']}@candidate", "--data", f"file://{tmp_path}/x")
    assert refused.returncode == 2 and "does not exist" in refused.stderr


def test_too_many_unreadable_files_fail_the_job_as_a_user_error(
    stack: Stack, bucket: str, tmp_path: Path
) -> None:
    method = {"name": "simclr", "temperature": 0.2, "projection_dim": 32, "hidden_dim": 64}
    document = job_document("test-too-many-bad", method, bucket, max_bad_fraction=0.0)
    document["max_retries"] = 2
    document["train"]["epochs"] = 1  # the count is checked once training ends
    registry = MlflowClient(stack.tracking_uri, registry_uri=stack.tracking_uri)
    before = [(v.name, v.version) for v in registry.search_model_versions()]
    job, stderr = stack.submit_and_wait(document, tmp_path)
    assert job["state"] == "FAILED", (job["message"], stderr[-3000:])
    assert "could not be decoded" in job["message"] and "max_bad_fraction" in job["message"]
    assert any(key in job["message"] for key in BROKEN)
    assert job["attempts"] == 1  # a user error: not retried
    run = MlflowClient(stack.tracking_uri).get_run(job["mlflow_run_id"])
    assert run.data.tags["selfsup.error_kind"] == "user"
    # Nothing registered for it, and every version registered before is still there.
    assert [(v.name, v.version) for v in registry.search_model_versions()] == before


def _stored(stack: Stack) -> tuple[str, int]:
    client = MlflowClient(stack.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return stack.cli("job", "list", "-o", "json", "--all", check=True).stdout, len(runs)


def test_unreadable_sources_are_refused_at_submit(
    stack: Stack, bucket: str, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("no images here")
    shards = tmp_path / "shards"
    write_parquet_shards(shards, list(generate_images(2, classes=CLASSES)))
    method = {"name": "simclr"}
    cases = [
        ({"source": f"file://{tmp_path}/missing"}, "data.source", "does not exist"),
        ({"source": f"file://{empty}"}, "data.source", "is empty"),
        ({"source": f"file://{texts}"}, "data.source", "no image files"),
        ({"source": "s3://no-such-bucket-here/x/"}, "data.source", "does not exist"),
        ({"source": f"s3://{BUCKET}/nothing-here/"}, "data.source", "is empty"),
        ({"source": f"s3://key:secret@{BUCKET}/{PREFIX}"}, "data.source", "credentials"),
        ({"source": "file://relative/path"}, "data.source", "three slashes"),
        (
            {"source": f"file://{shards}", "image_column": "jpeg"},
            "data.image_column",
            "has no column 'jpeg'",
        ),
    ]
    before = _stored(stack)
    for data, field, words in cases:
        document = job_document("refused", method, **data)
        path = tmp_path / "refused.yaml"
        path.write_text(json.dumps(document))
        result = stack.cli("job", "submit", str(path))
        assert result.returncode == 2, (data, result.stdout, result.stderr)
        assert field in result.stderr and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    # evaluate.data is checked the same way, and through the HTTP API too.
    document = job_document("refused", method, bucket)
    document["evaluate"]["data"] = f"file://{tmp_path}/no-labels-here"
    with pytest.raises(ApiError) as refused:
        stack.admin.request("POST", "/v1/jobs", {"spec": json.dumps(document)})
    assert refused.value.status == 422
    assert "evaluate.data" in str(refused.value) and "does not exist" in str(refused.value)
    assert _stored(stack) == before


def _problems_with(monkeypatch: pytest.MonkeyPatch, source: str, **env: str) -> str:
    """The submit check of a spec on ``source`` under the AWS_* settings ``env``."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = load_spec_text(json.dumps(job_document("check", {"name": "simclr"}, source)))
    return " ".join(message for _, message in data_problems(spec))


def test_the_submit_check_names_wrong_s3_settings(
    s3: S3Endpoint, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoint and the key are the controller's environment, not the spec's: the same
    check the controller runs at submit, under wrong settings."""
    assert _problems_with(monkeypatch, bucket) == ""
    wrong_secret = _problems_with(monkeypatch, bucket, AWS_SECRET_ACCESS_KEY="wrong")
    assert "credentials were refused" in wrong_secret
    unknown_key = _problems_with(monkeypatch, bucket, AWS_ACCESS_KEY_ID="AKIAUNKNOWN")
    assert "credentials were refused" in unknown_key
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens there
    wrong_endpoint = _problems_with(monkeypatch, bucket, AWS_ENDPOINT_URL=closed)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    assert "cannot reach the S3 endpoint" in wrong_endpoint and closed in wrong_endpoint
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert "no S3 credentials" in _problems_with(monkeypatch, bucket)


def test_the_submit_check_lists_one_page_of_a_large_prefix(s3: S3Endpoint) -> None:
    """One bounded page however large the prefix: with pages of 10 (1000 at submit), a
    prefix of 25 objects whose only image sits past the first page costs one listing."""
    client = s3.client()
    client.create_bucket(Bucket="selfsup-many")
    for number in range(24):
        client.put_object(Bucket="selfsup-many", Key=f"big/{number:05d}.txt", Body=b"x")
    client.put_object(Bucket="selfsup-many", Key="big/zz.png", Body=rgba_png(2))
    _s3_client_for.cache_clear()  # a client of its own, to count its calls
    calls: list[str] = []
    _s3_client().meta.events.register(
        "before-call.s3.ListObjectsV2", lambda **_: calls.append("list")
    )
    problems = source_problems("s3://selfsup-many/big/", "data.source", page_size=10)
    assert calls == ["list"]
    assert problems and "among the first 10 objects" in problems[0][1]
    assert source_problems("s3://selfsup-many/big/", "data.source", page_size=30) == []
    _s3_client_for.cache_clear()
