"""How collapsed an embedding is: the two numbers the train loop logs every epoch, so that a
run whose features shrink to a point or to a few directions shows it in MLflow."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalised_std(features: torch.Tensor) -> torch.Tensor:
    """The mean over dimensions of the std of the L2-normalised rows of ``features`` (n, d),
    detached (SimSiam's collapse measure): about 1/sqrt(d) while they spread over the
    sphere, 0 once every sample maps to one point."""
    return F.normalize(features.detach().float(), dim=1).std(dim=0).mean()


def embedding_health(features: torch.Tensor) -> dict[str, float]:
    """Collapse statistics of features (n, d).

    - ``std``: ``normalised_std``, the std per dimension of u_i = z_i / ||z_i||, averaged.
    - ``effective_rank``: RankMe (Garrido et al. 2023), exp(-sum_k p_k log p_k) with
      p_k = s_k / sum_j s_j over the singular values s of the centred features: between 1
      (all variance along one direction, dimensional collapse) and min(n, d).
    """
    features = features.float()
    std = normalised_std(features)
    singular = torch.linalg.svdvals(features - features.mean(dim=0))
    p = singular / singular.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return {"std": std.item(), "effective_rank": entropy.exp().item()}
