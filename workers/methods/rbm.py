"""Binary restricted Boltzmann machine: E(y, z) = -z^T W y - b^T y - c^T z, trained with
contrastive divergence (CD-k) or persistent CD. The encoder gives p(z = 1 | y) = sigmoid(Wy + c)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.params import RBMParams
from workers import dist
from workers.encoders import build_encoder
from workers.figures import tile_grid
from workers.latent_encoders import flat_dim
from workers.methods.base import Batch, Method, MethodContext, register_method
from workers.rank_state import RankSlices

FIGURE_GIBBS_STEPS = 500  # from noise, for the picture of the model's own samples


def free_energy(
    y: torch.Tensor, weight: torch.Tensor, visible_bias: torch.Tensor, hidden_bias: torch.Tensor
) -> torch.Tensor:
    """F(y) = -log sum_z exp(-E(y, z)) = -b^T y - sum_j softplus(c_j + W_j y). (n, V) -> (n,)."""
    return -(y @ visible_bias) - F.softplus(y @ weight.T + hidden_bias).sum(1)


@register_method(RBMParams)
class RBM(Method):
    """loss = mean F(y_data) - mean F(y_model), y_model held fixed: its gradient is the CD
    update (lower the energy of the data, raise that of the model's samples). y_model comes
    from ``cd_steps`` Gibbs sweeps started at the batch (CD-k) or, if ``persistent``, at
    ``chains`` persistent chains per rank that are never reset to data; the chains are a
    buffer, so they are in the checkpoint. Data must lie in [0, 1] (grey levels are read as
    the probability that a pixel is on)."""

    def __init__(self, params: RBMParams, context: MethodContext) -> None:
        super().__init__()
        visible = flat_dim(context.backbone.config)
        self.hidden_units = build_encoder(
            {"arch": "rbm-hidden", "visible": visible, "hidden": params.hidden}
        )
        self.visible_bias = nn.Parameter(torch.zeros(visible))  # b (V,)
        self.cd_steps = params.cd_steps
        self.chains = None
        if params.persistent:
            start = torch.bernoulli(torch.full((dist.world_size() * params.chains, visible), 0.5))
            self.chains = RankSlices(params.chains, start)

    def gibbs(self, visible: torch.Tensor, steps: int, generator: torch.Generator) -> torch.Tensor:
        """``steps`` sweeps y -> z ~ p(z|y) -> y ~ p(y|z), the coins drawn from ``generator``;
        returns binary y. (m, V) -> (m, V)."""
        weight = self.hidden_units.weight.detach()
        hidden_bias, visible_bias = (
            self.hidden_units.hidden_bias.detach(),
            self.visible_bias.detach(),
        )
        for _ in range(steps):
            hidden = torch.bernoulli(
                torch.sigmoid(visible @ weight.T + hidden_bias), generator=generator
            )
            visible = torch.bernoulli(
                torch.sigmoid(hidden @ weight + visible_bias), generator=generator
            )
        return visible

    def energy(self, y: torch.Tensor) -> torch.Tensor:
        """F(y) under the current weights, per sample."""
        units = self.hidden_units
        return free_energy(y.flatten(1), units.weight, self.visible_bias, units.hidden_bias)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        y = batch.images.flatten(1)
        if y.min() < 0 or y.max() > 1:
            raise ValueError("rbm needs data in [0, 1] (unwhitened images): got values outside")
        start = y if self.chains is None else self.chains.local()
        negatives = self.gibbs(start, self.cd_steps, batch.generator())
        if self.chains is not None:
            self.chains.write(torch.arange(len(negatives), device=y.device), negatives)
        data_energy, model_energy = self.energy(y).mean(), self.energy(negatives).mean()
        with torch.no_grad():
            probabilities = torch.sigmoid(
                self.hidden_units(y) @ self.hidden_units.weight + self.visible_bias
            )
            reconstruction = (y - probabilities).pow(2).sum(1).mean()
        return {
            "loss": data_energy - model_energy,
            "data_free_energy": data_energy.detach(),
            "reconstruction": reconstruction,
        }

    def encoder(self) -> nn.Module:
        return self.hidden_units

    def figures(self, data: torch.Tensor) -> dict[str, np.ndarray]:
        if data.dim() != 4:
            return {}
        generator = torch.Generator(data.device).manual_seed(0)
        coins = torch.full((64, data[0].numel()), 0.5, device=data.device)
        noise = torch.bernoulli(coins, generator=generator)
        samples = self.gibbs(noise, FIGURE_GIBBS_STEPS, generator).view(-1, *data.shape[1:])
        return {
            "filters.png": tile_grid(self.hidden_units.weight.detach().view(-1, *data.shape[1:])),
            "samples.png": tile_grid(samples, symmetric=False),
        }
