"""Encoders: the networks a downstream classifier uses as feature extractors.

Every encoder class is registered under an arch name and built from JSON-able keyword
arguments; it keeps them as ``self.config`` (``{"arch": name, **kwargs}``). A registered
encoder is therefore that config plus a state dict: no pickle is needed to load it, and a
method whose encoder is not a plain backbone (a FISTA solver with a learned dictionary, a
projection) registers its own arch the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

EncoderConfig = dict[str, Any]  # {"arch": name, **constructor kwargs}
ARCHITECTURES: dict[str, type[nn.Module]] = {}


def register_encoder(arch: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def register(cls: type[nn.Module]) -> type[nn.Module]:
        ARCHITECTURES[arch] = cls
        return cls

    return register


def build_encoder(config: EncoderConfig) -> nn.Module:
    """Build the encoder a config describes and remember the config on it."""
    options = {key: value for key, value in config.items() if key != "arch"}
    try:
        architecture = ARCHITECTURES[config["arch"]]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown encoder arch {config.get('arch')!r}; known: {known}") from None
    encoder = architecture(**options)
    encoder.config = {"arch": config["arch"], **options}
    return encoder


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


@register_encoder("small-convnet")
class SmallConvNet(nn.Module):
    """Three conv blocks, one 2x pooling, then a linear map to ``out_dim`` features.

    The last spatial map is pooled to 2x2 rather than 1x1: on 8x8 digits *where* a stroke
    sits is much of the signal, and a global average would throw it away.
    Shapes: (B, C, H, W) -> (B, out_dim).
    """

    def __init__(self, in_channels: int, image_size: int, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.features = nn.Sequential(
            _conv_block(in_channels, 32),
            _conv_block(32, 64),
            nn.MaxPool2d(2) if image_size >= 4 else nn.Identity(),
            _conv_block(64, 128),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.project = nn.Linear(128 * 4, out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(images))


@register_encoder("mlp")
class MLP(nn.Module):
    """Flatten, two hidden layers with SiLU, then a linear map to ``out_dim`` features: for
    vectors (``in_channels`` D, ``image_size`` 1, as ``builtin:spiral`` gives) and small images.
    SiLU rather than ReLU keeps an energy built on it smooth for Langevin dynamics, and there
    is no BatchNorm, so a sample's features never depend on its batch.
    Shapes: (B, C, H, W) or (B, D) -> (B, out_dim).
    """

    def __init__(self, in_channels: int, image_size: int, out_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.out_dim = out_dim
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        return self.layers(samples)


# Archs that methods define in their own modules register when imported; importing them here
# lets any stored encoder load through this module alone. At the bottom: they import from it.
from workers import latent_encoders, resnet, vit  # noqa: E402, F401
