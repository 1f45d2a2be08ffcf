"""The latent-variable family on 2 real gloo DDP ranks (Ray Train) against one process on the
concatenated batch: sparse coding's dictionary steps (gradients all-reduced by DDP, then
unit columns), k-means' and PCA's closed-form updates (statistics summed over ranks), and
persistent-CD chains kept identical on every rank.

One Ray Train run does all the distributed work (shared with tests/test_latent_jobs.py
through tests/latent_ranks.py); each test checks one property of it.
"""

from __future__ import annotations

from typing import Any

import pytest
import ray.train.torch
import torch

from pipelines.params import KMeansParams, PCAParams, RBMParams, SparseCodingParams
from tests.latent_ranks import part_results, register_part
from workers import dist
from workers.augment import build_augment
from workers.data import load_dataset
from workers.encoders import build_encoder
from workers.methods import Method, MethodContext
from workers.methods.kmeans import KMeans
from workers.methods.pca import PCA
from workers.methods.rbm import RBM
from workers.methods.sparse_coding import SparseCoding
from workers.step import Training

WORLD, LOCAL, STEPS = 2, 24, 3
AUGMENT = build_augment("none", 8, 0, 0)


def global_batch(step: int) -> torch.Tensor:
    """The global batch of a step: digits, WORLD * LOCAL of them, (48, 1, 8, 8)."""
    digits = load_dataset("builtin:digits").images
    return digits[step * WORLD * LOCAL : (step + 1) * WORLD * LOCAL]


def methods() -> dict[str, Method]:
    """Fresh methods with the same initial state in every process."""
    torch.manual_seed(0)
    context = mlp_context()
    sparse_coding = SparseCodingParams(
        name="sparse_coding", atoms=32, lam=0.5, solver="fista", tol=1e-6, max_iter=2000
    )
    return {
        "sparse_coding": SparseCoding(sparse_coding, context),
        "kmeans": KMeans(KMeansParams(name="kmeans", clusters=6), context),
        "pca": PCA(PCAParams(name="pca", components=5), context),
    }


def mlp_context() -> MethodContext:
    backbone = build_encoder({"arch": "mlp", "in_channels": 1, "image_size": 8, "out_dim": 4})
    return MethodContext(backbone, feature_dim=4, num_samples=0)


def train(method: Method, local_batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The train loop's step: DDP only when there is a gradient (as in workers.train_loop)."""
    trainable = any(parameter.requires_grad for parameter in method.parameters())
    model = (
        ray.train.torch.prepare_model(method, parallel_strategy="ddp")
        if trainable and dist.world_size() > 1
        else method
    )
    optimizer = torch.optim.SGD([{"params": list(method.parameters())}], lr=0.05)
    training = Training.of(method, optimizer, AUGMENT, model=model)
    for images in local_batches:
        training.train_step(images, torch.arange(len(images)))
    return {key: value.detach().clone() for key, value in method.state_dict().items()}


def on_each_rank(_: None) -> dict[str, Any]:
    torch.set_num_threads(1)
    rank = dist.rank()
    local = [global_batch(step)[rank * LOCAL : (rank + 1) * LOCAL] for step in range(STEPS)]
    states = {name: train(method, local) for name, method in methods().items()}

    torch.manual_seed(0)
    rbm = RBM(
        RBMParams(name="rbm", hidden=16, cd_steps=1, persistent=True, chains=8), mlp_context()
    )
    before = rbm.chains.samples.clone()
    train(rbm, local[:1])
    return {"states": states, "chains_before": before, "chains_after": rbm.chains.samples}


register_part("distributed", on_each_rank)


@pytest.fixture(scope="module")
def ranks(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return part_results("distributed", tmp_path_factory)


@pytest.fixture(scope="module")
def one_process() -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: train(method, [global_batch(step) for step in range(STEPS)])
        for name, method in methods().items()
    }


@pytest.mark.parametrize("name", ["sparse_coding", "kmeans", "pca"])
def test_two_ranks_learn_what_one_process_learns_on_the_concatenated_batch(
    ranks: list[dict[str, Any]], one_process: dict[str, dict[str, torch.Tensor]], name: str
) -> None:
    reference = one_process[name]
    for rank in ranks:
        state = rank["states"][name]
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # The run really moved away from the initial state (else equality would prove nothing).
    initial = methods()[name].state_dict()
    changed = [not torch.allclose(initial[key], reference[key]) for key in reference]
    assert any(changed)


def test_persistent_chains_are_identical_on_every_rank_and_each_rank_moved_its_own(
    ranks: list[dict[str, Any]],
) -> None:
    first, second = ranks
    torch.testing.assert_close(first["chains_before"], second["chains_before"])
    torch.testing.assert_close(first["chains_after"], second["chains_after"])
    before, after = first["chains_before"], first["chains_after"]
    for rank in range(WORLD):
        rows = slice(rank * 8, (rank + 1) * 8)
        assert not torch.equal(before[rows], after[rows]), f"rank {rank}'s chains did not move"


def test_state_dicts_cover_the_learned_state() -> None:
    """What a checkpoint needs: counts and sums of the closed-form methods are buffers."""
    keys = {name: set(method.state_dict()) for name, method in methods().items()}
    assert {"coder.prototypes", "counts", "started"} <= keys["kmeans"]
    assert {"count", "total", "outer", "coder.mean", "coder.components"} <= keys["pca"]
    assert keys["sparse_coding"] == {"coder.dictionary"}
