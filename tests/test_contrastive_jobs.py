"""Siamese, MoCo and PIRL on builtin:digits for a few steps: one epoch over a small training
split (test_fraction 0.8: 359 of the 1797 digits, 179 per worker) in global batches of 64,
i.e. 5 steps.

Each runs the very same ``train_loop_per_worker`` as a job on 2 gloo ranks inside the Ray
Train run shared with the other distributed tests (tests/train_loop_runs.py), then registers
its encoder and loads it: the same training, without a ~40 s job start-up each. The full job
path (CLI -> controller -> Ray Job -> Ray Train -> MLflow -> registry) for contrastive methods
is taken by SimCLR and PIRL on users' images (tests/test_user_data_jobs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.spec import read_yaml
from tests.train_loop_runs import (
    Runs,
    register_and_assert_loads,
    register_train_loops,
    train_loop_runs,
)

EXAMPLES = Path(__file__).parent.parent / "examples"
STEPS = 5  # (359 // 2 workers) // 32 per worker
# K: a multiple of the global batch (64), below 359 - 64; PIRL's negatives: below 359.
IN_PROCESS = {"siamese": {}, "moco": {"queue_size": 128}, "pirl": {"num_negatives": 128}}


def tiny_document(method: str, overrides: dict) -> dict:
    document = read_yaml((EXAMPLES / f"{method}-digits.yaml").read_text())
    name = f"test-{method}"
    document["name"] = name
    document["method"].update(overrides)
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
    return document


def assert_trained(client: MlflowClient, run_id: str, method: str) -> None:
    """What the train loop logs (the driver logs the spec's params, on the job path only)."""
    run = client.get_run(run_id)
    (loss,) = client.get_metric_history(run_id, "train.loss")
    assert loss.step == STEPS and loss.value > 0
    assert run.data.metrics["train.epoch_loss"] > 0
    if method == "pirl":  # both NCE terms are logged beside their mix
        assert {"train.jigsaw_loss", "train.image_loss"} <= run.data.metrics.keys()


register_train_loops(
    "contrastive_train_loop",
    lambda: {method: tiny_document(method, IN_PROCESS[method]) for method in IN_PROCESS},
)


@pytest.fixture(scope="module")
def in_process_runs(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return train_loop_runs("contrastive_train_loop", tmp_path_factory)


@pytest.mark.parametrize("method", list(IN_PROCESS))
def test_method_trains_in_the_train_loop_and_registers_a_loadable_encoder(
    in_process_runs: Runs, method: str
) -> None:
    tracking_uri, run_id, _ = in_process_runs[method]
    assert_trained(MlflowClient(tracking_uri), run_id, method)
    register_and_assert_loads(in_process_runs, method, f"test-{method}")
