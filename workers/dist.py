"""Distributed helpers: rank, world size, and all-gather with and without gradient.

Every helper degrades to the identity in a single process, so methods need no special case.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


class _GatherWithGradient(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice.

    Every rank computes a loss over the whole gathered batch, so the gradient that reaches
    rank r's embeddings is the sum over all ranks of d(loss_rank)/d(slice_r): an all_reduce
    of the incoming gradients, then rank r keeps slice r. DDP then averages parameter
    gradients, which makes the update equal to one process on the concatenated batch.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> tuple:
        gathered = [torch.zeros_like(tensor) for _ in range(world_size())]
        torch_dist.all_gather(gathered, tensor.contiguous())
        return tuple(gathered)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)  # (world, batch, ...)
        torch_dist.all_reduce(stacked)
        return stacked[rank()]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) from all ranks along dim 0."""
    if world_size() == 1:
        return tensor
    return torch.cat(_GatherWithGradient.apply(tensor), dim=0)


@torch.no_grad()
def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, outside autograd."""
    if world_size() == 1:
        return tensor
    gathered = [torch.zeros_like(tensor) for _ in range(world_size())]
    torch_dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (a copy; the input is left alone)."""
    if world_size() == 1:
        return value.clone()
    reduced = value.detach().clone()
    torch_dist.all_reduce(reduced)
    return reduced / world_size()


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward all-reduces the incoming gradients: every rank's loss
    depends on the sum, so the gradient of the sum with respect to rank r's addend is the
    sum over ranks of the gradients that reached the sum."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.clone()
        torch_dist.all_reduce(reduced)
        return reduced

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        reduced = grad.clone()
        torch_dist.all_reduce(reduced)
        return reduced


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks, differentiable (the identity in one process)."""
    if world_size() == 1:
        return tensor
    return _AllReduceSum.apply(tensor)
