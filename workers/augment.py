"""Augmentation presets, run by kornia on the training device on whole batches.

Every call is seeded from (seed, rank, step), so a resumed run draws the same views as an
uninterrupted one and two ranks never draw the same ones.
"""

from __future__ import annotations

from collections.abc import Callable

import kornia.augmentation as K
import torch
from torch import nn

# augment(images, step, view) -> one augmented view of the batch
Augment = Callable[[torch.Tensor, int, int], torch.Tensor]


class GaussianNoise(nn.Module):
    """Additive N(0, std^2) noise, clamped back to [0, 1]."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images + self.std * torch.randn_like(images)).clamp(0.0, 1.0)


# A preset maps (output side, crop scale range) to its pipeline; scale None: the preset's own.
Scale = tuple[float, float]


def _digits_preset(image_size: int, scale: Scale | None = None) -> nn.Module:
    # Small affine jitter and crops keep a digit readable; no flips (a flipped 2 is no 2).
    return nn.Sequential(
        K.RandomAffine(degrees=12.0, translate=(0.12, 0.12), scale=(0.85, 1.15), p=1.0),
        K.RandomResizedCrop((image_size, image_size), scale=scale or (0.6, 1.0), ratio=(0.8, 1.25)),
        GaussianNoise(std=0.08),
    )


def _simclr_preset(image_size: int, scale: Scale | None = None) -> nn.Module:
    return nn.Sequential(
        K.RandomResizedCrop((image_size, image_size), scale=scale or (0.2, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((3, 3), (0.1, 2.0), p=0.5),
    )


def _none_preset(image_size: int, scale: Scale | None = None) -> nn.Module:
    # No augmentation; asked for crops (DINO's multi-crop), only the crops.
    if scale is None:
        return nn.Identity()
    return K.RandomResizedCrop((image_size, image_size), scale=scale)


_PRESETS: dict[str, Callable[[int, Scale | None], nn.Module]] = {
    "digits": _digits_preset,
    "simclr": _simclr_preset,
    "none": _none_preset,
}


def _seeded(pipeline: nn.Module, seed: int, rank: int) -> Augment:
    def augment(images: torch.Tensor, step: int, view: int) -> torch.Tensor:
        # A fresh generator state per (seed, rank, step, view): deterministic, resumable, and the
        # global RNG that the model's own randomness uses is left untouched.
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(hash((seed, rank, step, view)) & 0x7FFF_FFFF)
            return pipeline(images)

    return augment


def build_augment(preset: str, image_size: int, seed: int, rank: int) -> Augment:
    """Return ``augment(images, step, view)`` for one rank; ``view`` tells the views apart."""
    return _seeded(_PRESETS[preset](image_size, None), seed, rank)


def build_crop_augment(preset: str, crop_size: int, scale: Scale, seed: int, rank: int) -> Augment:
    """``build_augment`` with the preset's random resized crop going to ``crop_size`` pixels
    from a ``scale`` fraction of the image's area (DINO's global and local crops); the preset's
    other transforms are kept, and the views are seeded the same way."""
    return _seeded(_PRESETS[preset](crop_size, scale), seed, rank)
