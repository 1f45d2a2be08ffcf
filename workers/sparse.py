"""The math the sparse-coding family shares: soft threshold, power iteration, batched ISTA/FISTA.

The convention, written once. For a sample y and a code z, with a linear operator A (a
dictionary W of shape (d, k) for sparse coding and LISTA; a sum of transposed convolutions for
convolutional sparse coding):

    E(y, z) = ||y - A z||^2 + lam * |z|_1          (no 1/2 in front)

The smooth part f(z) = ||y - A z||^2 has gradient 2 A^T (A z - y), whose Lipschitz constant is
L = 2 * lambda_max(A^T A); ISTA steps by 1/L and thresholds at lam / L. lambda_max comes from
power iteration on v -> A^T A v, so the same code serves a matrix and a convolution.

scikit-learn's ``sparse_encode`` (lasso_lars, lasso_cd) minimises, per sample,
(1 / (2 d)) ||y - A z||^2 + (alpha / d) |z|_1, i.e. E / (2 d) with lam = 2 * alpha; so does
MiniBatchDictionaryLearning (0.5 ||y - A z||^2 + alpha |z|_1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Operator = Callable[[torch.Tensor], torch.Tensor]


def soft_threshold(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """shrink(x, t) = sign(x) * max(|x| - t, 0), elementwise; the proximal map of t * |x|_1."""
    return x.sign() * (x.abs() - threshold).clamp_min(0)


def largest_eigenvalue(
    operator: Operator, probe: torch.Tensor, tol: float = 1e-7, max_iter: int = 1000
) -> float:
    """lambda_max of a symmetric positive semi-definite linear ``operator`` by power iteration
    from ``probe``; stops when the estimate moves by less than ``tol`` relative."""
    vector = probe / probe.norm()
    estimate = 0.0
    for _ in range(max_iter):
        image = operator(vector)
        norm = image.norm().item()
        if norm == 0.0:
            return 0.0
        vector = image / norm
        if abs(norm - estimate) <= tol * norm:
            return norm
        estimate = norm
    return estimate


def lipschitz_constant(
    forward: Operator, adjoint: Operator, code_shape: tuple[int, ...], like: torch.Tensor
) -> float:
    """L = 2 * lambda_max(A^T A) for the gradient of ||y - A z||^2. ``code_shape`` is one code's
    shape with a leading 1, e.g. (1, k) or (1, k, H, W); ``like`` gives the device and dtype.
    The probe comes from a fixed generator, so every rank computes the same L."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(code_shape, generator=generator).to(like)
    return 2.0 * largest_eigenvalue(lambda v: adjoint(forward(v)), probe)


def energy(y: torch.Tensor, codes: torch.Tensor, forward: Operator, lam: float) -> torch.Tensor:
    """E(y, z) = ||y - A z||^2 + lam * |z|_1 per sample. Shapes: y (n, ...), codes (n, ...) ->
    (n,)."""
    residual = (y - forward(codes)).flatten(1)
    return residual.pow(2).sum(1) + lam * codes.flatten(1).abs().sum(1)


@dataclass
class Solution:
    codes: torch.Tensor  # (n, ...) the codes z
    iterations: int  # iterations run until every sample met the tolerance (or max_iter)


# Iterations between two convergence checks. A check reads a value back to the host (a
# synchronisation on a GPU, a Python branch and a gather on the CPU); checking every iteration
# cost more than the few extra iterations a sample runs past its tolerance.
CHECK_EVERY = 10

