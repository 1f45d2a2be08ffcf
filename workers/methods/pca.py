"""PCA as an energy: E(y, z) = ||y - m - W z||^2 with W (D, c) orthonormal and z low-dimensional,
so inference is the projection z = W^T (y - m). The encoder is that projection."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipelines.params import PCAParams
from workers.encoders import build_encoder
from workers.figures import energy_landscape, is_plane, tile_grid
from workers.latent_encoders import flat_dim
from workers.methods.base import Batch, Method, MethodContext, register_method
from workers.rank_state import global_sum


def reconstruction_error(y: torch.Tensor, mean: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """min_z E(y, z) = ||(y - m) - W W^T (y - m)||^2 per sample; axes = W^T (c, D)."""
    centred = y - mean
    return (centred - (centred @ axes.T) @ axes).pow(2).sum(1)


@register_method(PCAParams)
class PCA(Method):
    """Streaming PCA, learned in closed form without gradients.

    The sums n, sum y and sum y y^T of every global batch so far (summed over ranks, in
    float64) give the mean m and the covariance; W is its top c eigenvectors, each signed so
    that its largest entry is positive. Two ranks therefore learn exactly what one process
    learns on the concatenated batches."""

    def __init__(self, params: PCAParams, context: MethodContext) -> None:
        super().__init__()
        dim = flat_dim(context.backbone.config)
        if params.components > dim:
            raise ValueError(
                f"method.components {params.components} exceeds the data's {dim} dimensions"
            )
        self.coder = build_encoder(
            {"arch": "projection", "input_dim": dim, "components": params.components}
        )
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("total", torch.zeros(dim, dtype=torch.float64))  # sum y
        self.register_buffer("outer", torch.zeros(dim, dim, dtype=torch.float64))  # sum y y^T

    @torch.no_grad()
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        y = batch.images.flatten(1)  # (n, D)
        wide = y.double()
        self.count += global_sum(torch.tensor(float(len(y)), dtype=torch.float64, device=y.device))
        self.total += global_sum(wide.sum(0))
        self.outer += global_sum(wide.T @ wide)
        mean = self.total / self.count
        covariance = self.outer / self.count - torch.outer(mean, mean)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        top = eigenvectors[:, -len(self.coder.components) :].flip(1).T  # (c, D)
        signs = top.gather(1, top.abs().argmax(1, keepdim=True)).sign()
        self.coder.mean.copy_(mean)
        self.coder.components.copy_(top * signs)
        explained = eigenvalues[-len(top) :].sum() / eigenvalues.clamp_min(0).sum().clamp_min(1e-30)
        return {
            "loss": reconstruction_error(y, self.coder.mean, self.coder.components).mean(),
            "explained_variance": explained.float(),
        }

    def encoder(self) -> nn.Module:
        return self.coder

    def figures(self, data: torch.Tensor) -> dict[str, np.ndarray]:
        mean, axes = self.coder.mean, self.coder.components
        if is_plane(data):
            energy = lambda points: reconstruction_error(points, mean, axes)  # noqa: E731
            title = f"PCA energy, {len(axes)} component(s)"
            return {"energy_landscape.png": energy_landscape(energy, data, title, mean[None])}
        return {"components.png": tile_grid(axes.view(-1, *data.shape[1:]))}
