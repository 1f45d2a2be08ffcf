"""The spine end to end through the real CLI: spec -> controller -> Ray Job -> Ray Train
(2 gloo workers) -> MLflow run -> evaluation -> Model Registry -> selfsup.load_encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import selfsup
from pipelines.spec import read_yaml
from tests.conftest import DIGITS_MODEL, Stack

EXAMPLE = Path(__file__).parent.parent / "examples" / "simclr-digits.yaml"


def write_spec(tmp_path: Path, name: str, **train: object) -> Path:
    document = read_yaml(EXAMPLE.read_text())
    document["name"] = name
    document["train"].update(train)
    document["register"] = {"model": name, "alias": "candidate"}
    # The linear probe and its baselines only: the other protocols have tests of their own.
    document["evaluate"] = {"linear": True, "knn": False, "label_fractions": [], "finetune": False}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(document))  # JSON is YAML
    return path


def job_json(stack: Stack, job_id: str) -> dict:
    return json.loads(stack.cli("job", "status", job_id, "-o", "json", check=True).stdout)


@pytest.fixture(scope="module")
def finished_job(digits_job: dict) -> dict:
    assert "epoch" in digits_job["table"] and "loss" in digits_job["table"]  # --wait's progress
    return digits_job


def test_job_succeeds_and_reports_all_three_accuracies(finished_job: dict) -> None:
    assert finished_job["state"] == "SUCCEEDED", finished_job["message"]
    result = finished_job["result"]
    for key in ("eval.linear.top1", "baseline.raw.linear.top1", "baseline.random.linear.top1"):
        assert 0.5 < result[key] <= 1.0, (key, result)
    assert result["model_name"] == DIGITS_MODEL and result["model_alias"] == "candidate"


def test_one_id_everywhere(stack: Stack, finished_job: dict) -> None:
    job_id = finished_job["id"]
    client = MlflowClient(stack.tracking_uri)
    run = client.get_run(finished_job["mlflow_run_id"])
    assert run.info.run_name == job_id
    assert run.data.tags["selfsup.job_id"] == job_id
    assert run.info.status == "FINISHED"
    assert (stack.home / "runs" / job_id).is_dir()  # Ray Train's run name is the job id
    listed = json.loads(stack.cli("job", "list", "-o", "json", check=True).stdout)
    assert job_id in [job["id"] for job in listed]


def test_run_tracks_spec_loss_lr_and_throughput(stack: Stack, finished_job: dict) -> None:
    client = MlflowClient(stack.tracking_uri)
    run = client.get_run(finished_job["mlflow_run_id"])
    assert run.data.params["train.epochs"] == "3"
    assert run.data.params["method.name"] == "simclr"
    losses = client.get_metric_history(run.info.run_id, "train.loss")
    assert [metric.step for metric in losses] == [5, 10, 15]
    assert all(metric.value > 0 for metric in losses)
    assert client.get_metric_history(run.info.run_id, "train.lr")
    assert run.data.metrics["train.samples_per_sec"] > 0
    assert run.data.metrics["eval.linear.top1"] == finished_job["result"]["eval.linear.top1"]


def test_registered_encoder_reproduces_end_of_training_features(
    stack: Stack, finished_job: dict
) -> None:
    run_dir = stack.home / "runs" / finished_job["id"]
    (reference_file,) = run_dir.glob("checkpoint_*/reference.safetensors")
    reference = load_file(str(reference_file))
    encoder = selfsup.load_encoder(f"models:/{DIGITS_MODEL}/1", tracking_uri=stack.tracking_uri)
    assert not encoder.training
    with torch.no_grad():
        features = encoder(reference["images"])
    torch.testing.assert_close(features, reference["features"], rtol=1e-5, atol=1e-6)


def test_encoder_list_and_get(stack: Stack, finished_job: dict, tmp_path: Path) -> None:
    (version,) = finished_job["versions"]  # as `encoder list` showed it right after the job
    assert (version["aliases"], version["job_id"]) == ("candidate", finished_job["id"])
    listed = json.loads(stack.cli("encoder", "list", "-o", "json", check=True).stdout)
    assert any(row["name"] == DIGITS_MODEL and row["version"] == "1" for row in listed)
    out = tmp_path / "enc"
    stack.cli("encoder", "get", f"{DIGITS_MODEL}/1", "-o", str(out), check=True)
    from_folder = selfsup.load_encoder(out)
    from_registry = selfsup.load_encoder(f"models:/{DIGITS_MODEL}/1", stack.tracking_uri)
    probe = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(from_folder(probe), from_registry(probe))
    missing = stack.cli("encoder", "get", "no-such-model@candidate", "-o", str(tmp_path / "x"))
    assert missing.returncode == 3 and "no-such-model" in missing.stderr
    assert not (tmp_path / "x").exists()


def test_invalid_spec_is_refused_and_nothing_is_stored(stack: Stack, tmp_path: Path) -> None:
    before_jobs = stack.cli("job", "list", "-o", "json", check=True).stdout
    client = MlflowClient(stack.tracking_uri)
    before_runs = len(client.search_runs(client.search_experiments()[0].experiment_id))
    bad = write_spec(tmp_path, "bad-spec", batch_size=255)
    result = stack.cli("job", "submit", str(bad))
    assert result.returncode == 2
    assert "train.batch_size" in result.stderr and "Traceback" not in result.stderr
    assert stack.cli("job", "list", "-o", "json", check=True).stdout == before_jobs
    assert len(client.search_runs(client.search_experiments()[0].experiment_id)) == before_runs


def test_job_logs_outlive_ray_forgetting_the_job(stack: Stack, finished_job: dict) -> None:
    """The controller keeps each attempt's logs in the job's MLflow run as it ends: when Ray
    no longer knows the job (here: its record deleted through the Jobs API), `selfsup job
    logs` still shows them."""
    job_id = finished_job["id"]
    from_ray = stack.cli("job", "logs", job_id, check=True).stdout
    assert f'"job_id": "{job_id}"' in from_ray  # the driver's last line
    archived = MlflowClient(stack.tracking_uri).download_artifacts(
        finished_job["mlflow_run_id"], "logs/attempt-1.txt", str(stack.home / "logs-check")
    )
    assert Path(archived).read_text() == from_ray
    forget = (
        "import sys; from ray.job_submission import JobSubmissionClient; "
        "assert JobSubmissionClient(sys.argv[1]).delete_job(sys.argv[2])"
    )
    stack.python(forget, stack.info["dashboard_url"], f"{job_id}-1")
    assert stack.cli("job", "logs", job_id, check=True).stdout == from_ray
