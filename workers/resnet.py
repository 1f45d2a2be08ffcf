"""ResNet-18 and ResNet-50 (He et al. 2016) as registered encoders, laid out as torchvision's.

The features are the global average of the last stage, before any classifier: 512 wide for
ResNet-18, 2048 for ResNet-50. Two stems: ``"cifar"`` (3x3 conv, stride 1, no max-pool) keeps
the resolution of small images (8x8 digits, 32x32), where the ImageNet stem's 4x reduction would
leave the stages almost nothing to look at; ``"imagenet"`` (7x7 conv stride 2, 3x3 max-pool
stride 2) is for 96 px and up. Every layer pads, so any image size >= 1 gets through.
Shapes: (B, C, H, W) -> (B, 512 | 2048).
"""

from __future__ import annotations

import torch
from torch import nn

from workers.encoders import register_encoder

STAGE_WIDTHS = (64, 128, 256, 512)
STEMS = ("cifar", "imagenet")


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
) -> list[nn.Module]:
    """A bias-free conv (the BN after it has its own shift) and its BatchNorm."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False
    )
    return [conv, nn.BatchNorm2d(out_channels)]


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The identity where shapes agree, else a strided 1x1 projection (option B of the paper)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride))


class BasicBlock(nn.Module):
    """Two 3x3 convs plus the input: (B, C_in, H, W) -> (B, width, H / stride, W / stride)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            *_conv_bn(in_channels, width, 3, stride),
            nn.ReLU(inplace=True),
            *_conv_bn(width, width, 3),
        )
        self.shortcut = _shortcut(in_channels, width * self.expansion, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as torchvision's "ResNet v1.5"), 1x1 expand by 4, plus the
    input: (B, C_in, H, W) -> (B, 4 * width, H / stride, W / stride)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            *_conv_bn(in_channels, width, 1),
            nn.ReLU(inplace=True),
            *_conv_bn(width, width, 3, stride),
            nn.ReLU(inplace=True),
            *_conv_bn(width, width * self.expansion, 1),
        )
        self.shortcut = _shortcut(in_channels, width * self.expansion, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


def _stem(in_channels: int, stem: str) -> nn.Sequential:
    if stem == "cifar":
        return nn.Sequential(*_conv_bn(in_channels, 64, 3), nn.ReLU(inplace=True))
    if stem == "imagenet":
        return nn.Sequential(
            *_conv_bn(in_channels, 64, 7, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
    raise ValueError(f"unknown ResNet stem {stem!r}; known: {', '.join(STEMS)}")


class ResNet(nn.Module):
    """Stem, four stages (the first at stride 1, the others halving), global average pool.

    ``image_size`` is part of every backbone's config; the global pool makes the network
    itself size-agnostic, so it is only checked, not used.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        in_channels: int,
        image_size: int,
        out_dim: int,
        stem: str,
    ) -> None:
        super().__init__()
        width = STAGE_WIDTHS[-1] * block.expansion
        if out_dim != width:
            raise ValueError(f"out_dim {out_dim} must equal this ResNet's feature width {width}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.out_dim = out_dim
        self.stem = _stem(in_channels, stem)
        stages, channels = [], 64
        for index, (stage_width, blocks) in enumerate(zip(STAGE_WIDTHS, layers, strict=True)):
            for position in range(blocks):
                stride = 2 if index > 0 and position == 0 else 1
                stages.append(block(channels, stage_width, stride))
                channels = stage_width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._initialise()

    def _initialise(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Each residual branch starts at zero, so every block starts as the identity: this
        # makes large-batch training stable from the first step (Goyal et al. 2017).
        for module in self.stages:
            nn.init.zeros_(module.branch[-1].weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_dim); channels_last inputs stay channels_last until the pool."""
        return self.pool(self.stages(self.stem(images))).flatten(1)


@register_encoder("resnet18")
class ResNet18(ResNet):
    """ResNet-18: BasicBlocks [2, 2, 2, 2]. (B, C, H, W) -> (B, 512)."""

    def __init__(self, in_channels: int, image_size: int, out_dim: int, stem: str = "cifar"):
        super().__init__(BasicBlock, (2, 2, 2, 2), in_channels, image_size, out_dim, stem)


@register_encoder("resnet50")
class ResNet50(ResNet):
    """ResNet-50: Bottlenecks [3, 4, 6, 3]. (B, C, H, W) -> (B, 2048)."""

    def __init__(self, in_channels: int, image_size: int, out_dim: int, stem: str = "cifar"):
        super().__init__(Bottleneck, (3, 4, 6, 3), in_channels, image_size, out_dim, stem)
