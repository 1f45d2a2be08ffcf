"""PIRL (Misra & van der Maaten 2019): the representation of an image I should not change
when I is cut into a 3x3 jigsaw and shuffled (I^t). Negatives come from a memory bank with
one entry per training image.

- f: backbone -> projection head, on the image: f(v_I);
- g: backbone on each of the 9 patches (the same backbone) -> projection head per patch ->
  concatenated in the shuffled order -> linear head: g(v_I^t);
- the projection heads are fc-BN-ReLU-fc where the paper has linear maps: with linear heads
  the small convnet's first embeddings all point one way, the bank fills with copies of one
  vector and the loss stalls at chance (docs/results-contrastive.md);
- loss = lambda * L(m_I, g(v_I^t)) + (1 - lambda) * L(m_I, f(v_I)), where L is InfoNCE
  (the softmax form of NCE) of the query against the positive m_I (I's bank entry) and
  ``num_negatives`` bank entries drawn uniformly;
- the bank, after each optimizer step, with the global batch's f(v_I) and indices:
  m_i <- normalize(bank_momentum * m_i + (1 - bank_momentum) * f(v_i)).
  ``bank_momentum`` is the weight kept on the *old* entry (0 replaces it outright).

The bank is a buffer (in the checkpoint) that DDP leaves alone: every rank applies the same
gathered update, so every rank holds the same bank without broadcasting it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipelines.params import PIRLParams
from workers import dist
from workers.losses import info_nce_loss
from workers.methods.base import Batch, Method, MethodContext, register_method
from workers.methods.simclr import projection_head

GRID = 3  # jigsaw of GRID x GRID patches


def jigsaw(images: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Cut each image into a 3x3 grid of patches and shuffle them: image i's patches in the
    order ``orders[i]`` (a permutation of 0..8, grid cells numbered row by row).

    Patches have side H // 2 and overlap (stride (H - side) // 2), so that the grid covers the
    image even at 8x8, where 3 does not divide the side. (n, C, H, W) -> (n, 9, C, s, s).
    """
    n, channels, height, width = images.shape
    side_h, side_w = height // 2, width // 2
    stride_h, stride_w = max(1, (height - side_h) // 2), max(1, (width - side_w) // 2)
    patches = images.unfold(2, side_h, stride_h).unfold(3, side_w, stride_w)  # (n,C,gh,gw,s,s)
    patches = patches[:, :, :GRID, :GRID].permute(0, 2, 3, 1, 4, 5)  # (n, 3, 3, C, s, s)
    patches = patches.reshape(n, GRID * GRID, channels, side_h, side_w)
    return patches[torch.arange(n, device=images.device)[:, None], orders.to(images.device)]


@torch.no_grad()
def update_bank(
    bank: torch.Tensor, indices: torch.Tensor, embeddings: torch.Tensor, momentum: float
) -> None:
    """m_i <- normalize(momentum * m_i + (1 - momentum) * e_i) for each index i in ``indices``.

    An index present more than once (the distributed sampler pads the last round with
    repeated samples) gets one update with the mean of its embeddings, whatever the order:
    never two momentum steps, never a race between writes. O(batch).
    Shapes: bank (N, d); indices (b,); embeddings (b, d) unit rows.
    """
    unique, inverse = torch.unique(indices, return_inverse=True)  # (u,), (b,)
    sums = torch.zeros(len(unique), bank.shape[1], device=bank.device, dtype=bank.dtype)
    sums.index_add_(0, inverse, embeddings.to(bank.dtype))  # autocast's bf16/fp16 too
    counts = torch.bincount(inverse, minlength=len(unique)).unsqueeze(1)  # (u, 1)
    mixed = momentum * bank[unique] + (1.0 - momentum) * (sums / counts)
    bank[unique] = F.normalize(mixed, dim=1)


@register_method(PIRLParams)
class PIRL(Method):
    def __init__(self, params: PIRLParams, context: MethodContext) -> None:
        super().__init__()
        self.backbone = context.backbone
        self.image_head = projection_head(
            context.feature_dim, params.hidden_dim, params.projection_dim
        )  # f
        self.patch_head = projection_head(
            context.feature_dim, params.hidden_dim, params.projection_dim
        )  # g, per patch
        self.jigsaw_head = nn.Linear(
            GRID * GRID * params.projection_dim, params.projection_dim
        )  # g, joint
        self.temperature, self.num_negatives = params.temperature, params.num_negatives
        self.bank_momentum, self.loss_lambda = params.bank_momentum, params.loss_lambda
        self.register_buffer(
            "bank", F.normalize(torch.randn(context.num_samples, params.projection_dim), dim=1)
        )
        # DDP would otherwise broadcast rank 0's bank at every forward: O(N) traffic per step.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ["bank"])
        self._bank_update: tuple[torch.Tensor, torch.Tensor] | None = None  # set by forward

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        # Seeded by the step: the same draws on every rank and on resume. The permutations are
        # drawn for the whole global batch, so a sample's jigsaw does not depend on how the
        # batch is split over ranks, and the negatives' draw comes out the same on every rank.
        generator = torch.Generator().manual_seed(batch.step)
        n, rank = len(batch.images), dist.rank()
        orders = torch.rand(n * dist.world_size(), GRID * GRID, generator=generator).argsort(dim=1)
        image = F.normalize(self.image_head(self.backbone(batch.view(0))), dim=1)  # (n, d)
        patches = jigsaw(batch.view(1), orders[rank * n : (rank + 1) * n])  # (n, 9, C, s, s)
        patch_features = self.patch_head(self.backbone(patches.flatten(0, 1)))  # (9n, d)
        transformed = self.jigsaw_head(patch_features.reshape(n, -1))  # (n, d)

        drawn = torch.randint(len(self.bank), (self.num_negatives,), generator=generator)
        negatives = self.bank[drawn.to(self.bank.device)]  # (K, d)
        positive = self.bank[batch.indices]  # (n, d)
        jigsaw_loss = info_nce_loss(transformed, positive, negatives, self.temperature)
        image_loss = info_nce_loss(image, positive, negatives, self.temperature)
        self._bank_update = (dist.gather(batch.indices), dist.gather(image.detach()))
        return {
            "loss": self.loss_lambda * jigsaw_loss + (1.0 - self.loss_lambda) * image_loss,
            "jigsaw_loss": jigsaw_loss.detach(),
            "image_loss": image_loss.detach(),
        }

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self._bank_update is not None:
            update_bank(self.bank, *self._bank_update, self.bank_momentum)
            self._bank_update = None

    def encoder(self) -> nn.Module:
        return self.backbone
