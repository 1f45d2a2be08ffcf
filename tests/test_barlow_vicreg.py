"""Barlow Twins and VICReg: each loss against its equation, term by term in float64; the
terms' edge cases; on 2 real gloo DDP ranks, the statistics (standardisation, C, variance,
covariance) are the global batch's, so the losses, gradients and weights equal one process
on the concatenated batch, where per-rank statistics would not; a short training on digits
lowers each loss.

The distributed work is a part of the shared Ray Train run (tests/latent_ranks.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipelines.params import BarlowTwinsParams, VICRegParams
from pipelines.spec import load_spec_text
from tests.latent_ranks import part_results, register_part
from tests.test_contrastive_dist import shifted_views, without_batchnorm
from workers import dist
from workers.augment import build_augment
from workers.data import load_dataset
from workers.encoders import build_encoder
from workers.losses import barlow_twins_loss, vicreg_loss
from workers.methods import Batch, Method, MethodContext
from workers.methods.barlow_twins import BarlowTwins
from workers.methods.vicreg import VICReg
from workers.step import Training, build_training

WORLD, LOCAL, STEPS = 2, 4, 2
LAMBDA = 0.5  # Barlow Twins' off-diagonal weight: large, so the test sees that term too
WEIGHTS = (25.0, 25.0, 1.0)  # VICReg's lambda, mu, nu
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# ---- the equations, written out with loops over plain floats ------------------------------


def columns(z: torch.Tensor) -> list[list[float]]:
    return [list(column) for column in zip(*z.tolist(), strict=True)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def barlow_twins_by_hand(z_a: torch.Tensor, z_b: torch.Tensor, lam: float) -> dict[str, float]:
    n = len(z_a)

    def standardised(z: torch.Tensor) -> list[list[float]]:
        result = []
        for column in columns(z):
            m = mean(column)
            var = sum((x - m) ** 2 for x in column) / n  # biased
            result.append([(x - m) / math.sqrt(var + 1e-5) for x in column])
        return result

    a, b = standardised(z_a), standardised(z_b)
    d = len(a)
    c = [[sum(a[i][k] * b[j][k] for k in range(n)) / n for j in range(d)] for i in range(d)]
    on = sum((1 - c[i][i]) ** 2 for i in range(d))
    off = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return {"loss": on + lam * off, "on_diagonal": on, "off_diagonal": off}


def vicreg_by_hand(
    z_a: torch.Tensor, z_b: torch.Tensor, lam: float, mu: float, nu: float
) -> dict[str, float]:
    n, d = z_a.shape
    rows_a, rows_b = z_a.tolist(), z_b.tolist()
    invariance = sum((rows_a[k][j] - rows_b[k][j]) ** 2 for k in range(n) for j in range(d)) / (
        n * d
    )

    def variance(z: torch.Tensor) -> float:
        stds = []
        for column in columns(z):
            m = mean(column)
            stds.append(math.sqrt(sum((x - m) ** 2 for x in column) / (n - 1) + 1e-4))
        return sum(max(0.0, 1.0 - s) for s in stds) / d

    def covariance(z: torch.Tensor) -> float:
        cols = columns(z)
        means = [mean(column) for column in cols]

        def cov(i: int, j: int) -> float:
            return sum((cols[i][k] - means[i]) * (cols[j][k] - means[j]) for k in range(n)) / (
                n - 1
            )

        return sum(cov(i, j) ** 2 for i in range(d) for j in range(d) if i != j) / d

    v = (variance(z_a) + variance(z_b)) / 2
    c = covariance(z_a) + covariance(z_b)
    return {
        "loss": lam * invariance + mu * v + nu * c,
        "invariance": invariance,
        "variance": v,
        "covariance": c,
    }


def embeddings(seed: int, n: int = 9, d: int = 4, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Correlated dimensions, unequal scales and a shift: every term is far from trivial.
    mixing = torch.randn(d, d, generator=generator, dtype=torch.float64)
    z = torch.randn(n, d, generator=generator, dtype=torch.float64) @ mixing
    return scale * z + 3.0


def test_barlow_twins_loss_is_its_equation() -> None:
    z_a, z_b = embeddings(0), embeddings(1)
    terms = barlow_twins_loss(z_a, z_b, LAMBDA)
    expected = barlow_twins_by_hand(z_a, z_b, LAMBDA)
    assert expected["off_diagonal"] > 0.1 and expected["on_diagonal"] > 0.1
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-12), key


def test_vicreg_loss_is_its_equation() -> None:
    # Scale 0.4: some dimensions' std below 1, others above, so the hinge is partly active.
    z_a, z_b = embeddings(2, scale=0.4), embeddings(3, scale=0.4)
    stds = torch.cat([z_a, z_b], dim=1).std(dim=0)
    assert (stds < 1).any() and (stds > 1).any()
    terms = vicreg_loss(z_a, z_b, *WEIGHTS)
    expected = vicreg_by_hand(z_a, z_b, *WEIGHTS)
    assert min(expected.values()) > 0.01
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-12), key


def test_identical_views_have_no_invariance_and_a_unit_diagonal() -> None:
    z = embeddings(4)
    assert vicreg_loss(z, z, *WEIGHTS)["invariance"].item() == 0.0
    # C_ii = var_i / (var_i + 1e-5): one up to the standardisation's epsilon.
    var = z.var(dim=0, correction=0)
    expected = ((1e-5 / (var + 1e-5)) ** 2).sum().item()
    assert barlow_twins_loss(z, z, LAMBDA)["on_diagonal"].item() == pytest.approx(expected)
    assert expected < 1e-8


def test_variance_term_is_zero_when_every_std_is_at_least_one() -> None:
    z_a, z_b = embeddings(5, scale=3.0), embeddings(6, scale=3.0)
    assert (torch.cat([z_a, z_b], dim=1).std(dim=0) >= 1).all()
    assert vicreg_loss(z_a, z_b, *WEIGHTS)["variance"].item() == 0.0
    # ... and positive once a dimension's spread falls below 1.
    z_a[:, 0] = 3.0 + 0.1 * z_a[:, 0]
    assert vicreg_loss(z_a, z_b, *WEIGHTS)["variance"].item() > 0.0


# ---- 2 gloo ranks against one process on the concatenated batch ----------------------------


def methods() -> dict[str, Method]:
    """Fresh methods, the same initial weights in every process, BatchNorm removed from the
    projectors (the losses' own standardisation stays: it is what is under test)."""
    built: dict[str, Method] = {}
    for name, cls, params in [
        (
            "barlow_twins",
            BarlowTwins,
            BarlowTwinsParams(
                name="barlow_twins", projection_dim=5, hidden_dim=8, off_diagonal_weight=LAMBDA
            ),
        ),
        (
            "vicreg",
            VICReg,
            VICRegParams(name="vicreg", projection_dim=5, hidden_dim=8),
        ),
    ]:
        torch.manual_seed(0)
        backbone = build_encoder({"arch": "mlp", "in_channels": 1, "image_size": 8, "out_dim": 6})
        method = without_batchnorm(cls(params, MethodContext(backbone, 6, 16)))
        # He-initialised: with PyTorch's default the embeddings barely vary across samples
        # (std ~1e-3 about means ~0.3), VICReg's hinge sits at 1 and per-rank statistics
        # would hardly differ from the global batch's.
        for layer in method.modules():
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight)
        # float64: the ranks must agree with one process far below any per-rank difference.
        built[name] = method.double()
    return built


