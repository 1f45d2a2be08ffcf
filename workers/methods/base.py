"""The one small interface every method implements, and the registry of methods by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, get_args

import numpy as np
import torch
from torch import nn

from pipelines.params import MethodParams
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

    Its constructor takes ``(params, context)``: its own typed spec section (a class of
    ``pipelines.params``) and the ``MethodContext`` it is built around.

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


@dataclass(frozen=True)
class MethodContext:
    """What a method is built around, besides its spec parameters."""

    backbone: nn.Module  # built from the spec's encoder section by workers.encoders
    feature_dim: int  # the backbone's output width
    num_samples: int  # the training set's size, for per-sample state such as a memory bank
    total_steps: int = 1  # optimizer steps of the whole run, for per-step schedules
    steps_per_epoch: int = 1  # optimizer steps per epoch, for schedules set in epochs
    augment_preset: str = "none"  # augment.preset, for methods that crop their own views


METHODS: dict[str, type[Method]] = {}


def register_method(
    params: type[MethodParams],
) -> Callable[[type[Method]], type[Method]]:
    """Register a method class as the worker side of the spec section ``params``, whose
    ``name`` it takes."""

    def register(cls: type[Method]) -> type[Method]:
        (cls.name,) = get_args(params.model_fields["name"].annotation)
        METHODS[cls.name] = cls
        return cls

    return register


def build_method(params: MethodParams, context: MethodContext) -> Method:
    """Build the method that the spec section ``params`` names: ``cls(params, context)``."""
    try:
        cls = METHODS[params.name]
    except KeyError:
        raise ValueError(f"unknown method {params.name!r}; known: {', '.join(METHODS)}") from None
    return cls(params, context)
