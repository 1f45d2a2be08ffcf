"""Losses as small pure functions. Each docstring states the equation it computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers import dist


def nt_xent_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross entropy, SimCLR), over the global batch.

    With u_i = z_i / ||z_i|| and s_ij = u_i . u_j / tau over the 2N views of the *global*
    batch (N = sum of the local batches), each view i has one positive p(i), the other view
    of its sample, and 2N - 2 negatives:

        loss = 1/(2N) * sum_i -log( exp(s_i,p(i)) / sum_{k != i} exp(s_ik) )

    Each rank scores its own 2n anchors against all 2N candidates gathered with gradient,
    and its positives sit at an offset of rank * n. The mean over ranks of the local losses
    is the loss above; see ``dist.gather_with_grad`` for why the gradients match too.

    Shapes: z_a, z_b (n, d) -> scalar.
    """
    local_n = z_a.shape[0]
    u_a, u_b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    all_a, all_b = dist.gather_with_grad(u_a), dist.gather_with_grad(u_b)  # (N, d) each
    global_n = all_a.shape[0]
    anchors = torch.cat([u_a, u_b])  # (2n, d)
    candidates = torch.cat([all_a, all_b])  # (2N, d)
    logits = anchors @ candidates.T / temperature  # (2n, 2N)

    local = torch.arange(local_n, device=z_a.device) + dist.rank() * local_n
    self_index = torch.cat([local, local + global_n])
    positive_index = torch.cat([local + global_n, local])
    rows = torch.arange(2 * local_n, device=z_a.device)
    # A view is never its own negative.
    logits = logits.index_put((rows, self_index), torch.tensor(float("-inf"), device=z_a.device))
    return F.cross_entropy(logits, positive_index)


def margin_contrastive_loss(z_a: torch.Tensor, z_b: torch.Tensor, margin: float) -> torch.Tensor:
    """Margin contrastive loss (Hadsell, Chopra, LeCun 2006), over the global batch.

    With u = z / ||z|| and d_ij = ||u^a_i - u^b_j|| between view a of sample i and view b of
    sample j, over the N samples of the *global* batch: the two views of one sample are a
    similar pair, views of two different samples a dissimilar one, and

        loss = 1/N * sum_i d_ii^2  +  1/(N(N-1)) * sum_{i != j} max(0, m - d_ij)^2

    (each kind of pair weighs the same, however many dissimilar pairs there are). Distances
    between unit vectors lie in [0, 2], so a margin m > 2 would keep every pair active.
    Each rank scores its n anchors u^a against the N candidates u^b gathered with gradient;
    the mean over ranks of the local losses is the loss above, as in ``nt_xent_loss``.

    Shapes: z_a, z_b (n, d) -> scalar.
    """
    local_n = z_a.shape[0]
    u_a, all_b = F.normalize(z_a, dim=1), dist.gather_with_grad(F.normalize(z_b, dim=1))
    global_n = all_b.shape[0]
    # ||u - v||^2 = 2 - 2 u.v for unit vectors; clamped because rounding can dip below zero.
    squared = (2.0 - 2.0 * u_a @ all_b.T).clamp(min=0.0)  # (n, N)
    positive = torch.arange(local_n, device=z_a.device) + dist.rank() * local_n
    is_positive = F.one_hot(positive, global_n).bool()
    # sqrt has an infinite slope at 0: the epsilon keeps coinciding negatives' gradient finite.
    hinge = (margin - (squared + 1e-12).sqrt()).clamp(min=0.0) ** 2
    similar = squared[is_positive].mean()
    dissimilar = hinge.masked_fill(is_positive, 0.0).sum() / (local_n * (global_n - 1))
    return similar + dissimilar


def info_nce_loss(
    query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE against a shared set of negatives (MoCo's queue, PIRL's memory bank).

    With unit vectors q_i (query), k_i (its positive) and n_1..n_K (negatives shared by
    every query), all normalised here:

        loss = 1/n * sum_i -log( exp(q_i.k_i / tau) / (exp(q_i.k_i / tau)
                                                        + sum_j exp(q_i.n_j / tau)) )

    The negatives carry no gradient in either method (a queue of past keys, a memory bank),
    so each rank's mean is exact and DDP's gradient average gives the global batch's loss.

    Shapes: query, positive (n, d); negatives (K, d) -> scalar.
    """
    q, k = F.normalize(query, dim=1), F.normalize(positive, dim=1)
    positive_logits = (q * k).sum(dim=1, keepdim=True)  # (n, 1)
    negative_logits = q @ F.normalize(negatives, dim=1).T  # (n, K)
    logits = torch.cat([positive_logits, negative_logits], dim=1) / temperature  # (n, 1 + K)
    # The positive sits in column 0 of every row.
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