def global_images(step: int) -> torch.Tensor:
    # Centred noise rather than uniform [0, 1] images: the features of the latter barely
    # vary across samples at initialisation, and standardising them amplifies rounding.
    generator = torch.Generator().manual_seed(step)
    return torch.randn(WORLD * LOCAL, 1, 8, 8, generator=generator, dtype=torch.float64)


def train(method: Method, batches: list[torch.Tensor], wrap: bool) -> dict[str, Any]:
    """SGD steps through ``Training``; each step's outputs, the first step's gradients (DDP's
    average on the ranks) and the final weights."""
    model = DistributedDataParallel(method) if wrap else None
    training = Training.of(
        method, torch.optim.SGD(method.parameters(), lr=1e-3), shifted_views, model=model
    )
    outputs, gradients = [], {}
    for step, images in enumerate(batches):
        out = training.train_step(images, torch.arange(len(images)))
        outputs.append({key: value.item() for key, value in out.items()})
        if step == 0:
            gradients = {k: p.grad.clone() for k, p in method.named_parameters()}
    state = {key: value.clone() for key, value in method.state_dict().items()}
    return {"outputs": outputs, "gradients": gradients, "state": state}


def on_each_rank(_: None) -> dict[str, Any]:
    torch.set_num_threads(1)
    rank = dist.rank()
    local = [global_images(s)[rank * LOCAL : (rank + 1) * LOCAL] for s in range(STEPS)]
    return {name: train(method, local, wrap=True) for name, method in methods().items()}


