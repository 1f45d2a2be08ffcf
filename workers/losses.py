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
