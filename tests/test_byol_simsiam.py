"""BYOL and SimSiam: the losses against their equations, the stop-gradients, BYOL's EMA target
and its cosine momentum schedule, exact resume, 2 real gloo DDP ranks against one process on
the concatenated batch (a part of the shared run in tests/latent_ranks.py), and a short
training on digits that lowers the loss without collapsing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from pipelines.params import BYOLParams, SimSiamParams
from pipelines.spec import EncoderSpec, load_spec_text
from tests.latent_ranks import part_results, register_part
from tests.resume import straight_halfway_resumed
from tests.test_contrastive_dist import shifted_views, without_batchnorm
from workers import dist
from workers.augment import build_augment
from workers.data import load_dataset
from workers.encoders import build_encoder
from workers.losses import byol_loss, negative_cosine_similarity
from workers.methods import Batch, Method, MethodContext
from workers.methods.byol import BYOL
from workers.methods.simsiam import SimSiam
from workers.step import Training, build_training

EXAMPLES = Path(__file__).parent.parent / "examples"
AUGMENT = build_augment("digits", 8, seed=0, rank=0)
WORLD, LOCAL, STEPS = 2, 4, 3


def byol(seed: int = 0, total_steps: int = 4, schedule: str = "cosine") -> BYOL:
    torch.manual_seed(seed)
    backbone = build_encoder(EncoderSpec(arch="small-convnet", out_dim=16).config(1, 8))
    params = BYOLParams(
        name="byol",
        projection_dim=8,
        hidden_dim=16,
        predictor_hidden_dim=16,
        momentum=0.9,
        momentum_schedule=schedule,
    )
    return BYOL(params, MethodContext(backbone, 16, 64, total_steps))


def simsiam(seed: int = 0) -> SimSiam:
    torch.manual_seed(seed)
    backbone = build_encoder(EncoderSpec(arch="small-convnet", out_dim=16).config(1, 8))
    params = SimSiamParams(name="simsiam", projection_dim=8, hidden_dim=16, predictor_hidden_dim=4)
    return SimSiam(params, MethodContext(backbone, 16, 64))


def digits(count: int = 64) -> torch.Tensor:
    return load_dataset("builtin:digits").images[:count]


def sgd_training(method: Method, step: int = 0) -> Training:
    training = Training.of(method, torch.optim.SGD(method.parameters(), lr=0.1), AUGMENT)
    training.step = step
    return training


def online_and_target(method: BYOL) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    online = [p.detach().clone() for p in method._online_parameters()]
    return online, [p.detach().clone() for p in method.target.parameters()]


# ---- losses ------------------------------------------------------------------------------


def test_losses_match_their_equations_term_by_term() -> None:
    generator = torch.Generator().manual_seed(0)
    p, z = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    cosines = [float(p[i] @ z[i] / (p[i].norm() * z[i].norm())) for i in range(5)]
    squared = [float((p[i] / p[i].norm() - z[i] / z[i].norm()).norm() ** 2) for i in range(5)]
    assert negative_cosine_similarity(p, z).item() == pytest.approx(-sum(cosines) / 5, rel=1e-5)
    # The normalised MSE, and 2 - 2 cos, term by term.
    assert byol_loss(p, z).item() == pytest.approx(sum(squared) / 5, rel=1e-5)
    assert byol_loss(p, z).item() == pytest.approx(sum(2 - 2 * c for c in cosines) / 5, rel=1e-5)
    assert byol_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(-z, z).item() == pytest.approx(4.0, rel=1e-6)


def test_the_losses_stop_the_gradient_of_their_target() -> None:
    p, z = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    for loss in (negative_cosine_similarity(p, z), byol_loss(p, z)):
        grad_p, grad_z = torch.autograd.grad(loss, [p, z], allow_unused=True)
        assert grad_z is None and grad_p is not None and grad_p.abs().sum() > 0


# ---- BYOL: target network ------------------------------------------------------------------


def test_byol_target_starts_as_the_online_network_and_gets_no_gradient() -> None:
    method = byol()
    online, target = online_and_target(method)
    assert all(torch.equal(a, b) for a, b in zip(online, target, strict=True))
    assert not any(p.requires_grad for p in method.target.parameters())
    sgd_training(method).train_step(digits(16), torch.arange(16))
    assert all(p.grad is None for p in method.target.parameters())
    # Even were its parameters trainable, no gradient would reach them: the stop-gradient.
    method.target.requires_grad_(True)
    loss = method(Batch(digits(16), torch.arange(16), 1, AUGMENT))["loss"]
    grads = torch.autograd.grad(loss, list(method.target.parameters()), allow_unused=True)
    assert all(grad is None for grad in grads)
    assert method.encoder() is method.backbone and method.encoder().config["arch"]


@pytest.mark.parametrize("step", [0, 1, 3])
def test_byol_ema_update_by_hand_with_the_cosine_schedule(step: int) -> None:
    total, base = 4, 0.9
    method = byol(total_steps=total)
    _, target_before = online_and_target(method)
    sgd_training(method, step).train_step(digits(16), torch.arange(16))
    online_after, target_after = online_and_target(method)
    tau = 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2
    assert method.momentum_at(step) == pytest.approx(tau)
    for before, online, after in zip(target_before, online_after, target_after, strict=True):
        torch.testing.assert_close(after, tau * before + (1 - tau) * online)
    assert not torch.equal(target_after[0], target_before[0])


def test_byol_momentum_is_the_base_at_step_zero_and_one_at_the_end() -> None:
    method = byol(total_steps=4)
    assert method.momentum_at(0) == 0.9 and method.momentum_at(4) == 1.0
    assert byol(schedule="constant").momentum_at(3) == 0.9
    # A step at the end of the schedule leaves the target exactly where it was.
    _, target_before = online_and_target(method)
    sgd_training(method, 4).train_step(digits(16), torch.arange(16))
    _, target_after = online_and_target(method)
    assert all(torch.equal(a, b) for a, b in zip(target_before, target_after, strict=True))


# ---- SimSiam: stop-gradient ------------------------------------------------------------------


def test_simsiam_gradient_is_that_of_the_loss_with_detached_projections() -> None:
    method = simsiam()
    batch = Batch(digits(16), torch.arange(16), 0, AUGMENT)
    parameters = list(method.parameters())
    outputs = method(batch)
    actual = torch.autograd.grad(outputs["loss"], parameters)

    def D(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # noqa: N802 - the paper's name
        return -F.cosine_similarity(p, z, dim=1).mean()

    z = method.projector(method.backbone(torch.cat([batch.view(0), batch.view(1)])))
    (p1, p2), (z1, z2) = method.predictor(z).chunk(2), z.chunk(2)
    stopped = D(p1, z2.detach()) / 2 + D(p2, z1.detach()) / 2
    through = D(p1, z2) / 2 + D(p2, z1) / 2
    assert outputs["loss"].item() == pytest.approx(stopped.item(), rel=1e-6)
    expected = torch.autograd.grad(stopped, parameters, retain_graph=True)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want)
    # Without the stop-gradient the backbone's gradient would be another one.
    backbone_grad = torch.autograd.grad(through, parameters)[0]
    assert not torch.allclose(actual[0], backbone_grad, atol=1e-6)


# ---- exact resume ----------------------------------------------------------------------------


def build(name: str, seed: int) -> Training:
    spec = load_spec_text((EXAMPLES / f"{name}-digits.yaml").read_text())
    torch.manual_seed(seed)
    backbone = build_encoder(EncoderSpec(arch="small-convnet", out_dim=32).config(1, 8))
    method_class = BYOL if name == "byol" else SimSiam
    method = method_class(spec.method, MethodContext(backbone, 32, 64, total_steps=6))
    return Training.of(method, torch.optim.Adam(method.parameters(), lr=1e-3), AUGMENT)


def train_steps(training: Training, steps: range, images: torch.Tensor) -> None:
    # BYOL's momentum schedule reads the step Training carries (and its checkpoint restores).
    assert training.step == steps.start
    for step in steps:
        indices = (torch.arange(16) + 16 * step) % 64
        training.train_step(images[indices], indices)


@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_resume_is_exact(name: str, tmp_path: Path) -> None:
    expected, halfway, actual = straight_halfway_resumed(
        lambda seed: build(name, seed), train_steps, digits(), tmp_path
    )
    assert expected.keys() == actual.keys()
    if name == "byol":
        target = [key for key in expected if key.startswith("target.")]
        assert target and any(not torch.equal(expected[k], halfway[k]) for k in target)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


# ---- 2 gloo ranks against one process ---------------------------------------------------------


def global_images(step: int) -> torch.Tensor:
    return torch.rand(WORLD * LOCAL, 1, 8, 8, generator=torch.Generator().manual_seed(step))


def methods() -> dict[str, Method]:
    """Fresh methods, the same in every process; BatchNorm removed (per rank by design)."""
    torch.manual_seed(0)
    mlp = {"arch": "mlp", "in_channels": 1, "image_size": 8, "out_dim": 6, "hidden_dim": 16}
    context = MethodContext(build_encoder(mlp), 6, 64, total_steps=STEPS)
    return {
        "byol": without_batchnorm(
            BYOL(
                BYOLParams(name="byol", projection_dim=4, hidden_dim=8, predictor_hidden_dim=8),
                context,
            )
        ),
        "simsiam": without_batchnorm(
            SimSiam(
                SimSiamParams(
                    name="simsiam", projection_dim=4, hidden_dim=8, predictor_hidden_dim=2
                ),
                MethodContext(build_encoder(mlp), 6, 64),
            )
        ),
    }


def train(method: Method, batches: list[torch.Tensor], wrap: bool) -> dict[str, Any]:
    model = DistributedDataParallel(method) if wrap else None
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    training = Training.of(method, optimizer, shifted_views, model=model)
    losses = [
        dist.all_reduce_mean(training.train_step(images, torch.arange(len(images)))["loss"])
        for images in batches
    ]
    state = {key: value.detach().clone() for key, value in method.state_dict().items()}
    return {"losses": [loss.item() for loss in losses], "state": state}


def on_each_rank(_: None) -> dict[str, Any]:
    torch.set_num_threads(1)
    rank = dist.rank()
    local = [global_images(s)[rank * LOCAL : (rank + 1) * LOCAL] for s in range(STEPS)]
    return {name: train(method, local, wrap=True) for name, method in methods().items()}


register_part("byol_simsiam", on_each_rank)


@pytest.fixture(scope="module")
def ranks(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return part_results("byol_simsiam", tmp_path_factory)


@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(
    ranks: list[dict[str, Any]], name: str
) -> None:
    one = train(methods()[name], [global_images(s) for s in range(STEPS)], wrap=False)
    initial = methods()[name].state_dict()
    for rank in ranks:
        assert rank[name]["losses"] == pytest.approx(one["losses"], rel=1e-5)
        for key, value in one["state"].items():  # online and (BYOL) target weights
            # Bit-identical on the ranks, with nothing broadcast to make them so ...
            assert torch.equal(rank[name]["state"][key], ranks[0][name]["state"][key]), key
            # ... and what one process learns on the concatenated batches.
            torch.testing.assert_close(rank[name]["state"][key], value, msg=key)
    moved = [key for key in initial if not torch.allclose(initial[key], one["state"][key])]
    assert moved and (name == "simsiam" or any(key.startswith("target.") for key in moved))


# ---- a short training on digits ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_short_training_on_digits_lowers_the_loss_without_collapse(
    one_thread: None, name: str
) -> None:
    spec = load_spec_text((EXAMPLES / f"{name}-digits.yaml").read_text())
    images = load_dataset("builtin:digits").images[: spec.data.train_size]
    batch = spec.train.batch_size // 2  # half the example's global batch: half the time
    training = build_training(spec, (1, 8), len(images), len(images) // batch, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    losses, stds = [], []
    for _ in range(30):
        indices = torch.randperm(len(images), generator=generator)[:batch]
        outputs = training.train_step(images[indices], indices)
        losses.append(outputs["loss"].item())
        stds.append(outputs["projection_std"].item())
    first, last = losses[0], sum(losses[-5:]) / 5
    assert last < first - 0.2, losses
    # Spread over the sphere: 1/sqrt(d), 0.125 for d = 64; a collapsed projector gives 0.
    assert min(stds[-5:]) > 0.5 / math.sqrt(spec.method.projection_dim), stds
