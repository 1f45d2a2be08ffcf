"""k-means as an energy: E(y, z) = ||y - W z||^2 with z one-hot, so min_z E(y, z) is the squared
distance from y to its nearest prototype (a column of W). The encoder gives the distances to
every prototype."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.params import KMeansParams
from workers import dist
from workers.encoders import build_encoder
from workers.figures import energy_landscape, is_plane, tile_grid
from workers.latent_encoders import flat_dim
from workers.methods.base import Batch, Method, MethodContext, register_method
from workers.rank_state import global_sum


@register_method(KMeansParams)
class KMeans(Method):
    """Mini-batch k-means (Sculley 2010), learned without gradients.

    Each prototype is the running mean of every sample ever assigned to it:

        w_k <- w_k + (S_k - n_k w_k) / N_k

    with S_k and n_k the sum and the count of this global batch's samples nearest to w_k
    (summed over ranks) and N_k the running count including them. Two ranks therefore update
    exactly as one process on the concatenated batch. The prototypes start as the first
    global batch's first K samples, which the shuffled sampler makes a random draw.
    """

    def __init__(self, params: KMeansParams, context: MethodContext) -> None:
        super().__init__()
        config = {
            "arch": "prototypes",
            "input_dim": flat_dim(context.backbone.config),
            "clusters": params.clusters,
        }
        self.coder = build_encoder(config)
        self.register_buffer("counts", torch.zeros(params.clusters))  # N_k
        self.register_buffer("started", torch.tensor(False))

    @torch.no_grad()
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        y = batch.images.flatten(1)  # (n, D)
        prototypes = self.coder.prototypes  # (K, D), updated in place
        if not self.started:
            first = dist.gather(y)
            if len(first) < len(prototypes):
                raise ValueError(
                    f"method.clusters {len(prototypes)} needs a global batch of at least as "
                    f"many samples to start from; train.batch_size gives {len(first)}"
                )
            prototypes.copy_(first[: len(prototypes)])
            self.started.fill_(True)
        distances = torch.cdist(y, prototypes).pow(2)  # (n, K)
        nearest, assigned = distances.min(1)
        one_hot = F.one_hot(assigned, len(prototypes)).to(y.dtype)  # (n, K)
        sums, counts = global_sum(one_hot.T @ y), global_sum(one_hot.sum(0))  # S_k, n_k
        self.counts += counts
        prototypes += (sums - counts[:, None] * prototypes) / self.counts.clamp_min(1)[:, None]
        return {
            "loss": nearest.mean(),  # the energy of the batch before this update
            "empty_clusters": (self.counts == 0).sum().float(),
        }

    def encoder(self) -> nn.Module:
        return self.coder

    def figures(self, data: torch.Tensor) -> dict[str, np.ndarray]:
        prototypes = self.coder.prototypes
        if is_plane(data):
            energy = lambda points: torch.cdist(points, prototypes).pow(2).min(1).values  # noqa: E731
            title = f"k-means energy, K={len(prototypes)}"
            return {"energy_landscape.png": energy_landscape(energy, data, title, prototypes)}
        tiles = prototypes.view(-1, *data.shape[1:])
        return {"prototypes.png": tile_grid(tiles, symmetric=False)}
