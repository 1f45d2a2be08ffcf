"""Vision Transformers (Dosovitskiy et al. 2020) as registered encoders: ViT-tiny and ViT-small.

Pre-norm blocks, a learnable CLS token and learnable position embeddings (as timm and DINO;
DINO interpolates them for its local crops). The features are the CLS token after the final
norm. Besides ``forward``, ``embed`` and ``encode`` split the network where MAE needs it: MAE
embeds every patch, keeps a random subset and encodes only that.
Tokens are in raster order (row by row over the patch grid), as ``patchify`` orders patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.encoders import register_encoder


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p * p * C), patches in raster order, each flattened pixel by
    pixel with channels last (MAE's layout), so that ``unpatchify`` undoes it exactly."""
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    grid = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * cols, -1)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(B, N, p * p * C) -> (B, C, H, W) for a square grid of N patches: ``patchify``'s inverse."""
    batch, count, _ = patches.shape
    side = round(count**0.5)
    if side * side != count:
        raise ValueError(f"{count} patches do not form a square grid")
    grid = patches.reshape(batch, side, side, patch_size, patch_size, channels)
    return grid.permute(0, 5, 1, 3, 2, 4).reshape(
        batch, channels, side * patch_size, side * patch_size
    )


def initialise_linears_and_norms(root: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear under ``root``, 1/0 for every
    LayerNorm: the transformer initialisation of MAE and timm."""
    for module in root.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class Attention(nn.Module):
    """Multi-head self-attention: (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, count, dim = tokens.shape
        # (B, N, 3 * dim) -> 3 x (B, heads, N, dim / heads)
        qkv = self.qkv(tokens).reshape(batch, count, 3, self.heads, dim // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(query, key, value)
        return self.proj(mixed.transpose(1, 2).reshape(batch, count, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). (B, N, dim)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens))
        return tokens + self.mlp(self.norm2(tokens))


class VisionTransformer(nn.Module):
    """Patch embedding, CLS token, ``depth`` blocks, final norm. (B, C, H, W) -> (B, dim)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        out_dim: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
    ) -> None:
        super().__init__()
        if patch_size < 1 or image_size % patch_size != 0:
            raise ValueError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}"
            )
        if out_dim != dim:
            raise ValueError(f"out_dim {out_dim} must equal this ViT's width {dim}")
        self.dim = self.out_dim = dim
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.num_patches = self.grid**2
        # A conv with kernel = stride = p is a linear map of each flattened patch.
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))  # CLS first
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._initialise()

    def _initialise(self) -> None:
        """MAE's and timm's: trunc-normal 0.02 tokens, xavier-uniform linears (and the patch
        embedding seen as one), zero biases, LayerNorm 1/0."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.dim, -1))
        nn.init.zeros_(self.patch_embed.bias)
        initialise_linears_and_norms(self)

    def _patch_pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        """(1, rows * cols, dim): the patch position embeddings, bicubically resized from the
        trained grid when the input's grid differs (DINO's local crops)."""
        table = self.pos_embed[:, 1:]
        if (rows, cols) == (self.grid, self.grid):
            return table
        square = table.reshape(1, self.grid, self.grid, self.dim).permute(0, 3, 1, 2)
        resized = F.interpolate(square, size=(rows, cols), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(1, rows * cols, self.dim)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, dim): patch tokens plus their position embeddings, no CLS."""
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image {height}x{width} is not a multiple of patch_size {self.patch_size}"
            )
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, dim), raster
        return tokens + self._patch_pos_embed(height // self.patch_size, width // self.patch_size)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, n, dim) embedded tokens (any subset of ``embed``'s) -> (B, 1 + n, dim): CLS
        prepended, the blocks, the final norm."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return self.norm(self.blocks(torch.cat([cls, tokens], dim=1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, dim): the CLS token after the final norm."""
        return self.encode(self.embed(images))[:, 0]


@register_encoder("vit-tiny")
class ViTTiny(VisionTransformer):
    """ViT-tiny: width 192, 12 blocks, 3 heads. (B, C, H, W) -> (B, 192)."""

    def __init__(self, in_channels: int, image_size: int, out_dim: int, patch_size: int = 4):
        super().__init__(in_channels, image_size, out_dim, patch_size, dim=192, depth=12, heads=3)


@register_encoder("vit-small")
class ViTSmall(VisionTransformer):
    """ViT-small: width 384, 12 blocks, 6 heads. (B, C, H, W) -> (B, 384)."""

    def __init__(self, in_channels: int, image_size: int, out_dim: int, patch_size: int = 4):
        super().__init__(in_channels, image_size, out_dim, patch_size, dim=384, depth=12, heads=6)
