"""Siamese, MoCo and PIRL each through the full job path: the real CLI -> controller -> Ray
Job -> Ray Train (2 gloo workers) -> MLflow run -> Model Registry -> selfsup.load_encoder,
on builtin:digits for a few steps: one epoch over a small training split (test_fraction 0.8:
359 of the 1797 digits, 179 per worker) in global batches of 64, i.e. 5 steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import selfsup
from pipelines.spec import read_yaml
from tests.conftest import Stack

EXAMPLES = Path(__file__).parent.parent / "examples"
STEPS = 5  # (359 // 2 workers) // 32 per worker
# K: a multiple of the global batch (64), below 359 - 64; PIRL's negatives: below 359.
METHOD_OVERRIDES = {
    "siamese": {},
    "moco": {"queue_size": 128},
    "pirl": {"num_negatives": 128},
}


def tiny_spec(tmp_path: Path, method: str) -> tuple[Path, str]:
    document = read_yaml((EXAMPLES / f"{method}-digits.yaml").read_text())
    name = f"test-{method}"
    document["name"] = name
    document["method"].update(METHOD_OVERRIDES[method])
    document["data"]["test_fraction"] = 0.8
    document["train"].update(epochs=1, batch_size=64, log_every_steps=STEPS)
    # Only the linear probe: other protocols are tested with their own module.
    document["evaluate"] = {
        "linear": True,
        "knn": False,
        "label_fractions": [],
        "finetune": False,
        "baselines": False,
    }
    document["register"] = {"model": name, "alias": "candidate"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(document))  # JSON is YAML
    return path, name


@pytest.mark.parametrize("method", sorted(METHOD_OVERRIDES))
def test_method_trains_through_the_job_path(stack: Stack, tmp_path: Path, method: str) -> None:
    path, name = tiny_spec(tmp_path, method)
    result = stack.cli("job", "submit", str(path), "--wait")
    job_id = result.stdout.split()[1]
    job = json.loads(stack.cli("job", "status", job_id, "-o", "json", check=True).stdout)
    assert job["state"] == "SUCCEEDED", (job["message"], result.stderr[-3000:])

    client = MlflowClient(stack.tracking_uri)
    run = client.get_run(job["mlflow_run_id"])
    assert run.data.params["method.name"] == method
    (loss,) = client.get_metric_history(run.info.run_id, "train.loss")
    assert loss.step == STEPS and loss.value > 0
    assert run.data.metrics["train.epoch_loss"] > 0
    assert 0.1 < run.data.metrics["eval.linear.top1"] <= 1.0

    if method == "pirl":  # both NCE terms are logged beside their mix
        assert {"train.jigsaw_loss", "train.image_loss"} <= run.data.metrics.keys()

    # The registered encoder is the trained one: it reproduces the features that the final
    # checkpoint stored for held-out images.
    encoder = selfsup.load_encoder(f"models:/{name}@candidate", tracking_uri=stack.tracking_uri)
    assert not encoder.training
    (reference_file,) = (stack.home / "runs" / job_id).glob("checkpoint_*/reference.safetensors")
    reference = load_file(str(reference_file))
    with torch.no_grad():
        features = encoder(reference["images"])
    torch.testing.assert_close(features, reference["features"], rtol=1e-5, atol=1e-6)
