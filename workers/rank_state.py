"""State that methods keep identical on every rank: statistics summed over ranks (k-means,
PCA), and samples that persist from step to step (persistent-CD chains, a replay buffer)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workers import dist


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over ranks (a copy): statistics of the global batch."""
    return dist.all_reduce_mean(value) * dist.world_size()


class RankSlices(nn.Module):
    """A buffer of (world_size * per_rank, ...) samples in which rank r owns rows
    [r * per_rank, (r + 1) * per_rank).

    A rank reads and writes only its own slice, and every write is gathered by every rank, so
    all ranks hold identical copies: DDP's buffer broadcast from rank 0 changes nothing, and
    rank 0's checkpoint holds every rank's samples, which a resumed run needs.
    """

    def __init__(self, per_rank: int, initial: torch.Tensor) -> None:
        super().__init__()
        self.per_rank = per_rank
        self.register_buffer("samples", initial.clone())  # (world * per_rank, ...)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A checkpoint holds world_size * per_rank rows, so one from another number of
        # workers has another length; slices cannot be re-dealt (each rank's chains or
        # negatives continue from its own), so say what to change rather than fail on a shape.
        saved = state_dict.get(prefix + "samples")
        if saved is not None and saved.shape[0] != self.samples.shape[0]:
            raise ValueError(
                f"the checkpoint's {prefix}samples were written by "
                f"{saved.shape[0] / self.per_rank:g} workers ({saved.shape[0]} rows, "
                f"{self.per_rank} per worker), but this run has {dist.world_size()}: resume "
                "with the number of workers (resources.workers) that wrote the checkpoint"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def local(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's samples (all of its slice, or the given rows of it), as a copy."""
        start = dist.rank() * self.per_rank
        mine = self.samples[start : start + self.per_rank]
        return (mine if rows is None else mine[rows]).clone()

    @torch.no_grad()
    def write(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``values`` (m, ...) at ``rows`` (m,) of this rank's slice, and every other
        rank's writes of this step at theirs (every rank writes the same m)."""
        offsets = dist.gather(rows + dist.rank() * self.per_rank)
        self.samples[offsets] = dist.gather(values.detach().to(self.samples.dtype))
