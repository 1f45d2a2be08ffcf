"""SimSiam (Chen & He 2021): a Siamese network with a predictor and a stop-gradient, and no
target network, negatives or momentum. With z = g(f(v)) and p = h(z):

    loss = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2,   D(p, z) = -mean_i cos(p_i, z_i)   in [-1, 1]

The stop-gradient is what keeps it from collapsing: each z is a constant target for the
other view's prediction, and receives gradient only through its own predictor p = h(z).

Distributed convention: a mean of per-sample terms, so with equal local batches the mean
over ranks of the local losses, and DDP's average of the gradients, are exactly one process's
on the concatenated batch (tests/test_byol_simsiam.py). BatchNorm in the projector and
predictor normalises over each rank's sub-batch (per-GPU BN, as in the paper);
``train.sync_batchnorm`` makes it global.
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.params import SimSiamParams
from workers.collapse import normalised_std
from workers.losses import negative_cosine_similarity
from workers.methods.base import Batch, Method, MethodContext, register_method
from workers.methods.simclr import projection_head


def simsiam_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """The paper's 3-layer projection MLP: BN after every Linear, the output's included, and
    no ReLU on the output. SimCLR's Linear-BN-ReLU-Linear head followed by BN-ReLU-Linear-BN,
    so the first two Linears map in_dim -> hidden -> hidden."""
    return nn.Sequential(
        *projection_head(in_dim, hidden_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
        nn.BatchNorm1d(out_dim),
    )


@register_method(SimSiamParams)
class SimSiam(Method):
    def __init__(self, params: SimSiamParams, context: MethodContext) -> None:
        super().__init__()
        self.backbone = context.backbone
        self.projector = simsiam_projector(
            context.feature_dim, params.hidden_dim, params.projection_dim
        )
        # The bottleneck predictor, Linear-BN-ReLU-Linear (d -> d/4 -> d in the paper).
        self.predictor = projection_head(
            params.projection_dim, params.predictor_hidden_dim, params.projection_dim
        )

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        # One pass over both views (2n, C, H, W), so BatchNorm sees both, as in SimCLR.
        views = torch.cat([batch.view(0), batch.view(1)])
        z = self.projector(self.backbone(views))  # (2n, projection_dim)
        p1, p2 = self.predictor(z).chunk(2)  # (n, projection_dim) each
        z1, z2 = z.chunk(2)
        # negative_cosine_similarity detaches its target: the stop-gradient.
        loss = negative_cosine_similarity(p1, z2) / 2 + negative_cosine_similarity(p2, z1) / 2
        return {"loss": loss, "projection_std": normalised_std(z)}

    def encoder(self) -> nn.Module:
        return self.backbone
