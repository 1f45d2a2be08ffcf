"""ResNet-18/50 and ViT-tiny/small encoders: shapes, sizes, the ViT's MAE/DINO API, memory
formats and the stored form. Small batches on one thread: the whole file runs in seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.encoders import build_encoder
from workers.export import load_encoder_dir, save_encoder
from workers.vit import patchify, unpatchify

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTHS = {"resnet18": 512, "resnet50": 2048, "vit-tiny": 192, "vit-small": 384}


def _build(arch: str, in_channels: int = 3, image_size: int = 32, **options) -> nn.Module:
    config = {"arch": arch, "in_channels": in_channels, "image_size": image_size}
    return build_encoder({**config, "out_dim": WIDTHS[arch], **options})


def _train_step(encoder: nn.Module, images: torch.Tensor) -> None:
    """Random BatchNorm affines (the zero-initialised ones would hide every residual branch)
    and one train-mode forward, so that running statistics move away from 0/1."""
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        encoder.train()(images)
    encoder.eval()


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [8, 32, 96])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_feature_shapes(arch: str, stem: str, size: int, in_channels: int) -> None:
    encoder = _build(arch, in_channels, size, stem=stem).eval()
    with torch.no_grad():
        features = encoder(torch.randn(2, in_channels, size, size))
    assert features.shape == (2, WIDTHS[arch]) and encoder.out_dim == WIDTHS[arch]
    assert torch.isfinite(features).all() and not torch.equal(features[0], features[1])


@pytest.mark.parametrize(
    ("arch", "stem", "count"),
    [
        # torchvision's 11,689,512 and 25,557,032 less their 1000-way fc layers.
        ("resnet18", "imagenet", 11_176_512),
        ("resnet50", "imagenet", 23_508_032),
        # The 3x3 stem has 3 * 64 * (49 - 9) fewer weights than the 7x7 one.
        ("resnet18", "cifar", 11_176_512 - 7_680),
    ],
)
def test_resnet_parameter_counts(arch: str, stem: str, count: int) -> None:
    assert sum(p.numel() for p in _build(arch, 3, 224, stem=stem).parameters()) == count


def test_initialisation() -> None:
    torch.manual_seed(0)
    resnet = _build("resnet50")
    # Every residual branch ends in a zero-scaled BatchNorm; the other BatchNorms scale by 1.
    assert all(not block.branch[-1].weight.any() for block in resnet.stages)
    assert torch.equal(resnet.stem[1].weight, torch.ones(64))
    conv = resnet.stages[0].branch[3]  # 3x3, 64 -> 64: kaiming fan_out std sqrt(2 / (64 * 9))
    assert abs(conv.weight.std().item() / (2 / 576) ** 0.5 - 1) < 0.03
    vit = _build("vit-small")
    assert abs(vit.pos_embed.std().item() / 0.02 - 1) < 0.03
    qkv = vit.blocks[0].attn.qkv  # xavier-uniform std sqrt(2 / (fan_in + fan_out))
    assert abs(qkv.weight.std().item() / (2 / (384 + 3 * 384)) ** 0.5 - 1) < 0.03
    assert not qkv.bias.any() and torch.equal(vit.norm.weight, torch.ones(384))


@pytest.mark.parametrize(("arch", "count"), [("vit-tiny", 5_524_416), ("vit-small", 21_665_664)])
def test_vit_parameter_counts_match_timm_without_head(arch: str, count: int) -> None:
    # timm's vit_*_patch16_224 (5,717,416 and 22,050,664) less their 1000-way heads.
    encoder = _build(arch, 3, 224, patch_size=16)
    assert sum(p.numel() for p in encoder.parameters()) == count


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("arch", ["vit-tiny", "vit-small"])
def test_vit_shapes_and_attributes(arch: str, in_channels: int) -> None:
    encoder = _build(arch, in_channels, 32).eval()
    dim = WIDTHS[arch]
    assert (encoder.dim, encoder.out_dim, encoder.patch_size) == (dim, dim, 4)
    assert (encoder.grid, encoder.num_patches) == (8, 64)
    images = torch.randn(2, in_channels, 32, 32)
    with torch.no_grad():
        tokens = encoder.embed(images)
        assert tokens.shape == (2, 64, dim)
        assert encoder.encode(tokens[:, :16]).shape == (2, 17, dim)
        assert encoder(images).shape == (2, dim)


def test_vit_embed_then_encode_is_forward() -> None:
    torch.manual_seed(0)
    encoder = _build("vit-tiny").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = encoder.embed(images)
        assert torch.equal(encoder.encode(tokens)[:, 0], encoder(images))
        # embed adds each token's own position embedding to its patch's projection.
        patches = encoder.patch_embed(images).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tokens - patches, encoder.pos_embed[:, 1:].expand(2, -1, -1))


def test_vit_interpolates_position_embeddings_for_smaller_inputs() -> None:
    torch.manual_seed(0)
    encoder = _build("vit-tiny").eval()
    images = torch.randn(2, 3, 16, 16)  # a 4x4 grid on a model trained on 8x8
    with torch.no_grad():
        features = encoder(images)
        patches = encoder.patch_embed(images).flatten(2).transpose(1, 2)  # (2, 16, 192)
        grid = encoder.pos_embed[:, 1:].reshape(1, 8, 8, 192).permute(0, 3, 1, 2)
        resized = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
        expected = encoder.encode(patches + resized.flatten(2).transpose(1, 2))[:, 0]
        truncated = encoder.encode(patches + encoder.pos_embed[:, 1:17])[:, 0]
    assert features.shape == (2, 192)
    torch.testing.assert_close(features, expected)
    assert not torch.allclose(features, truncated)
    with pytest.raises(ValueError, match="18x18.*patch_size 4"):
        encoder(torch.randn(1, 3, 18, 18))


def test_patchify_round_trip_and_token_order() -> None:
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    patches = patchify(images, 4)
    assert patches.shape == (2, 64, 48)
    assert torch.equal(unpatchify(patches, 4, 3), images)
    # Token 1 is row 0, column 1 of the grid, flattened pixel by pixel with channels last.
    assert torch.equal(patches[:, 1], images[:, :, 0:4, 4:8].permute(0, 2, 3, 1).flatten(1))
    # The patch embedding is a linear map of exactly these vectors, in embed's token order.
    encoder = _build("vit-tiny").eval()
    weight = encoder.patch_embed.weight.permute(0, 2, 3, 1).flatten(1)  # (dim, p * p * C)
    with torch.no_grad():
        projected = patches @ weight.T + encoder.patch_embed.bias
        torch.testing.assert_close(encoder.embed(images) - encoder.pos_embed[:, 1:], projected)


def test_invalid_configs_raise_naming_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"out_dim 128 .* 512"):
        build_encoder({"arch": "resnet18", "in_channels": 3, "image_size": 32, "out_dim": 128})
    with pytest.raises(ValueError, match=r"out_dim 512 .* 2048"):
        build_encoder({"arch": "resnet50", "in_channels": 3, "image_size": 32, "out_dim": 512})
    with pytest.raises(ValueError, match="stem 'tiny'"):
        _build("resnet18", stem="tiny")
    with pytest.raises(ValueError, match=r"out_dim 128 .* 192"):
        build_encoder({"arch": "vit-tiny", "in_channels": 3, "image_size": 32, "out_dim": 128})
    with pytest.raises(ValueError, match="image_size 30 .* patch_size 4"):
        _build("vit-small", image_size=30)


@pytest.mark.parametrize(
    ("arch", "options"),
    [("resnet18", {"stem": "cifar"}), ("resnet50", {"stem": "imagenet"}), ("vit-tiny", {})],
)
def test_channels_last_matches_contiguous(arch: str, options: dict) -> None:
    torch.manual_seed(0)
    encoder = _build(arch, **options)
    images = torch.randn(4, 3, 32, 32)
    _train_step(encoder, images)
    with torch.no_grad():
        expected = encoder(images)
        features = encoder(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("arch", "options"),
    [("resnet18", {"stem": "cifar"}), ("resnet50", {"stem": "imagenet"}), ("vit-tiny", {})],
)
def test_save_and_load_round_trip(tmp_path: Path, arch: str, options: dict) -> None:
    torch.manual_seed(0)
    encoder = _build(arch, in_channels=1, image_size=16, **options)
    images = torch.randn(4, 1, 16, 16)
    _train_step(encoder, images)
    save_encoder(tmp_path / "encoder", encoder)
    loaded = load_encoder_dir(tmp_path)
    assert loaded.config == encoder.config and not loaded.training
    with torch.no_grad():
        expected = encoder(images)
        assert torch.equal(loaded(images), expected)
        # A fresh build of the same config differs: the weights really came from the file.
        assert not torch.allclose(_build(arch, 1, 16, **options).eval()(images), expected)


def test_backbones_load_through_workers_encoders_alone() -> None:
    code = "from workers.encoders import ARCHITECTURES; print(sorted(ARCHITECTURES))"
    root = Path(__file__).resolve().parents[1]
    output = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    for arch in WIDTHS:
        assert f"'{arch}'" in output
