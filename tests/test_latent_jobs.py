"""Every method of the latent-variable and energy-based family through the job path, on tiny
budgets (one epoch, a few steps), each ending in an encoder that ``selfsup.load_encoder``
loads and that reproduces the features its final checkpoint recorded.

A job costs ~30-40 s of Ray start-up on 2 cores, so nine jobs do not fit this module's
budget. Sparse coding takes the full path (real CLI -> controller -> Ray Job -> Ray Train on
2 gloo workers -> MLflow -> linear probe -> Model Registry): DDP gradients, and an inference
procedure with a learned dictionary as the encoder. The others, k-means among them (the
closed-form way the train loop runs a method: no gradient, no DDP), run the very same
``train_loop_per_worker`` on 2 gloo ranks inside ONE Ray Train run, each logging into its own
MLflow run, then register their encoders through ``pipelines.registry`` and load them with
``selfsup.load_encoder``. They include the unlabelled sources (whitened patches, the
spiral), which the driver does not evaluate.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
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
NO_EVALUATION = {**ONLY_LINEAR, "linear": False, "baselines": False}
TINY_PATCHES = {"source": "builtin:patches", "patches": {"size": 16, "count": 200, "whiten": True}}
TINY_SPIRAL = {"source": "builtin:spiral", "spiral": {"count": 400}}

# method: (example, method overrides, data overrides, global batch, figure it logs)
FULL_PATH = {
    "sparse_coding": (
        "sparse_coding-digits",
        {"atoms": 32, "max_iter": 100},
        {},
        64,
        "dictionary.png",
    ),
}
IN_PROCESS = {
    "kmeans": ("kmeans-digits", {"clusters": 16}, {}, 64, "prototypes.png"),
    "vae": ("vae-digits", {}, {}, 64, "reconstructions.png"),
    "pca": ("pca-digits", {"components": 8}, {}, 64, "components.png"),
    "lista": (
        "lista-digits",
        {"atoms": 32, "layers": 3, "max_iter": 100},
        {},
        64,
        "dictionary.png",
    ),
    "lista_fista_energy": (  # the other LISTA: FISTA unrolled, trained on the energy
        "lista-digits",
        {"atoms": 32, "layers": 3, "max_iter": 100, "momentum": True, "loss": "energy"},
        {},
        64,
        "dictionary.png",
    ),
    "conv_sparse_coding": (
        "conv_sparse_coding-patches",
        {"kernels": 4, "kernel_size": 5, "max_iter": 30},
        TINY_PATCHES,
        32,
        "kernels.png",
    ),
    "dae": ("dae-spiral", {}, TINY_SPIRAL, 64, "energy_landscape.png"),
    "rbm": ("rbm-digits", {"chains": 16}, {}, 64, "filters.png"),
    "ebm_langevin": (
        "ebm_langevin-spiral",
        {"langevin_steps": 5},
        TINY_SPIRAL,
        64,
        "energy_landscape.png",
    ),
}


def tiny_document(method: str, table: dict) -> dict:
    example, method_overrides, data_overrides, batch, _ = table[method]
    document = read_yaml((EXAMPLES / f"{example}.yaml").read_text())
    name = f"test-latent-{method.replace('_', '-')}"
    document["name"] = name
    document["method"].update(method_overrides)
    document["data"] = {**document["data"], **data_overrides}
    document["train"].update(epochs=1, batch_size=batch, log_every_steps=1)
    labelled = document["data"]["source"] == "builtin:digits"
    document["evaluate"] = ONLY_LINEAR if labelled else NO_EVALUATION
    document["register"] = {"model": name, "alias": "candidate"}
    return document


def assert_run_logged(client: MlflowClient, run_id: str, figure: str) -> None:
    """The train loop's rank 0 logged the epoch's loss and the method's picture."""
    run = client.get_run(run_id)
    assert torch.isfinite(torch.tensor(run.data.metrics["train.epoch_loss"]))
    logged = [artifact.path for artifact in client.list_artifacts(run_id, "figures")]
    assert f"figures/{figure}" in logged, logged


@pytest.mark.parametrize("method", sorted(FULL_PATH))
def test_method_runs_the_full_job_path(stack: Stack, tmp_path: Path, method: str) -> None:
    document = tiny_document(method, FULL_PATH)
    job = stack.run_job(document, tmp_path)
    job_id = job["id"]

    client = MlflowClient(stack.tracking_uri)
    assert_run_logged(client, job["mlflow_run_id"], FULL_PATH[method][-1])
    run = client.get_run(job["mlflow_run_id"])
    assert run.data.params["method.name"] == method
    assert 0.1 < run.data.metrics["eval.linear.top1"] <= 1
    (checkpoint,) = {p.parent for p in (stack.home / "runs" / job_id).glob(f"*/{REFERENCE_FILE}")}
    assert_loads_and_reproduces(document["name"], stack.tracking_uri, checkpoint)


register_train_loops(
    "train_loop", lambda: {method: tiny_document(method, IN_PROCESS) for method in IN_PROCESS}
)


@pytest.fixture(scope="module")
def in_process_runs(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return train_loop_runs("train_loop", tmp_path_factory)


@pytest.mark.parametrize("method", list(IN_PROCESS))
def test_method_runs_the_train_loop_and_registers_a_loadable_encoder(
    in_process_runs: Runs, method: str
) -> None:
    tracking_uri, run_id, _ = in_process_runs[method]
    assert_run_logged(MlflowClient(tracking_uri), run_id, IN_PROCESS[method][-1])
    register_and_assert_loads(in_process_runs, method, tiny_document(method, IN_PROCESS)["name"])
