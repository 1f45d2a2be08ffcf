"""SimCLR (Chen et al. 2020): two views per image, a projection head, NT-Xent over the
global batch. Features for downstream use come from the backbone f, the loss from g(f(x))."""

from __future__ import annotations

import torch
from torch import nn

from pipelines.params import SimCLRParams
from workers.losses import nt_xent_loss
from workers.methods.base import Batch, Method, MethodContext, register_method


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


@register_method(SimCLRParams)
class SimCLR(Method):
    def __init__(self, params: SimCLRParams, context: MethodContext) -> None:
        super().__init__()
        self.backbone = context.backbone
        self.head = projection_head(context.feature_dim, params.hidden_dim, params.projection_dim)
        self.temperature = params.temperature

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        view_a, view_b = batch.view(0), batch.view(1)  # (n, C, H, W) each
        # One backbone pass over both views keeps BatchNorm statistics shared between them.
        z = self.head(self.backbone(torch.cat([view_a, view_b])))  # (2n, projection_dim)
        z_a, z_b = z.chunk(2)
        return {"loss": nt_xent_loss(z_a, z_b, self.temperature)}

    def encoder(self) -> nn.Module:
        return self.backbone
