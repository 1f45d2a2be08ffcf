"""Masked autoencoder (He et al. 2022): hide a random 75% of an image's patches, encode the
visible ones with the ViT (no mask tokens in the encoder), and let a small transformer decoder
reconstruct every patch from the encoded ones plus a shared mask token at each hidden place.

    loss = sum_{i, j} m_ij * mean_k (pred_ijk - t_ijk)^2 / sum_{i, j} m_ij

over the masked patches only (m_ij = 1), with t the patch's pixels, or with ``norm_pix_loss``
the patch normalised by its own mean and variance (``normalise_patches``).

Distributed convention: the loss is per sample, so nothing is gathered. Each rank masks its own
images with noise from ``batch.generator()`` (seeded by seed, rank and step: ranks draw
different masks, a resumed run the same ones); every sample masks round(ratio * N) patches and
every rank holds the same share of the global batch, so DDP's gradient average is the gradient
of the global batch's loss.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipelines.params import MAEParams
from workers.figures import stacked_grid
from workers.losses import masked_patch_mse
from workers.methods.base import Batch, Method, MethodContext, register_method
from workers.vit import (
    Block,
    VisionTransformer,
    initialise_linears_and_norms,
    patchify,
    unpatchify,
)


def random_masking(
    batch_size: int, num_patches: int, mask_ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's per-sample shuffle: argsort uniform noise and keep the first
    N - round(ratio * N) patches. Returns ``keep`` (n, N - masked) patch indices, ascending,
    and ``mask`` (n, N) bool, True where hidden."""
    noise = torch.rand(batch_size, num_patches, generator=generator, device=generator.device)
    masked = round(mask_ratio * num_patches)
    keep = noise.argsort(dim=1)[:, : num_patches - masked].sort(dim=1).values
    mask = torch.ones(batch_size, num_patches, dtype=torch.bool, device=noise.device)
    return keep, mask.scatter(1, keep, False)


def normalise_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm-pix target: (x - mean) / sqrt(var + eps) over each patch's p * p * C values
    (unbiased variance, as the paper's code). (..., D) -> (..., D)."""
    mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def sincos_position_table(dim: int, grid: int) -> torch.Tensor:
    """(grid * grid, dim) fixed 2-D sine-cosine position embeddings in raster order: half of
    the channels encode the column, half the row, each as sin and cos of pos * 10000^(-k/K)
    for K = dim / 4 frequencies (MAE's decoder table)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (K,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def axis(position: torch.Tensor) -> torch.Tensor:
        angles = position.flatten().double()[:, None] * omega  # (grid * grid, K)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()


@register_method(MAEParams)
class MAE(Method):
    def __init__(self, params: MAEParams, context: MethodContext) -> None:
        super().__init__()
        if not isinstance(context.backbone, VisionTransformer):
            raise ValueError("mae needs a ViT encoder (vit-tiny, vit-small)")
        self.backbone: VisionTransformer = context.backbone
        self.mask_ratio, self.norm_pix_loss = params.mask_ratio, params.norm_pix_loss
        self.channels = self.backbone.patch_embed.in_channels
        width, patch = params.decoder_dim, self.backbone.patch_size
        self.decoder_embed = nn.Linear(self.backbone.dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_blocks = nn.Sequential(
            *(Block(width, params.decoder_heads) for _ in range(params.decoder_depth))
        )
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.decoder_pred = nn.Linear(width, patch * patch * self.channels)
        # CLS first, at position 0 of the table (as the paper). Fixed: recomputed, not stored.
        table = sincos_position_table(width, self.backbone.grid)
        table = torch.cat([torch.zeros(1, width), table])[None]  # (1, 1 + N, width)
        self.register_buffer("decoder_pos_embed", table, persistent=False)
        # The paper's (and the ViT's) initialisation for the decoder's weights.
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_pred):
            initialise_linears_and_norms(module)

    def reconstruct(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, C, H, W) -> predicted patches (n, N, p * p * C) and the mask (n, N)."""
        tokens = self.backbone.embed(images)  # (n, N, dim), position embeddings added
        n, count, dim = tokens.shape
        keep, mask = random_masking(n, count, self.mask_ratio, generator)
        visible = tokens.gather(1, keep[..., None].expand(-1, -1, dim))  # (n, n_keep, dim)
        latent = self.decoder_embed(self.backbone.encode(visible))  # (n, 1 + n_keep, width)
        width = latent.shape[-1]
        # Every place starts as the mask token; the visible places get their encoded tokens.
        # In the latent's dtype: under autocast the linear layers give bf16 or fp16.
        places = self.mask_token.to(latent.dtype).expand(n, count, width)
        places = places.scatter(1, keep[..., None].expand(-1, -1, width), latent[:, 1:])
        decoded = torch.cat([latent[:, :1], places], dim=1) + self.decoder_pos_embed
        decoded = self.decoder_norm(self.decoder_blocks(decoded))
        return self.decoder_pred(decoded[:, 1:]), mask  # CLS dropped

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) -> (n, N, p * p * C): what the decoder predicts."""
        patches = patchify(images, self.backbone.patch_size)
        return normalise_patches(patches) if self.norm_pix_loss else patches

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        images = batch.view(0)  # (n, C, H, W): the paper trains on one random resized crop
        pred, mask = self.reconstruct(images, batch.generator())
        loss = masked_patch_mse(pred, self.target(images), mask)
        return {"loss": loss, "mask_fraction": mask.float().mean().detach()}

    def encoder(self) -> nn.Module:
        return self.backbone

    @torch.no_grad()
    def figures(self, data: torch.Tensor) -> dict[str, np.ndarray]:
        """Rows of images, their visible patches (hidden ones grey) and the reconstruction:
        predictions at the hidden patches (mapped back to pixels with each patch's own mean
        and variance under norm_pix_loss), the input at the visible ones."""
        images, patch = data[:32], self.backbone.patch_size
        pred, mask = self.reconstruct(images, torch.Generator(data.device).manual_seed(0))
        patches = patchify(images, patch)  # (n, N, D)
        if self.norm_pix_loss:
            mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        hidden = mask[..., None]  # (n, N, 1)
        grey = torch.full_like(patches, 0.5 * float(images.min() + images.max()))
        masked = unpatchify(torch.where(hidden, grey, patches), patch, self.channels)
        pasted = unpatchify(torch.where(hidden, pred, patches), patch, self.channels)
        return {"reconstructions.png": stacked_grid([images, masked, pasted])}
