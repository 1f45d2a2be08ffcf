"""The one small interface every method implements, and the registry of methods by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from workers import dist
from workers.augment import Augment


@dataclass
class Batch:
    images: torch.Tensor  # (n, C, H, W) this rank's clean images, on the training device
    indices: torch.Tensor  # (n,) dataset indices, for methods that keep per-sample state
    step: int  # global optimizer step, seeds the augmentations
    augment: Augment
    seed: int = 0  # train.seed: with the rank and the step, seeds the method's own noise

    def view(self, number: int) -> torch.Tensor:
        return self.augment(self.images, self.step, number)

    def generator(self) -> torch.Generator:
        """A generator for this rank's noise at this step (corruption, reparameterisation,
        Gibbs and Langevin sampling), seeded from (seed, rank, step).

        The global RNG is seeded identically on every rank so that the initial weights agree;
        noise drawn from it would be identical on every rank too, and each extra worker would
        corrupt and sample exactly what rank 0 does. Seeding per step also makes a resumed
        run draw what an uninterrupted one draws, with no generator state to checkpoint."""
        generator = torch.Generator(self.images.device)
        # A 3-tuple: never equal to the augmentations' (seed, rank, step, view).
        return generator.manual_seed(hash((self.seed, dist.rank(), self.step)) & 0x7FFF_FFFF)


class Method(nn.Module):
    """A self-supervised method: owns its networks and state, trains through ``forward``.

    ``forward`` is the training step so that DDP sees it and synchronises gradients.
    All state a resumed run needs (queues, banks, momentum encoders) lives in registered
    buffers and submodules, so ``state_dict`` covers it.
    """

    name: ClassVar[str]

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Return at least ``{"loss": scalar}``; other entries are logged as metrics."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Updates that follow the optimizer (momentum encoders, queues); none by default."""

    def encoder(self) -> nn.Module:
        """The network a downstream classifier uses; what the registry stores. It must be
        built by ``workers.encoders.build_encoder`` so that it carries its ``config``."""
        raise NotImplementedError

    def figures(self, data: torch.Tensor) -> dict[str, np.ndarray]:
        """Pictures for the job's MLflow run at the end of training, as ``file name -> HxWx3
        uint8 image`` (dictionaries, reconstructions, energy landscapes). ``data`` is a
        sample of training data on the method's device. None by default."""
        return {}


METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def register(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return register


def build_method(
    params: dict[str, Any], backbone: nn.Module, feature_dim: int, num_samples: int
) -> Method:
    """Build the method named by ``params["name"]`` around ``backbone``.

    Every method's constructor takes ``backbone``, ``feature_dim`` (the backbone's output
    width) and ``num_samples`` (the training set's size, for per-sample state such as a
    memory bank), then its own spec parameters as keywords."""
    options = {key: value for key, value in params.items() if key != "name"}
    try:
        cls = METHODS[params["name"]]
    except KeyError:
        raise ValueError(
            f"unknown method {params['name']!r}; known: {', '.join(METHODS)}"
        ) from None
    return cls(backbone=backbone, feature_dim=feature_dim, num_samples=num_samples, **options)
