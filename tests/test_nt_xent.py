"""NT-Xent against hand computation and against a literal loop over the equation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from workers.losses import nt_xent_loss


def test_orthogonal_pairs_by_hand() -> None:
    # Two samples whose two views coincide: each anchor has similarity 1 to its positive and
    # 0 to both negatives, so every term is -log(e^(1/t) / (e^(1/t) + 2)).
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    temperature = 0.5
    expected = math.log(1 + 2 * math.exp(-1 / temperature))
    assert nt_xent_loss(z, z.clone(), temperature).item() == pytest.approx(expected, rel=1e-6)


def literal_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> float:
    views = F.normalize(torch.cat([z_a, z_b]), dim=1)
    n = len(z_a)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        numerator = math.exp(float(views[i] @ views[positive]) / temperature)
        denominator = sum(
            math.exp(float(views[i] @ views[k]) / temperature) for k in range(2 * n) if k != i
        )
        total += -math.log(numerator / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
def test_matches_the_equation_term_by_term(temperature: float) -> None:
    generator = torch.Generator().manual_seed(7)
    z_a, z_b = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    loss = nt_xent_loss(z_a, z_b, temperature).item()
    assert loss == pytest.approx(literal_nt_xent(z_a, z_b, temperature), rel=1e-5)


def test_loss_falls_when_positives_align() -> None:
    generator = torch.Generator().manual_seed(0)
    z_a = torch.randn(8, 4, generator=generator)
    noisy = nt_xent_loss(z_a, torch.randn(8, 4, generator=generator), 0.2)
    aligned = nt_xent_loss(z_a, z_a + 0.01 * torch.randn(8, 4, generator=generator), 0.2)
    assert aligned < noisy
