"""Siamese metric learning (Hadsell, Chopra, LeCun 2006): one shared network embeds two
augmented views of every image; the two views of one image are a similar pair, views of two
different images of the global batch dissimilar pairs, and the margin contrastive loss pulls
the first together and pushes the second at least ``margin`` apart (on the unit sphere).

As in SimCLR, the loss sits on a projection head g(f(x)); the backbone f is the encoder."""

from __future__ import annotations

import torch
from torch import nn

from pipelines.params import SiameseParams
from workers.losses import margin_contrastive_loss
from workers.methods.base import Batch, Method, MethodContext, register_method
from workers.methods.simclr import projection_head


@register_method(SiameseParams)
class Siamese(Method):
    def __init__(self, params: SiameseParams, context: MethodContext) -> None:
        super().__init__()
        self.backbone = context.backbone
        self.head = projection_head(context.feature_dim, params.hidden_dim, params.projection_dim)
        self.margin = params.margin

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        # One backbone pass over both views keeps BatchNorm statistics shared between them.
        z = self.head(self.backbone(torch.cat([batch.view(0), batch.view(1)])))  # (2n, d)
        z_a, z_b = z.chunk(2)
        return {"loss": margin_contrastive_loss(z_a, z_b, self.margin)}

    def encoder(self) -> nn.Module:
        return self.backbone
