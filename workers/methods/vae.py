"""Variational autoencoder: a Gaussian encoder q(z|y) = N(mu(y), diag(sigma^2(y))), a decoder,
and the energy reconstruction + beta * KL(q(z|y) || N(0, I)). The encoder stored is mu."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipelines.params import VAEParams
from workers import dist
from workers.encoders import MLP, build_encoder
from workers.figures import stacked_grid, tile_grid
from workers.latent_encoders import flat_dim, sample_shape
from workers.methods.base import Batch, Method, MethodContext, register_method

# A latent unit is active when its posterior mean varies over the data (Burda et al. 2016).
ACTIVE_UNIT_VARIANCE = 0.01


def gaussian_kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(log_var))) || N(0, I)) = 1/2 sum_j (mu_j^2 + exp(log_var_j) - log_var_j
    - 1), per sample. (n, d) -> (n,)."""
    return 0.5 * (mean.pow(2) + log_var.exp() - log_var - 1.0).sum(1)


@register_method(VAEParams)
class VAE(Method):
    """loss = mean_y [ ||y - dec(z)||^2 + beta * KL ], z = mu + sigma * eps (the
    reparameterisation, so the gradient flows through the sample). beta is the spring pulling
    codes to the origin: too strong and every code collapses onto the prior (no active units),
    too weak and the fuzzy balls fly apart."""

    def __init__(self, params: VAEParams, context: MethodContext) -> None:
        super().__init__()
        self.beta, self.shape = params.beta, sample_shape(context.backbone.config)
        config = {
            "arch": "gaussian",
            "backbone": context.backbone.config,
            "latent_dim": params.latent_dim,
        }
        self.gaussian = build_encoder(config)
        self.decoder = MLP(
            params.latent_dim, 1, flat_dim(context.backbone.config), params.hidden_dim
        )

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(codes).view(-1, *self.shape)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        y = batch.images
        mean, log_var = self.gaussian.distribution(y)  # (n, d) each
        eps = torch.randn(mean.shape, generator=batch.generator(), device=y.device, dtype=y.dtype)
        codes = mean + (0.5 * log_var).exp() * eps
        reconstruction = (y - self.decode(codes)).flatten(1).pow(2).sum(1)
        kl = gaussian_kl(mean, log_var)
        active = dist.gather(mean.detach()).var(0) > ACTIVE_UNIT_VARIANCE
        return {
            "loss": (reconstruction + self.beta * kl).mean(),
            "reconstruction": reconstruction.mean().detach(),
            "kl": kl.mean().detach(),
            "active_units": active.sum().float(),
        }

    def encoder(self) -> nn.Module:
        return self.gaussian

    def figures(self, data: torch.Tensor) -> dict[str, np.ndarray]:
        if data.dim() != 4:
            return {}
        reconstructions = self.decode(self.gaussian(data[:32]))
        prior = torch.randn(64, self.gaussian.mean.out_features, device=data.device)
        return {
            "reconstructions.png": stacked_grid([data[:32], reconstructions]),
            "samples.png": tile_grid(self.decode(prior), symmetric=False),
        }
