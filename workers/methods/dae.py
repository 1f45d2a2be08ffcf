"""Denoising autoencoder: corrupt y, encode, decode, and score the reconstruction against the
clean y. Hiding patches instead of adding noise makes it a masked autoencoder. The energy
E(y) = ||y - dec(enc(y))||^2 then grows with the distance from the data manifold."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipelines.params import DAEParams
from workers.encoders import MLP
from workers.figures import energy_landscape, is_plane, stacked_grid
from workers.latent_encoders import flat_dim, sample_shape
from workers.methods.base import Batch, Method, MethodContext, register_method


def corrupt(
    y: torch.Tensor,
    generator: torch.Generator,
    corruption: str,
    noise_std: float,
    mask_ratio: float,
    mask_patch: int,
) -> torch.Tensor:
    """ "noise": y + noise_std * eps. "mask": each (mask_patch x mask_patch) patch of an image,
    or each coordinate of a vector, is set to 0 with probability mask_ratio. Every random
    number comes from ``generator``."""
    like = {"device": y.device, "dtype": y.dtype, "generator": generator}
    if corruption == "noise":
        return y + noise_std * torch.randn(y.shape, **like)
    if y.dim() == 2:
        return y * (torch.rand(y.shape, **like) >= mask_ratio)
    n, _, height, width = y.shape
    grid = (n, 1, -(-height // mask_patch), -(-width // mask_patch))
    keep = (torch.rand(grid, **like) >= mask_ratio).to(y.dtype)
    keep = keep.repeat_interleave(mask_patch, 2).repeat_interleave(mask_patch, 3)
    return y * keep[..., :height, :width]


@register_method(DAEParams)
class DAE(Method):
    """loss = mean_y ||y - dec(enc(corrupt(y)))||^2; enc is the spec's backbone (the encoder
    stored), dec an MLP back to the sample's shape."""

    def __init__(self, params: DAEParams, context: MethodContext) -> None:
        super().__init__()
        self.backbone = context.backbone
        self.decoder = MLP(
            context.feature_dim, 1, flat_dim(context.backbone.config), params.hidden_dim
        )
        self.shape = sample_shape(context.backbone.config)
        self.corruption = (
            params.corruption,
            params.noise_std,
            params.mask_ratio,
            params.mask_patch,
        )

    def reconstruct(self, y: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone(y)).view(-1, *self.shape)

    def energy(self, y: torch.Tensor) -> torch.Tensor:
        """E(y) = ||y - dec(enc(y))||^2 per sample: (n, ...) -> (n,)."""
        return (y - self.reconstruct(y)).flatten(1).pow(2).sum(1)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        y = batch.images
        reconstruction = self.reconstruct(corrupt(y, batch.generator(), *self.corruption))
        return {"loss": (y - reconstruction).flatten(1).pow(2).sum(1).mean()}

    def encoder(self) -> nn.Module:
        return self.backbone

    def figures(self, data: torch.Tensor) -> dict[str, np.ndarray]:
        if is_plane(data):
            title = f"DAE energy ||y - dec(enc(y))||^2 ({self.corruption[0]})"
            return {"energy_landscape.png": energy_landscape(self.energy, data, title)}
        clean = data[:32]
        corrupted = corrupt(clean, torch.Generator(data.device).manual_seed(0), *self.corruption)
        rows = [clean, corrupted, self.reconstruct(corrupted)]
        return {"reconstructions.png": stacked_grid(rows)}
