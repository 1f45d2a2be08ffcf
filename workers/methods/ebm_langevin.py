"""A neural energy-based model F(y) = head(backbone(y)), trained with negatives from Langevin
dynamics ("kick the marble"). The encoder stored is the backbone."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipelines.params import LangevinEBMParams
from workers import dist
from workers.figures import energy_landscape, is_plane, tile_grid
from workers.latent_encoders import sample_shape
from workers.methods.base import Batch, Method, MethodContext, register_method
from workers.rank_state import RankSlices


def contrastive_energy_loss(
    data_energy: torch.Tensor, negative_energy: torch.Tensor, penalty: float
) -> torch.Tensor:
    """mean F(y+) - mean F(y-) + penalty * (mean F(y+)^2 + mean F(y-)^2): push data down,
    negatives up, and keep energies near 0 so the difference cannot run off. (n,), (m,) -> ()."""
    contrast = data_energy.mean() - negative_energy.mean()
    return contrast + penalty * (data_energy.pow(2).mean() + negative_energy.pow(2).mean())


@register_method(LangevinEBMParams)
class LangevinEBM(Method):
    """Negatives start from a replay buffer of earlier negatives (each one replaced by fresh
    uniform noise on [-1, 1] with probability ``reinit_fraction``) and follow ``langevin_steps``
    steps of y <- y - step_size * grad F(y) + noise_std * eps; they go back into the buffer.
    The buffer is kept in step on all ranks and checkpointed. If an energy or a sample leaves
    [-energy_limit, energy_limit] or stops being finite, the job fails with the reason instead
    of writing NaNs."""

    def __init__(self, params: LangevinEBMParams, context: MethodContext) -> None:
        super().__init__()
        self.backbone = context.backbone
        self.head = nn.Linear(context.feature_dim, 1)
        self.langevin = (params.langevin_steps, params.step_size, params.noise_std)
        self.reinit_fraction, self.energy_penalty = params.reinit_fraction, params.energy_penalty
        self.energy_limit = params.energy_limit
        shape = (dist.world_size() * params.buffer_size, *sample_shape(context.backbone.config))
        self.buffer = RankSlices(params.buffer_size, 2 * torch.rand(shape) - 1)

    def energy(self, y: torch.Tensor) -> torch.Tensor:
        """F(y), per sample: (n, ...) -> (n,)."""
        return self.head(self.backbone(y)).squeeze(1)

    def sample(self, start: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Langevin dynamics from ``start``, noise from ``generator``; the result carries no
        graph."""
        steps, step_size, noise_std = self.langevin
        y = start.detach()
        for _ in range(steps):
            y.requires_grad_(True)
            (gradient,) = torch.autograd.grad(self.energy(y).sum(), y)
            eps = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
            y = (y - step_size * gradient + noise_std * eps).detach()
        return y

    def _guard(self, step: int, **values: torch.Tensor) -> None:
        for name, value in values.items():
            largest = value.detach().abs().max().item()
            if not largest <= self.energy_limit:  # also catches NaN
                raise FloatingPointError(
                    f"ebm_langevin diverged at step {step}: |{name}| reached {largest:.3g} "
                    f"(method.energy_limit is {self.energy_limit:g}); lower method.step_size or "
                    "method.noise_std, or raise method.energy_penalty"
                )

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        y, generator = batch.images, batch.generator()
        draw = {"device": y.device, "generator": generator}
        rows = torch.randint(0, self.buffer.per_rank, (len(y),), **draw)
        start = self.buffer.local(rows)
        fresh = torch.rand(len(y), **draw) < self.reinit_fraction
        noise = 2 * torch.rand(start.shape, dtype=start.dtype, **draw) - 1
        start[fresh] = noise[fresh]
        negatives = self.sample(start, generator)
        self._guard(batch.step, negative_samples=negatives)
        self.buffer.write(rows, negatives)
        energies = self.energy(torch.cat([y, negatives]))  # one pass: shared BatchNorm statistics
        data_energy, negative_energy = energies[: len(y)], energies[len(y) :]
        self._guard(batch.step, data_energy=data_energy, negative_energy=negative_energy)
        return {
            "loss": contrastive_energy_loss(data_energy, negative_energy, self.energy_penalty),
            "data_energy": data_energy.mean().detach(),
            "negative_energy": negative_energy.mean().detach(),
        }

    def encoder(self) -> nn.Module:
        return self.backbone

    def figures(self, data: torch.Tensor) -> dict[str, np.ndarray]:
        if is_plane(data):
            title = "Langevin EBM energy F(y)"
            return {"energy_landscape.png": energy_landscape(self.energy, data, title)}
        return {"negatives.png": tile_grid(self.buffer.local()[:64], symmetric=False)}
