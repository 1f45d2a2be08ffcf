"""Exact resume, checked the same way for every stateful method: N steps straight against N/2
steps, a save, a fresh process-like start (other weights, another global RNG state), a load
and the other N/2. The checkpoint is ``Training.state_dict()``, what the train loop saves."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from workers.step import Training

Build = Callable[[int], Training]
TrainSteps = Callable[[Training, range, torch.Tensor], None]


def straight_halfway_resumed(
    build: Build, train_steps: TrainSteps, images: torch.Tensor, folder: Path, steps: int = 6
) -> tuple[dict, dict, dict]:
    """Method state dicts after ``steps`` straight, after the first half, and after the
    resumed run."""
    straight = build(0)
    train_steps(straight, range(steps), images)

    first = build(0)
    train_steps(first, range(steps // 2), images)
    torch.save(first.state_dict(), folder / "state.pt")
    resumed = build(1)
    torch.rand(1000)
    resumed.load_state_dict(torch.load(folder / "state.pt", weights_only=True))
    train_steps(resumed, range(steps // 2, steps), images)
    return straight.method.state_dict(), first.method.state_dict(), resumed.method.state_dict()
