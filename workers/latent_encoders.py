"""Encoders of the regularized latent-variable family, registered by arch name like any other:
each is its config plus tensors, so ``selfsup.load_encoder`` rebuilds it without pickle.

Every constructor draws a random initial state (the random-encoder baseline of evaluation);
training then writes the learned dictionary, prototypes or weights into it.
Inputs are images (n, C, H, W) or vectors (n, D); all but the convolutional coder flatten them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from workers.encoders import build_encoder, register_encoder
from workers.sparse import (
    Solution,
    dense_operators,
    lipschitz_constant,
    normalize_columns_,
    soft_threshold,
    solve,
    solve_dense,
)


def flat_dim(config: dict) -> int:
    """D of one flattened sample, from a backbone config (a vector is a 1x1 image)."""
    return config["in_channels"] * config["image_size"] ** 2


def sample_shape(config: dict) -> tuple[int, ...]:
    """One sample's shape from a backbone config: (D,) for vectors, (C, H, W) for images."""
    size = config["image_size"]
    return (config["in_channels"],) if size == 1 else (config["in_channels"], size, size)


@register_encoder("prototypes")
class Prototypes(nn.Module):
    """k-means: Euclidean distances to the K prototypes. (n, D) -> (n, K)."""

    def __init__(self, input_dim: int, clusters: int) -> None:
        super().__init__()
        self.register_buffer("prototypes", torch.randn(clusters, input_dim))  # (K, D)

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        return torch.cdist(samples.flatten(1), self.prototypes)


@register_encoder("projection")
class Projection(nn.Module):
    """PCA: coordinates on the principal axes, z = C (y - mean). (n, D) -> (n, components)."""

    def __init__(self, input_dim: int, components: int) -> None:
        super().__init__()
        random_axes = torch.linalg.qr(torch.randn(input_dim, components)).Q.T
        self.register_buffer("mean", torch.zeros(input_dim))  # (D,)
        self.register_buffer("components", random_axes.contiguous())  # (components, D), rows

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        return (samples.flatten(1) - self.mean) @ self.components.T


@register_encoder("sparse-coder")
class SparseCoder(nn.Module):
    """Sparse coding's inference as a module: z* = argmin ||y - W z||^2 + lam |z|_1 by FISTA
    (ISTA if not ``accelerated``) with the learned dictionary W. (n, D) -> (n, atoms)."""

    def __init__(
        self, input_dim: int, atoms: int, lam: float, tol: float, max_iter: int, accelerated: bool
    ) -> None:
        super().__init__()
        self.lam, self.tol, self.max_iter, self.accelerated = lam, tol, max_iter, accelerated
        self.dictionary = nn.Parameter(torch.randn(input_dim, atoms))  # W (D, atoms), columns
        normalize_columns_(self.dictionary, dim=1)

    def infer(self, samples: torch.Tensor) -> Solution:
        return solve_dense(
            samples.flatten(1),
            self.dictionary.detach(),
            self.lam,
            self.tol,
            self.max_iter,
            self.accelerated,
        )

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        return self.infer(samples).codes


@register_encoder("conv-sparse-coder")
class ConvSparseCoder(nn.Module):
    """Convolutional sparse coding's inference: feature maps z_k (same size as the image)
    minimising ||y - sum_k K_k * z_k||^2 + lam sum_k |z_k|_1 by convolutional FISTA; the
    features are the maps average-pooled to a ``pool`` x ``pool`` grid.
    (n, C, H, W) -> (n, kernels * pool * pool)."""

    def __init__(
        self,
        in_channels: int,
        kernels: int,
        kernel_size: int,
        lam: float,
        tol: float,
        max_iter: int,
        pool: int,
    ) -> None:
        super().__init__()
        self.lam, self.tol, self.max_iter, self.pool = lam, tol, max_iter, pool
        self.padding = kernel_size // 2  # odd kernels: maps and image have the same size
        self.kernels = nn.Parameter(torch.randn(kernels, in_channels, kernel_size, kernel_size))
        normalize_columns_(self.kernels, dim=0)

    def reconstruct(self, maps: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """sum_k K_k * z_k: maps (n, k, H, W) -> images (n, C, H, W)."""
        return F.conv_transpose2d(maps, kernels, padding=self.padding)

    def infer(self, images: torch.Tensor) -> Solution:
        kernels = self.kernels.detach()
        forward = lambda maps: self.reconstruct(maps, kernels)  # noqa: E731
        adjoint = lambda residual: F.conv2d(residual, kernels, padding=self.padding)  # noqa: E731
        shape = (1, kernels.shape[0], *images.shape[-2:])
        return solve(images, forward, adjoint, shape, self.lam, self.tol, self.max_iter)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.infer(images).codes, self.pool).flatten(1)


