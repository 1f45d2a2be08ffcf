"""The regularised joint-embedding methods and MAE through the job path, on tiny budgets, with
the encoders and training options their papers use: ResNet-18 with LARS, bf16, channels_last
and BatchNorm over the global batch; ViT-tiny for DINO and MAE; fp16 with a loss scale.

One method (VICReg on a ResNet-18 in bf16) takes the full path: real CLI -> controller -> Ray
Job -> Ray Train on 2 gloo workers -> MLflow -> linear probe -> Model Registry. The others run
the very same ``train_loop_per_worker`` on 2 gloo ranks inside the Ray Train run shared with
the other distributed tests (tests/latent_ranks.py), each logging into its own MLflow run,
then register their encoders and load them with ``selfsup.load_encoder``. Every run must
show the collapse statistics of each epoch in MLflow.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.spec import read_yaml
from tests.conftest import Stack
from tests.train_loop_runs import (
    Runs,
    assert_loads_and_reproduces,
    register_and_assert_loads,
    register_train_loops,
    train_loop_runs,
)
from workers.train_loop import REFERENCE_FILE

EXAMPLES = Path(__file__).parent.parent / "examples"
ONLY_LINEAR = {"linear": True, "knn": False, "label_fractions": [], "finetune": False}
RESNET_LARS_BF16 = {
    "encoder": {"arch": "resnet18"},
    "train": {
        "optimizer": "lars",
        "lr": 0.3,
        "precision": "bf16",
        "channels_last": True,
        "sync_batchnorm": True,
    },
}
VIT = {"encoder": {"arch": "vit-tiny", "patch_size": 2}}

# method: (example, method overrides, other sections' overrides)
FULL_PATH = {
    "vicreg": ("vicreg-digits", {"projection_dim": 128, "hidden_dim": 128}, RESNET_LARS_BF16)
}
IN_PROCESS = {
    "byol": ("byol-digits", {}, RESNET_LARS_BF16),
    "simsiam": ("simsiam-digits", {}, {"train": {"precision": "fp16"}}),
    "barlow_twins": ("barlow_twins-digits", {"projection_dim": 128, "hidden_dim": 128}, {}),
    "dino": ("dino-digits", {"prototypes": 256, "local_crops": 2}, VIT),
    "mae": ("mae-digits", {}, {}),
}


def tiny_document(method: str, table: dict) -> dict:
    """The method's example on one epoch of 10 steps, with the table's overrides."""
    example, method_overrides, overrides = table[method]
    document = read_yaml((EXAMPLES / f"{example}.yaml").read_text())
    name = f"test-modern-{method.replace('_', '-')}"
    document["name"] = name
    document["method"].update(method_overrides)
    for section, values in overrides.items():
        # An encoder is replaced whole (its width belongs to its arch); train fields merge.
        merged = section != "encoder"
        document[section] = {**document[section], **values} if merged else values
    document["train"].update(epochs=1, warmup_epochs=0, batch_size=128, log_every_steps=1)
    document["evaluate"] = ONLY_LINEAR
    document["register"] = {"model": name, "alias": "candidate"}
    return document


def assert_logged_collapse_statistics(client: MlflowClient, run_id: str) -> None:
    metrics = client.get_run(run_id).data.metrics
    assert math.isfinite(metrics["train.epoch_loss"])
    assert 0 < metrics["collapse.std"] <= 1
    assert metrics["collapse.effective_rank"] >= 1


@pytest.mark.parametrize("method", sorted(FULL_PATH))
def test_method_runs_the_full_job_path(stack: Stack, tmp_path: Path, method: str) -> None:
    document = tiny_document(method, FULL_PATH)
    job = stack.run_job(document, tmp_path)
    job_id = job["id"]

    client = MlflowClient(stack.tracking_uri)
    assert_logged_collapse_statistics(client, job["mlflow_run_id"])
    run = client.get_run(job["mlflow_run_id"])
    assert run.data.params["encoder.arch"] == "resnet18"
    assert run.data.params["train.precision"] == "bf16"
    assert 0.1 < run.data.metrics["eval.linear.top1"] <= 1
    (checkpoint,) = {p.parent for p in (stack.home / "runs" / job_id).glob(f"*/{REFERENCE_FILE}")}
    assert_loads_and_reproduces(document["name"], stack.tracking_uri, checkpoint)
    # `encoder get` writes a folder that loads on its own: JSON config + safetensors.
    folder = tmp_path / "encoder"
    stack.cli("encoder", "get", f"{document['name']}@candidate", "-o", str(folder), check=True)
    assert_loads_and_reproduces(document["name"], None, checkpoint, folder)


register_train_loops(
    "modern_train_loop",
    lambda: {method: tiny_document(method, IN_PROCESS) for method in IN_PROCESS},
)


@pytest.fixture(scope="module")
def in_process_runs(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return train_loop_runs("modern_train_loop", tmp_path_factory)


@pytest.mark.parametrize("method", list(IN_PROCESS))
def test_method_runs_the_train_loop_and_registers_a_loadable_encoder(
    in_process_runs: Runs, method: str
) -> None:
    tracking_uri, run_id, _ = in_process_runs[method]
    assert_logged_collapse_statistics(MlflowClient(tracking_uri), run_id)
    register_and_assert_loads(in_process_runs, method, tiny_document(method, IN_PROCESS)["name"])
