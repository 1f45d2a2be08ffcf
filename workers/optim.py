"""Optimizers and schedules for pretraining: SGD, Adam, AdamW and LARS by name, the
learning-rate factor (linear warm-up, cosine decay) and BYOL's target-momentum schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adam", "adamw", "lars", "sgd")
# SGD's and LARS's heavy-ball momentum, as in the SimCLR / BYOL / Barlow Twins recipes.
MOMENTUM = 0.9


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) as BYOL, Barlow Twins and VICReg use
    it: SGD with momentum and weight decay whose step for each parameter tensor w (gradient g)
    is rescaled by a trust ratio, so every layer moves by about the same fraction of its norm:

        g' = g + wd * w
        g' = trust * g',   trust = eta * ||w|| / ||g'||   (1 when ||w|| = 0 or ||g'|| = 0)
        buf = momentum * buf + g'
        w = w - lr * buf

    A group with ``lars_adapt`` False skips the trust ratio (plain SGD with momentum): biases
    and normalisation parameters go there, with ``weight_decay`` 0 (see ``build_optimizer``).
    The momentum buffers live in ``state``, so a run resumed from ``state_dict()`` continues
    exactly."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = MOMENTUM,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        lars_adapt: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "lars_adapt": lars_adapt,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for weight in group["params"]:
                if weight.grad is None:
                    continue
                update = weight.grad.add(weight, alpha=group["weight_decay"])
                if group["lars_adapt"]:
                    weight_norm, update_norm = weight.norm(), update.norm()
                    # Tensor-valued so that no step waits on the device for a norm.
                    trust = torch.where(
                        (weight_norm > 0) & (update_norm > 0),
                        group["eta"] * weight_norm / update_norm,
                        torch.ones_like(weight_norm),
                    )
                    update.mul_(trust)
                state = self.state[weight]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(weight)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                weight.add_(buffer, alpha=-group["lr"])
        return loss


def build_optimizer(
    name: str, model: nn.Module, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of ``OPTIMIZERS``) over all of ``model``'s parameters. SGD,
    Adam and AdamW get one group, even an empty one (closed-form methods such as k-means and
    PCA have nothing to step). LARS gets two, both always present: the weights (ndim >= 2),
    adapted and decayed, and the biases and normalisation parameters (ndim <= 1), neither
    adapted nor decayed, as in BYOL and Barlow Twins."""
    parameters = list(model.parameters())
    if name == "sgd":
        return torch.optim.SGD(
            [{"params": parameters}], lr=lr, momentum=MOMENTUM, weight_decay=weight_decay
        )
    if name == "adam":
        return torch.optim.Adam([{"params": parameters}], lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW([{"params": parameters}], lr=lr, weight_decay=weight_decay)
    if name == "lars":
        groups = [
            {"params": [p for p in parameters if p.ndim > 1]},
            {
                "params": [p for p in parameters if p.ndim <= 1],
                "lars_adapt": False,
                "weight_decay": 0.0,
            },
        ]
        return LARS(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor at optimizer step ``step``: a linear warm-up
    (step + 1) / warmup_steps over the first ``warmup_steps`` steps, then a cosine decay
    0.5 * (1 + cos(pi * p)) to 0 at ``total_steps``, p = (step - warmup) / (total - warmup)
    clamped to 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's target-network EMA momentum at ``step``:
    1 - (1 - base) * (cos(pi * step / total_steps) + 1) / 2, from ``base`` at step 0 up to 1
    at ``total_steps`` (and after: the step is clamped to the total)."""
    progress = min(step, total_steps) / max(1, total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
