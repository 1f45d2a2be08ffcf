"""Losses as small pure functions. Each docstring states the equation it computes."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from workers import dist


def full_precision(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Compute ``loss`` in float32 outside autocast (``train.precision`` bf16/fp16): softmaxes
    over similarities, logs and sums over the global batch lose too much in 16 bits (bf16's
    8-bit mantissa rounds Barlow Twins' diagonal to ~4e-3), and the loss is a small part of
    a step's cost. Floating tensor arguments are promoted to at least float32."""

    @functools.wraps(loss)
    def in_float32(*args: object, **kwargs: object) -> torch.Tensor:
        args = tuple(
            arg.to(torch.promote_types(arg.dtype, torch.float32))
            if isinstance(arg, torch.Tensor) and arg.is_floating_point()
            else arg
            for arg in args
        )
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return loss(*args, **kwargs)

    return in_float32


@full_precision
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


@full_precision
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


@full_precision
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


@full_precision
def negative_cosine_similarity(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D with a stop-gradient on the target (Chen & He 2021):

        D(p, sg(z)) = -1/n * sum_i  p_i . z_i / (||p_i|| ||z_i||)

    ``z`` is detached here, so no gradient ever reaches the target branch through this loss.
    A mean of per-sample terms: the mean over ranks of equal local batches is the global
    batch's value, and DDP's gradient average is its gradient.

    Shapes: p, z (n, d) -> scalar, in [-1, 1].
    """
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE between a prediction and a stop-gradient target (Grill et al.
    2020), with u = p / ||p||, v = z / ||z||:

        loss = 1/n * sum_i ||u_i - v_i||^2 = 1/n * sum_i (2 - 2 u_i . v_i) = 2 (1 + D(p, sg(z)))

    with D the ``negative_cosine_similarity`` above (same math, same stop-gradient).

    Shapes: p, z (n, d) -> scalar, in [0, 4].
    """
    return 2.0 * (1.0 + negative_cosine_similarity(p, z))


@full_precision
def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's reconstruction loss: the per-patch mean squared error, averaged over the masked
    patches only (the visible ones are copied from the input, not learnt from):

        loss = sum_{i, j} m_ij * mean_k (pred_ijk - target_ijk)^2  /  sum_{i, j} m_ij

    with m_ij = 1 when patch j of sample i is masked. Every sample masks the same number of
    patches and every rank takes the same share of the global batch, so DDP's average of the
    ranks' gradients is the gradient of this loss over the global batch.

    Shapes: pred, target (n, N, p * p * C); mask (n, N), 1 masked, 0 visible -> scalar.
    """
    per_patch = (pred - target).pow(2).mean(dim=-1)  # (n, N)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


def _off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The d(d - 1) entries of a square (d, d) matrix off its diagonal, as a (d - 1, d) view.

    Flattened, the diagonal entries sit every d + 1 places from the first: dropping the last
    entry and reading rows of d + 1, each row starts with one, so the rest of the row is off
    it (the Barlow Twins code's trick; a boolean mask copies, and is ~5x slower backwards)."""
    d = matrix.shape[0]
    return matrix.flatten()[:-1].view(d - 1, d + 1)[:, 1:]


@full_precision
def barlow_twins_loss(
    z_a: torch.Tensor, z_b: torch.Tensor, off_diagonal_weight: float
) -> dict[str, torch.Tensor]:
    """Barlow Twins' redundancy reduction (Zbontar et al. 2021), over the global batch.

    Each dimension of each view's embeddings is standardised over the N samples of the
    *global* batch, zhat = (z - mean) / sqrt(var + 1e-5) with the biased variance (the
    paper's code: BatchNorm1d(affine=False), synchronised), and with C_ij = 1/N sum_b
    zhat^a_bi zhat^b_bj the cross-correlation of the two views:

        loss = sum_i (1 - C_ii)^2  +  lambda * sum_{i != j} C_ij^2

    Every rank gathers both views with gradient and computes this same loss on the whole
    batch, so the mean over ranks is the loss itself and, by ``dist.gather_with_grad``, DDP's
    average of the gradients is its gradient.

    Shapes: z_a, z_b (n, d) -> {"loss", "on_diagonal", "off_diagonal"}: scalars, the terms
    unweighted.
    """
    all_a, all_b = dist.gather_with_grad(z_a), dist.gather_with_grad(z_b)  # (N, d) each
    standard_a, standard_b = (
        (z - z.mean(dim=0)) / (z.var(dim=0, correction=0) + 1e-5).sqrt() for z in (all_a, all_b)
    )
    correlation = standard_a.T @ standard_b / len(all_a)  # (d, d)
    on_diagonal = (1.0 - correlation.diagonal()).pow(2).sum()
    off_diagonal = _off_diagonal(correlation).pow(2).sum()
    return {
        "loss": on_diagonal + off_diagonal_weight * off_diagonal,
        "on_diagonal": on_diagonal,
        "off_diagonal": off_diagonal,
    }


@full_precision
def vicreg_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    invariance_weight: float,
    variance_weight: float,
    covariance_weight: float,
) -> dict[str, torch.Tensor]:
    """VICReg (Bardes et al. 2022): variance-invariance-covariance regularisation, over the
    global batch. Over the N samples and d dimensions of the *global* batch,

        s    = 1/(N d) sum_b ||z^a_b - z^b_b||^2                      (invariance, an MSE)
        v(Z) = 1/d sum_j max(0, 1 - sqrt(Var(Z_:j) + 1e-4))           (Var unbiased)
        c(Z) = 1/d sum_{i != j} Cov(Z)_ij^2,  Cov(Z) = (Z - mean)^T (Z - mean) / (N - 1)

        loss = lambda * s  +  mu * (v(Z^a) + v(Z^b)) / 2  +  nu * (c(Z^a) + c(Z^b))

    the weighting of the paper's code (its variance term is the two branches' mean, its
    covariance term their sum). Every rank gathers both views with gradient (the paper's
    FullGatherLayer) and computes this same loss on the whole batch, as in
    ``barlow_twins_loss``.

    Shapes: z_a, z_b (n, d) -> {"loss", "invariance", "variance", "covariance"}: scalars,
    variance = (v(Z^a) + v(Z^b)) / 2 and covariance = c(Z^a) + c(Z^b), unweighted.
    """
    all_a, all_b = dist.gather_with_grad(z_a), dist.gather_with_grad(z_b)  # (N, d) each
    global_n, d = all_a.shape
    invariance = F.mse_loss(all_a, all_b)
    variance, covariance = all_a.new_zeros(()), all_a.new_zeros(())
    for z in (all_a, all_b):
        centred = z - z.mean(dim=0)
        std = (centred.pow(2).sum(dim=0) / (global_n - 1) + 1e-4).sqrt()  # (d,)
        variance = variance + F.relu(1.0 - std).mean() / 2
        cov = centred.T @ centred / (global_n - 1)  # (d, d)
        covariance = covariance + _off_diagonal(cov).pow(2).sum() / d
    loss = (
        invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
    )
    return {"loss": loss, "invariance": invariance, "variance": variance, "covariance": covariance}


