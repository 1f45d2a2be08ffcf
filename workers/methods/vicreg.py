"""VICReg (Bardes et al. 2022): two views of each image through one backbone and a 3-layer
projector (the "expander", as Barlow Twins'), trained with

    loss = lambda * s(Z^a, Z^b) + mu * (v(Z^a) + v(Z^b)) / 2 + nu * (c(Z^a) + c(Z^b))

an invariance term s (the views' MSE), a variance hinge v keeping each dimension's standard
deviation above 1, and a covariance penalty c decorrelating the dimensions (workers.losses).

Distributed convention: as the paper's code (its FullGatherLayer), every rank gathers both
views' embeddings with gradient and computes the same loss on the global batch, so the
variance and covariance are the global batch's; DDP's average of the gradients is then the
gradient of one process on the concatenated batch (``workers.dist.gather_with_grad``;
tests/test_barlow_vicreg.py). The projector's BatchNorm layers normalise with each rank's
sub-batch unless ``train.sync_batchnorm`` is set.
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.params import VICRegParams
from workers.losses import vicreg_loss
from workers.methods.barlow_twins import embed_views, projector
from workers.methods.base import Batch, Method, MethodContext, register_method


@register_method(VICRegParams)
class VICReg(Method):
    def __init__(self, params: VICRegParams, context: MethodContext) -> None:
        super().__init__()
        self.backbone = context.backbone
        self.head = projector(context.feature_dim, params.hidden_dim, params.projection_dim)
        self.weights = (params.invariance_weight, params.variance_weight, params.covariance_weight)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        z_a, z_b = embed_views(self.backbone, self.head, batch)  # (n, d) each
        terms = vicreg_loss(z_a, z_b, *self.weights)
        return {key: value if key == "loss" else value.detach() for key, value in terms.items()}

    def encoder(self) -> nn.Module:
        return self.backbone
