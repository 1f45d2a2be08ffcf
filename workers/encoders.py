"""Encoders: the networks a downstream classifier uses as feature extractors.

An encoder is rebuilt from a small JSON-able config (``EncoderConfig``), so a registered
encoder is a config plus a state dict: no pickle needed to load it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EncoderConfig:
    arch: str
    in_channels: int
    image_size: int
    out_dim: int

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallConvNet(nn.Module):
    """Three conv blocks, two 2x poolings, then a linear map to ``out_dim`` features.

    The last spatial map is pooled to 2x2 rather than 1x1: on 8x8 digits *where* a stroke
    sits is much of the signal, and a global average would throw it away.
    Shapes: (B, C, H, W) -> (B, out_dim).
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.features = nn.Sequential(
            _conv_block(config.in_channels, 32),
            _conv_block(32, 64),
            nn.MaxPool2d(2),
            _conv_block(64, 128),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.project = nn.Linear(128 * 4, config.out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(images))


ARCHITECTURES: dict[str, type[nn.Module]] = {"small-convnet": SmallConvNet}


def build_encoder(config: EncoderConfig) -> nn.Module:
    try:
        architecture = ARCHITECTURES[config.arch]
    except KeyError:
        raise ValueError(
            f"unknown encoder arch {config.arch!r}; known: {', '.join(ARCHITECTURES)}"
        ) from None
    return architecture(config)