@full_precision
def dino_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
) -> torch.Tensor:
    """DINO's cross-entropy between the teacher's centred, sharpened distribution on each
    global crop and the student's on every other crop (Caron et al. 2021).

    With P_t(x) = softmax((g_t(x) - c) / tau_t) and P_s(x) = softmax(g_s(x) / tau_s) over the
    K prototypes, global crops x_1, x_2 (the teacher's, the student's first two) and all V
    crops x_1..x_V (the student's), averaged over the n samples:

        loss = 1/(2(V - 1)) * sum_{i in {1, 2}} sum_{j != i} 1/n * sum_b
                   -sum_k P_t(x_i^b)_k * log P_s(x_j^b)_k

    The teacher's side carries no gradient. Every term is a per-sample mean, so DDP's
    average of the ranks' gradients is the global batch's (equal local batches).

    Shapes: student (V, n, K); teacher (2, n, K); center (K,) -> scalar.
    """
    targets = F.softmax((teacher.detach() - center) / teacher_temperature, dim=-1)  # (2, n, K)
    log_probs = F.log_softmax(student / student_temperature, dim=-1)  # (V, n, K)
    # cross[i, j] = mean over samples of H(targets_i, student_j): (2, V)
    cross = -torch.einsum("ibk,jbk->ij", targets, log_probs) / student.shape[1]
    pairs = ~torch.eye(2, student.shape[0], dtype=torch.bool, device=student.device)
    return cross[pairs].mean()