@register_encoder("lista")
class LISTA(nn.Module):
    """LISTA (Gregor & LeCun 2010): ISTA unrolled into ``layers`` layers with learned
    matrices, step sizes and thresholds:

        z_t = shrink(x_{t-1} + gamma_t (B_t y - G_t x_{t-1}), theta_t),   x_0 = z_0 = 0,

    with x_t = z_t; i.e. z_t = shrink(gamma_t B_t y + S_t x_{t-1}) with S_t = I - gamma_t G_t,
    the paper's form. The step gamma_t is redundant with B_t and G_t, but one number per
    layer lets Adam lengthen a whole step at once (later layers gain from steps longer than
    1/L, Ablin et al. 2019), which entry-by-entry updates of S_t find slowly. ``tied``: one
    (B, G, gamma, theta) shared by all layers, the recurrent form; untied: one per layer.
    ``momentum``: FISTA unrolled instead (a learned FISTA), x_t = z_t + beta_t (z_t - z_{t-1})
    with a learned beta_t per layer. (n, D) -> (n, atoms)."""

    def __init__(
        self,
        input_dim: int,
        atoms: int,
        layers: int,
        tied: bool,
        lam: float,
        momentum: bool = False,
    ) -> None:
        super().__init__()
        self.layers, self.tied = layers, tied
        copies = 1 if tied else layers
        self.filters = nn.Parameter(torch.empty(copies, atoms, input_dim))  # B_t (atoms, D)
        self.inhibition = nn.Parameter(torch.empty(copies, atoms, atoms))  # G_t (atoms, atoms)
        self.steps = nn.Parameter(torch.ones(copies))  # gamma_t
        self.thresholds = nn.Parameter(torch.empty(copies, atoms))  # theta_t (atoms,)
        # beta_t after layer t = 1 .. T-1 (the last layer's would go unused); per layer even
        # when tied, as FISTA's own coefficients change from step to step.
        self.betas = nn.Parameter(torch.empty(layers - 1)) if momentum else None
        dictionary = torch.randn(input_dim, atoms)
        normalize_columns_(dictionary, dim=1)
        self.start_from_ista(dictionary, lam)

    @torch.no_grad()
    def start_from_ista(self, dictionary: torch.Tensor, lam: float) -> None:
        """Set every layer to one ISTA step on ``dictionary`` W (D, atoms): B = (2/L) W^T,
        G = (2/L) W^T W, gamma = 1, theta = lam / L, and beta_t to FISTA's (s_{t-1} - 1) / s_t with
        s_0 = 1, s_t = (1 + sqrt(1 + 4 s_{t-1}^2)) / 2; then T layers compute T ISTA (with
        ``momentum``: FISTA) iterations."""
        forward, adjoint = dense_operators(dictionary)
        lipschitz = lipschitz_constant(forward, adjoint, (1, dictionary.shape[1]), dictionary)
        self.filters.copy_((2.0 / lipschitz) * dictionary.T)
        self.inhibition.copy_((2.0 / lipschitz) * dictionary.T @ dictionary)
        self.steps.fill_(1.0)
        self.thresholds.fill_(lam / lipschitz)
        if self.betas is not None:
            step = 1.0
            for layer in range(self.layers - 1):
                following = (1.0 + math.sqrt(1.0 + 4.0 * step * step)) / 2.0
                self.betas[layer] = (step - 1.0) / following
                step = following

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        y = samples.flatten(1)
        codes = point = None
        for layer in range(self.layers):
            copy = 0 if self.tied else layer
            drive = y @ self.filters[copy].T
            if point is not None:
                drive = point + self.steps[copy] * (drive - point @ self.inhibition[copy].T)
            else:
                drive = self.steps[copy] * drive
            # A threshold below 0 would grow every code instead of shrinking it.
            new = soft_threshold(drive, self.thresholds[copy].clamp_min(0))
            if self.betas is not None and layer < self.layers - 1:
                point = new + self.betas[layer] * (new if codes is None else new - codes)
            else:
                point = new
            codes = new
        return codes


@register_encoder("gaussian")
class GaussianEncoder(nn.Module):
    """A VAE's encoder q(z|y) = N(mean(y), diag(exp(log_var(y)))) on top of a backbone; as an
    encoder it returns the mean. (n, ...) -> (n, latent_dim)."""

    def __init__(self, backbone: dict, latent_dim: int) -> None:
        super().__init__()
        self.backbone = build_encoder(backbone)
        self.mean = nn.Linear(backbone["out_dim"], latent_dim)
        self.log_var = nn.Linear(backbone["out_dim"], latent_dim)

    def distribution(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(samples)
        return self.mean(features), self.log_var(features)

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        return self.mean(self.backbone(samples))


@register_encoder("rbm-hidden")
class RBMHidden(nn.Module):
    """An RBM's hidden units as features: p(z = 1 | y) = sigmoid(W y + c). (n, V) -> (n, H)."""

    def __init__(self, visible: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.01 * torch.randn(hidden, visible))  # W (H, V)
        self.hidden_bias = nn.Parameter(torch.zeros(hidden))  # c (H,)

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(samples.flatten(1) @ self.weight.T + self.hidden_bias)
