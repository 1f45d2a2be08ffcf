"""The noise of the sampling and corrupting methods (DAE, VAE, RBM, Langevin EBM): drawn per
rank, so data-parallel workers do not duplicate each other; reproducible, so a resumed run
equals an uninterrupted one; and a checkpoint's per-worker samples refuse another number of
workers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelines.params import DAEParams, LangevinEBMParams, RBMParams, VAEParams
from tests.latent_ranks import part_results, register_part
from tests.resume import straight_halfway_resumed
from workers import dist
from workers.augment import build_augment
from workers.data import load_dataset
from workers.encoders import build_encoder
from workers.methods import Batch, Method, MethodContext
from workers.methods.dae import DAE
from workers.methods.ebm_langevin import LangevinEBM
from workers.methods.rbm import RBM
from workers.methods.vae import VAE
from workers.step import Training

AUGMENT = build_augment("none", 8, 0, 0)
BATCH = 16


def on_mlp() -> MethodContext:
    """An MLP backbone on 8x8 digits, 8 features wide."""
    backbone = build_encoder({"arch": "mlp", "in_channels": 1, "image_size": 8, "out_dim": 8})
    return MethodContext(backbone, feature_dim=8, num_samples=0)


def dae(corruption: str) -> DAEParams:
    return DAEParams(
        name="dae",
        corruption=corruption,
        noise_std=0.3,
        mask_ratio=0.5,
        mask_patch=2,
        hidden_dim=32,
    )


def rbm(persistent: bool) -> RBMParams:
    return RBMParams(name="rbm", hidden=16, cd_steps=1, persistent=persistent, chains=8)


EBM = LangevinEBMParams(
    name="ebm_langevin",
    langevin_steps=3,
    step_size=0.01,
    noise_std=0.1,
    buffer_size=32,
    reinit_fraction=1.0,
    energy_penalty=0.1,
    energy_limit=1e4,
)

# name -> constructor; every one of them draws noise inside its training step.
NOISY: dict[str, Callable[[], Method]] = {
    "dae_noise": lambda: DAE(dae("noise"), on_mlp()),
    "dae_mask": lambda: DAE(dae("mask"), on_mlp()),
    "vae": lambda: VAE(VAEParams(name="vae", latent_dim=4, beta=1.0, hidden_dim=32), on_mlp()),
    "rbm_cd": lambda: RBM(rbm(persistent=False), on_mlp()),
    "rbm_pcd": lambda: RBM(rbm(persistent=True), on_mlp()),
    # Every negative starts from fresh noise, so only the noise can tell two ranks apart (each
    # rank's own replay-buffer slice would differ anyway).
    "ebm": lambda: LangevinEBM(EBM, on_mlp()),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str, seed: int) -> Training:
    torch.manual_seed(seed)
    method = NOISY[name]()
    return Training.of(method, torch.optim.Adam(method.parameters(), lr=1e-2), AUGMENT, seed=7)


def train_steps(training: Training, steps: range, images: torch.Tensor) -> None:
    for step in steps:
        indices = (torch.arange(BATCH) + BATCH * step) % len(images)
        training.train_step(images[indices], indices)


def digits() -> torch.Tensor:
    return load_dataset("builtin:digits").images[:64]


@pytest.mark.parametrize("name", list(NOISY))
def test_resume_is_exact(name: str, tmp_path: Path) -> None:
    images = digits()
    expected, halfway, actual = straight_halfway_resumed(
        lambda seed: build(name, seed=seed), train_steps, images, tmp_path
    )
    assert expected.keys() == actual.keys()
    assert any(not torch.equal(expected[key], halfway[key]) for key in expected)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def one_step_losses(seed: int) -> dict[str, float]:
    """Each noisy method's loss on the same 16 digits at step 5, from the same initial state:
    only the noise can make two of these differ."""
    images = digits()[:BATCH]
    losses = {}
    for name in NOISY:
        method = build(name, seed=0).method
        batch = Batch(images, torch.arange(BATCH), 5, AUGMENT, seed=seed)
        losses[name] = method(batch)["loss"].item()
    return losses


def test_noise_comes_from_the_train_seed_not_the_global_generator() -> None:
    first = one_step_losses(seed=3)
    torch.rand(1000)  # moves the global generator, which the methods must not draw from
    assert one_step_losses(seed=3) == first
    other = one_step_losses(seed=4)
    assert all(other[name] != first[name] for name in NOISY), (first, other)


def on_each_rank(_: None) -> dict[str, Any]:
    torch.set_num_threads(1)
    return {"rank": dist.rank(), "losses": one_step_losses(seed=3)}


register_part("noise", on_each_rank)


def test_two_ranks_draw_different_noise_at_the_same_step(
    ray_local: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    first, second = part_results("noise", tmp_path_factory)
    assert (first["rank"], second["rank"]) == (0, 1)
    # Rank 0 of a gang draws what a single process draws: the stream depends on the rank only.
    assert first["losses"] == one_step_losses(seed=3)
    for name in NOISY:
        assert first["losses"][name] != second["losses"][name], name


def test_per_worker_samples_refuse_a_checkpoint_of_another_number_of_workers() -> None:
    """A 1-worker run cannot resume the replay buffer / persistent chains that 2 workers
    wrote (rank r owns rows r * per_rank ...): a clear error, not a shape mismatch."""
    for name in ("ebm", "rbm_pcd"):
        method = build(name, seed=0).method
        state = method.state_dict()
        (key,) = [key for key in state if key.endswith(".samples")]
        two_workers = {**state, key: torch.cat([state[key], state[key]])}
        with pytest.raises(ValueError, match=r"written by 2 workers .* this run has 1"):
            method.load_state_dict(two_workers)
        method.load_state_dict(state)  # the same number of workers loads
