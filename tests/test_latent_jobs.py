"""Every method of the latent-variable and energy-based family through the job path, on tiny
budgets (one epoch, a few steps), each ending in an encoder that ``selfsup.load_encoder``
loads and that reproduces the features its final checkpoint recorded.

A job costs ~30-40 s of Ray start-up on 2 cores, so nine jobs do not fit this module's
budget, and the full path (CLI -> controller -> Ray Job -> driver) is the same for every
method (tests/test_job_path.py). Every method here, k-means among them (the closed-form way
the train loop runs a method: no gradient, no DDP), runs the production
``train_loop_per_worker`` on 2 gloo ranks inside the Ray Train run shared with the other
distributed tests, each logging into its own MLflow run, then registers its encoder through
``pipelines.registry`` and loads it with ``selfsup.load_encoder``. They include the
unlabelled sources (whitened patches, the spiral), which the driver does not evaluate. The
driver's linear probe scores sparse coding's encoder, an inference procedure with a learned
dictionary, as a job's driver does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines import driver
from pipelines.spec import parse_spec, read_yaml
from selfsup import load_encoder
from tests.train_loop_runs import (
    Runs,
    register_and_assert_loads,
    register_train_loops,
    train_loop_runs,
)
from workers.train_loop import ENCODER_DIR

EXAMPLES = Path(__file__).parent.parent / "examples"
ONLY_LINEAR = {"linear": True, "knn": False, "label_fractions": [], "finetune": False}
NO_EVALUATION = {**ONLY_LINEAR, "linear": False, "baselines": False}
TINY_PATCHES = {"source": "builtin:patches", "patches": {"size": 16, "count": 200, "whiten": True}}
TINY_SPIRAL = {"source": "builtin:spiral", "spiral": {"count": 400}}

# method: (example, method overrides, data overrides, global batch, figure it logs)
IN_PROCESS = {
    "sparse_coding": (
        "sparse_coding-digits",
        {"atoms": 32, "max_iter": 100},
        {},
        64,
        "dictionary.png",
    ),
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


def test_the_drivers_linear_probe_scores_the_sparse_coding_encoder(
    in_process_runs: Runs,
) -> None:
    tracking_uri, run_id, checkpoint = in_process_runs["sparse_coding"]
    spec = parse_spec(tiny_document("sparse_coding", IN_PROCESS))
    encoder = load_encoder(checkpoint / ENCODER_DIR)
    client = MlflowClient(tracking_uri)
    evaluation = driver._evaluate(spec, encoder, None, client, run_id)
    assert evaluation is not None
    assert 0.1 < evaluation.metrics["eval.linear.top1"] <= 1
    logged = client.get_run(run_id).data.metrics
    assert logged["eval.linear.top1"] == evaluation.metrics["eval.linear.top1"]
