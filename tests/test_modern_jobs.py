"""The regularised joint-embedding methods and MAE through the job path, on tiny budgets, with
the encoders and training options their papers use: ResNet-18 with LARS, bf16, channels_last
and BatchNorm over the global batch; ViT-tiny for DINO and MAE; fp16 with a loss scale.

Each runs the production ``train_loop_per_worker`` on 2 gloo ranks inside the Ray Train run
shared with the other distributed tests (tests/latent_ranks.py), each logging into its own
MLflow run, then registers its encoder and loads it with ``selfsup.load_encoder``; VICReg's
ResNet-18 is also fetched with `selfsup encoder get` into a folder that loads on its own.
Every run must show the collapse statistics of each epoch in MLflow. (The full path, CLI ->
controller -> Ray Job -> driver, is the same for every method and has its own tests:
tests/test_job_path.py, tests/test_contrastive_jobs.py, tests/test_latent_jobs.py.)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.spec import read_yaml
from tests.conftest import SELFSUP
from tests.train_loop_runs import (
    Runs,
    assert_loads_and_reproduces,
    register_and_assert_loads,
    register_train_loops,
    train_loop_runs,
)
from workers.export import CONFIG_FILE

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
IN_PROCESS = {
    "vicreg": ("vicreg-digits", {"projection_dim": 128, "hidden_dim": 128}, RESNET_LARS_BF16),
    "byol": ("byol-digits", {}, RESNET_LARS_BF16),
    "simsiam": ("simsiam-digits", {}, {"train": {"precision": "fp16"}}),
    "barlow_twins": ("barlow_twins-digits", {"projection_dim": 128, "hidden_dim": 128}, {}),
    "dino": ("dino-digits", {"prototypes": 256, "local_crops": 2}, VIT),
    "mae": ("mae-digits", {}, {}),
}


def tiny_document(method: str, table: dict) -> dict:
    """The method's example on one epoch of 3 steps, with the table's overrides."""
    example, method_overrides, overrides = table[method]
    document = read_yaml((EXAMPLES / f"{example}.yaml").read_text())
    name = f"test-modern-{method.replace('_', '-')}"
    document["name"] = name
    document["method"].update(method_overrides)
    for section, values in overrides.items():
        # An encoder is replaced whole (its width belongs to its arch); train fields merge.
        merged = section != "encoder"
        document[section] = {**document[section], **values} if merged else values
    # 107 training digits, 3 steps of 32. bf16 on a CPU without bf16 instructions (AVX2 only)
    # costs ~7x fp32: ResNet-18's 10 steps of 128 took 4 minutes for byol and vicreg there.
    document["train"].update(epochs=1, warmup_epochs=0, batch_size=32, log_every_steps=1)
    document["data"]["test_fraction"] = 0.94
    document["evaluate"] = ONLY_LINEAR
    document["register"] = {"model": name, "alias": "candidate"}
    return document


def assert_logged_collapse_statistics(client: MlflowClient, run_id: str) -> None:
    metrics = client.get_run(run_id).data.metrics
    assert math.isfinite(metrics["train.epoch_loss"])
    assert 0 < metrics["collapse.std"] <= 1
    assert metrics["collapse.effective_rank"] >= 1


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


def test_encoder_get_writes_a_resnet_folder_that_loads_alone(
    in_process_runs: Runs, tmp_path: Path
) -> None:
    tracking_uri, _, checkpoint = in_process_runs["vicreg"]
    name = tiny_document("vicreg", IN_PROCESS)["name"] + "-get"
    register_and_assert_loads(in_process_runs, "vicreg", name)
    folder = tmp_path / "encoder"
    subprocess.run(
        [SELFSUP, "encoder", "get", f"{name}@candidate", "-o", str(folder)],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
        check=True,
        timeout=120,
    )
    assert json.loads((folder / CONFIG_FILE).read_text())["arch"] == "resnet18"
    assert_loads_and_reproduces(name, None, checkpoint, folder)
