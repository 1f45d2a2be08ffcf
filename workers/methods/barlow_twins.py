"""Barlow Twins (Zbontar et al. 2021): two views of each image through one backbone and the
paper's 3-layer projector; the cross-correlation matrix C of the two views' embeddings,
each dimension standardised over the global batch, is pulled towards the identity:

    loss = sum_i (1 - C_ii)^2  +  lambda * sum_{i != j} C_ij^2     (workers.losses)

Distributed convention: every rank gathers both views' embeddings with gradient and computes
the same loss on the global batch (standardisation and C included), so each rank's loss is
the global batch's; the gather's backward sums the ranks' gradients of each rank's slice and
DDP's average over ranks then makes the update that of one process on the concatenated batch
(``workers.dist.gather_with_grad``; tests/test_barlow_vicreg.py). The projector's BatchNorm
layers normalise with each rank's sub-batch unless ``train.sync_batchnorm`` is set.
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.params import BarlowTwinsParams
from workers.losses import barlow_twins_loss
from workers.methods.base import Batch, Method, MethodContext, register_method
from workers.methods.simclr import projection_head


def projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Barlow Twins' and VICReg's 3-layer projector: (Linear-BN-ReLU) twice, then Linear,
    i.e. SimCLR's head behind one more hidden layer. Both papers find a deep, wide projector
    matters for these losses, which decorrelate every output dimension."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        *projection_head(hidden_dim, hidden_dim, out_dim),
    )


def embed_views(backbone: nn.Module, head: nn.Module, batch: Batch) -> list[torch.Tensor]:
    """Both views' embeddings, (n, d) each. One pass per view, as in both papers' code, so
    that BatchNorm normalises each view with its own statistics. (The losses run in float32
    at least whatever ``train.precision`` is: ``workers.losses.full_precision``.)"""
    return [head(backbone(batch.view(number))) for number in (0, 1)]


@register_method(BarlowTwinsParams)
class BarlowTwins(Method):
    def __init__(self, params: BarlowTwinsParams, context: MethodContext) -> None:
        super().__init__()
        self.backbone = context.backbone
        self.head = projector(context.feature_dim, params.hidden_dim, params.projection_dim)
        self.off_diagonal_weight = params.off_diagonal_weight

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        z_a, z_b = embed_views(self.backbone, self.head, batch)  # (n, d) each
        terms = barlow_twins_loss(z_a, z_b, self.off_diagonal_weight)
        return {key: value if key == "loss" else value.detach() for key, value in terms.items()}

    def encoder(self) -> nn.Module:
        return self.backbone
