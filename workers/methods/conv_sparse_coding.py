"""Convolutional sparse coding: E(y, z) = ||y - sum_k K_k * z_k||^2 + lam * sum_k |z_k|_1, with K
unit-norm kernels K_k and feature maps z_k as large as the image. The encoder is the
convolutional FISTA with the learned kernels, its maps pooled to a small grid."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipelines.params import ConvSparseCodingParams
from workers import sparse
from workers.encoders import build_encoder
from workers.figures import tile_grid
from workers.methods.base import Batch, Method, MethodContext, register_method


@register_method(ConvSparseCodingParams)
class ConvSparseCoding(Method):
    """As sparse coding, with convolutions for the dictionary: convolutional FISTA for the
    maps z* (L from power iteration on the convolution operator), a gradient step on the
    kernels with z* fixed (averaged over ranks by DDP), then every kernel back to unit norm.
    On natural images the kernels become centre-surround and oriented edge filters."""

    def __init__(self, params: ConvSparseCodingParams, context: MethodContext) -> None:
        super().__init__()
        if context.backbone.config["image_size"] == 1:
            raise ValueError("conv_sparse_coding needs images, not vectors")
        self.lam = params.lam
        self.coder = build_encoder(
            {
                "arch": "conv-sparse-coder",
                "in_channels": context.backbone.config["in_channels"],
                "kernels": params.kernels,
                "kernel_size": params.kernel_size,
                "lam": params.lam,
                "tol": params.tol,
                "max_iter": params.max_iter,
                "pool": params.pool,
            }
        )

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        images = batch.images  # (n, C, H, W)
        solution = self.coder.infer(images)  # maps (n, kernels, H, W), no gradient
        kernels = self.coder.kernels
        energy = sparse.energy(
            images, solution.codes, lambda maps: self.coder.reconstruct(maps, kernels), self.lam
        )
        return {
            "loss": energy.mean(),
            "iterations": torch.tensor(float(solution.iterations)),
            "active_fraction": (solution.codes != 0).float().mean(),
        }

    def after_optimizer_step(self) -> None:
        sparse.normalize_columns_(self.coder.kernels, dim=0)

    def encoder(self) -> nn.Module:
        return self.coder

    def figures(self, data: torch.Tensor) -> dict[str, np.ndarray]:
        return {"kernels.png": tile_grid(self.coder.kernels.detach())}
