"""BYOL (Grill et al. 2020): bootstrap your own latent, no negatives.

The online network (backbone f, projector g, predictor q) predicts the target network's
projection of the other view; the target (f', g') is an exponential moving average of the
online f and g and gets no gradient. With z = g(f(v)), p = q(z), z' = g'(f'(v)):

    loss = mean_i ||p1_i/|p1_i| - sg(z'2_i)/|z'2_i|||^2 + (views swapped)
         = mean_i (2 - 2 cos(p1_i, z'2_i)) + mean_i (2 - 2 cos(p2_i, z'1_i))     in [0, 8]

and after each optimizer step  xi <- tau_k xi + (1 - tau_k) theta,  with
tau_k = 1 - (1 - tau_0)(cos(pi k / K) + 1) / 2 at optimizer step k of K (``momentum_schedule:
cosine``: tau_0 at the first step, rising to 1 at the end) or tau_0 throughout (``constant``).

Distributed convention: the loss is a mean of per-sample terms, so with equal local batches
the mean over ranks of the local losses, and DDP's average of the gradients, are exactly one
process's on the concatenated batch (tests/test_byol_simsiam.py). The target is updated from
identical online weights with the same step on every rank, so it stays identical without any
communication. BatchNorm in the projector and predictor normalises over each rank's
sub-batch, like the paper's per-replica BN; ``train.sync_batchnorm`` makes it global.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from itertools import chain

import torch
from torch import nn

from pipelines.params import BYOLParams
from workers.collapse import normalised_std
from workers.losses import byol_loss
from workers.methods.base import Batch, Method, MethodContext, register_method
from workers.methods.moco import momentum_update
from workers.methods.simclr import projection_head
from workers.optim import cosine_momentum


@register_method(BYOLParams)
class BYOL(Method):
    def __init__(self, params: BYOLParams, context: MethodContext) -> None:
        super().__init__()
        self.backbone = context.backbone
        self.projector = projection_head(
            context.feature_dim, params.hidden_dim, params.projection_dim
        )
        # The paper's predictor has the projector's shape: Linear-BN-ReLU-Linear.
        self.predictor = projection_head(
            params.projection_dim, params.predictor_hidden_dim, params.projection_dim
        )
        self.target = nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.projector))
        self.target.requires_grad_(False)
        self.base_momentum, self.schedule = params.momentum, params.momentum_schedule
        self.total_steps = context.total_steps
        # The global optimizer step of the last forward: Training checkpoints it and hands it
        # back on resume, so the schedule continues exactly without state of its own.
        self._step = 0

    def momentum_at(self, step: int) -> float:
        """tau at optimizer step ``step``."""
        if self.schedule == "cosine":
            return cosine_momentum(step, self.total_steps, self.base_momentum)
        return self.base_momentum

    def _online_parameters(self) -> Iterator[nn.Parameter]:
        return chain(self.backbone.parameters(), self.projector.parameters())

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        self._step = batch.step
        # One pass over both views (2n, C, H, W), so BatchNorm sees both, as in SimCLR.
        views = torch.cat([batch.view(0), batch.view(1)])
        z = self.projector(self.backbone(views))  # (2n, projection_dim)
        p1, p2 = self.predictor(z).chunk(2)  # (n, projection_dim) each
        with torch.no_grad():  # the stop-gradient: the target only bootstraps
            t1, t2 = self.target(views).chunk(2)
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        return {"loss": loss, "projection_std": normalised_std(z)}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        momentum = self.momentum_at(self._step)
        momentum_update(self._online_parameters(), self.target.parameters(), momentum)

    def encoder(self) -> nn.Module:
        return self.backbone
