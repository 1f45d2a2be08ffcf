"""Exact resume, checked the same way for every stateful method: N steps straight against N/2
steps, a save, a fresh process-like start (other weights, another global RNG state), a load
and the other N/2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

Build = Callable[[int], tuple[nn.Module, torch.optim.Optimizer]]
TrainSteps = Callable[[nn.Module, torch.optim.Optimizer, range, torch.Tensor], None]


def straight_halfway_resumed(
    build: Build, train_steps: TrainSteps, images: torch.Tensor, folder: Path, steps: int = 6
) -> tuple[dict, dict, dict]:
    """State dicts after ``steps`` straight, after the first half, and after the resumed run."""
    straight, straight_optimizer = build(0)
    train_steps(straight, straight_optimizer, range(steps), images)

    first, first_optimizer = build(0)
    train_steps(first, first_optimizer, range(steps // 2), images)
    torch.save(
        {"method": first.state_dict(), "optimizer": first_optimizer.state_dict()},
        folder / "state.pt",
    )
    resumed, resumed_optimizer = build(1)
    torch.rand(1000)
    state = torch.load(folder / "state.pt", weights_only=True)
    resumed.load_state_dict(state["method"])
    resumed_optimizer.load_state_dict(state["optimizer"])
    train_steps(resumed, resumed_optimizer, range(steps // 2, steps), images)
    return straight.state_dict(), first.state_dict(), resumed.state_dict()