Descent = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def iterate(
    target: torch.Tensor,
    descend: Descent,
    codes: torch.Tensor,
    threshold: float,
    tol: float,
    max_iter: int,
    accelerated: bool,
    check_every: int = CHECK_EVERY,
) -> Solution:
    """ISTA, or FISTA (Beck & Teboulle 2009) if ``accelerated``, from the zero ``codes``
    (n, ...), for a whole batch at once on its device. ``descend(x, target)`` is the gradient
    step x - (1/L) grad f(x) for the rows of ``target`` still iterating:

        ISTA:  z_{t+1} = shrink(descend(x_t), lam / L),   x_t = z_t
        FISTA: s_{t+1} = (1 + sqrt(1 + 4 s_t^2)) / 2,
               x_{t+1} = z_{t+1} + ((s_t - 1) / s_{t+1}) (z_{t+1} - z_t)

    Every ``check_every`` iterations (and only then) a sample whose code moved by
    ||z_{t+1} - z_t|| <= tol * ||z_{t+1}|| stops and leaves the working set: later iterations
    cost only what the unfinished samples cost, and since the checks fall on fixed iteration
    numbers a sample's code does not depend on which other samples share its batch (so a batch
    split over ranks gives the codes one process would). ``iterations`` is the exact count of
    iterations the last sample ran."""
    working = torch.arange(codes.shape[0], device=codes.device)  # samples still iterating
    current, point, momentum = codes, codes, 1.0  # the working samples' state
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        new = F.softshrink(descend(point, target), threshold)
        if accelerated:
            new_momentum = (1.0 + math.sqrt(1.0 + 4.0 * momentum * momentum)) / 2.0
            # lerp(z_t, z_{t+1}, 1 + beta) = z_{t+1} + beta (z_{t+1} - z_t), in one pass
            point = torch.lerp(current, new, 1.0 + (momentum - 1.0) / new_momentum)
            momentum = new_momentum
        else:
            point = new
        converged = None
        if iterations % check_every == 0:
            change = (new - current).flatten(1).norm(dim=1)
            converged = change <= tol * new.flatten(1).norm(dim=1)
        current = new
        if converged is not None and bool(converged.any()):
            codes[working[converged]] = current[converged]
            going = ~converged
            working, current, point, target = (
                working[going],
                current[going],
                point[going],
                target[going],
            )
            if len(working) == 0:
                break
    codes[working] = current  # the samples that reached max_iter
    return Solution(codes=codes, iterations=iterations)


def solve(
    y: torch.Tensor,
    forward: Operator,
    adjoint: Operator,
    code_shape: tuple[int, ...],
    lam: float,
    tol: float,
    max_iter: int,
    accelerated: bool = True,
    lipschitz: float | None = None,
) -> Solution:
    """argmin_z E(y, z) by ISTA/FISTA (see ``iterate``) for any operator A given as
    ``forward`` (A z) and ``adjoint`` (A^T r), e.g. a sum of convolutions:

        descend(x) = x - (2/L) A^T (A x - y)

    Shapes: y (n, ...) -> codes (n, *code_shape[1:])."""
    if lipschitz is None:
        lipschitz = lipschitz_constant(forward, adjoint, code_shape, y)
    scale = 2.0 / lipschitz
    codes = torch.zeros(y.shape[0], *code_shape[1:], dtype=y.dtype, device=y.device)

    def descend(point: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.add(point, adjoint(forward(point) - target), alpha=-scale)

    return iterate(y, descend, codes, lam / lipschitz, tol, max_iter, accelerated)


@torch.no_grad()
def solve_dense(
    y: torch.Tensor,
    dictionary: torch.Tensor,
    lam: float,
    tol: float,
    max_iter: int,
    accelerated: bool = True,
    lipschitz: float | None = None,
) -> Solution:
    """argmin_z E(y, z) by ISTA/FISTA for a dictionary W (D, k), in Gram form: with
    S = I - (2/L) W^T W and c = (2/L) W^T y, both computed once per batch,

        descend(x) = x - (2/L) (W^T W x - W^T y) = S x + c,

    one fused (n x k)(k x k) product and add per iteration instead of two products, a
    subtraction and a scaling. L = 2 lambda_max(W^T W) comes from power iteration on the small
    k x k Gram matrix unless given (it depends only on W: pass it to encode many batches).
    Shapes: y (n, D) -> codes (n, k)."""
    gram = dictionary.T @ dictionary
    if lipschitz is None:
        lipschitz = lipschitz_constant(lambda z: z @ gram, lambda z: z, (1, len(gram)), y)
    scale = 2.0 / lipschitz
    inhibition = torch.eye(len(gram), dtype=y.dtype, device=y.device) - scale * gram  # S, symmetric
    drive = scale * (y @ dictionary)  # c, as rows (n, k)
    codes = torch.zeros_like(drive)

    def descend(point: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.addmm(target, point, inhibition)

    return iterate(drive, descend, codes, lam / lipschitz, tol, max_iter, accelerated)


def normalize_columns_(weight: torch.Tensor, dim: int) -> None:
    """Scale every atom of ``weight`` to unit L2 norm in place; ``dim`` lists the atoms
    (dim=1 for a dictionary (d, k), dim=0 for conv kernels (k, C, s, s)). Without it the
    dictionary grows and the codes shrink, and the L1 penalty means nothing."""
    with torch.no_grad():
        reduce = [axis for axis in range(weight.dim()) if axis != dim]
        norms = weight.pow(2).sum(dim=reduce, keepdim=True).sqrt()
        weight.div_(norms.clamp_min(1e-12))


def dense_operators(dictionary: torch.Tensor) -> tuple[Operator, Operator]:
    """A z and A^T r for a dictionary W (d, k): codes (n, k) -> (n, d), residuals back."""
    return (lambda codes: codes @ dictionary.T), (lambda residual: residual @ dictionary)