register_part("barlow_vicreg", on_each_rank)


@pytest.fixture(scope="module")
def ranks(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return part_results("barlow_vicreg", tmp_path_factory)


def per_rank_statistics(method: Method, images: torch.Tensor) -> tuple[float, dict]:
    """What a rank would get with its own sub-batch's statistics: the mean over ranks of one
    process's loss on each slice alone, and the mean of the slices' gradients (DDP's)."""
    losses, gradients = [], []
    for rank in range(WORLD):
        method.zero_grad()
        local = images[rank * LOCAL : (rank + 1) * LOCAL]
        batch = Batch(local, torch.arange(LOCAL), 0, shifted_views)
        loss = method(batch)["loss"]
        loss.backward()
        losses.append(loss.item())
        gradients.append({k: p.grad.clone() for k, p in method.named_parameters()})
    mean_gradients = {k: (gradients[0][k] + gradients[1][k]) / 2 for k in gradients[0]}
    return sum(losses) / WORLD, mean_gradients


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_two_ranks_use_the_global_batch_statistics(ranks: list[dict], name: str) -> None:
    one = train(methods()[name], [global_images(s) for s in range(STEPS)], wrap=False)
    for rank in ranks:
        result = rank[name]
        # Every rank's loss and logged terms are the global batch's, at every step.
        for got, expected in zip(result["outputs"], one["outputs"], strict=True):
            assert got == pytest.approx(expected, rel=1e-10)
        for key, value in one["gradients"].items():
            torch.testing.assert_close(result["gradients"][key], value, rtol=1e-9, atol=1e-12)
        for key, value in one["state"].items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-9, atol=1e-12)
    for key, value in ranks[0][name]["state"].items():
        assert torch.equal(value, ranks[1][name]["state"][key]), key  # nothing broadcast
    # Every weight matrix moved far beyond the tolerances, else equality would prove nothing.
    initial = methods()[name].state_dict()
    for key, value in one["state"].items():
        if value.ndim == 2:
            assert not torch.allclose(initial[key], value, rtol=1e-6, atol=0), key

    # Negative control: each rank's own statistics give another loss and other gradients,
    # beyond the tolerances above, so a method that skipped the gather would fail this test.
    local_loss, local_gradients = per_rank_statistics(methods()[name], global_images(0))
    assert local_loss != pytest.approx(one["outputs"][0]["loss"], rel=1e-2)
    assert any(
        not torch.allclose(local_gradients[k], g, rtol=1e-2, atol=1e-4)
        for k, g in one["gradients"].items()
    )


# ---- a short training on digits, from the examples ------------------------------------------


# Deterministic (seeded weights, batches and views); measured: 404.6 -> 169.4 and 21.9 -> 20.0.
@pytest.mark.parametrize(("name", "ratio"), [("barlow_twins", 0.6), ("vicreg", 0.95)])
def test_a_short_training_on_digits_lowers_the_loss(
    one_thread: None, name: str, ratio: float
) -> None:
    """The example's spec, at half its global batch (one process, a few seconds)."""
    spec = load_spec_text((EXAMPLES / f"{name}-digits.yaml").read_text())
    batch = spec.train.batch_size // 2
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"batch_size": batch})})
    images = load_dataset("builtin:digits").images
    training = build_training(spec, (1, 8), len(images), len(images) // batch, torch.device("cpu"))
    # The loss of one fixed batch and its views (step 0), before and after training.
    probe = Batch(images[:batch], torch.arange(batch), 0, build_augment("digits", 8, 0, 0))

    def probe_loss() -> float:
        with torch.no_grad():
            return training.method(probe)["loss"].item()

    before = probe_loss()
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        indices = torch.randperm(len(images), generator=generator)[:batch]
        training.train_step(images[indices], indices)
    after = probe_loss()
    assert after < ratio * before, (before, after)
