"""DINO (Caron et al. 2021): self-distillation with no labels. A student (backbone + DINO
head) matches, on every crop, the distribution of an EMA teacher on the other global crops:

    loss = 1/(2(V - 1)) * sum_{i in {1, 2}} sum_{j != i} H(P_t(x_i), P_s(x_j))
    P_t(x) = softmax((g_t(x) - c) / tau_t),   P_s(x) = softmax(g_s(x) / tau_s)

over 2 global crops and V - 2 local ones (``workers.losses.dino_loss``). Collapse is avoided
by centring (c, a running mean of the teacher's outputs) and sharpening (tau_t < tau_s).
Teacher: g_t <- m g_t + (1 - m) g_s after each optimizer step, m cosine from ``momentum`` to 1.
Centre: c <- m_c c + (1 - m_c) mean of the teacher's outputs over the *global* batch.

Distributed: the loss is a per-sample mean, so DDP's gradient average is the global batch's
(equal local batches); the batch mean of the teacher's outputs is all-reduced over ranks
before the centre moves, so every rank holds the same centre. The centre is a buffer that DDP
leaves alone (as MoCo's queue): broadcasting rank 0's copy would hide a rank whose own went
wrong. Schedules read only ``Batch.step``, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from functools import lru_cache
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.parametrizations import weight_norm

from pipelines.params import DINOParams
from workers import dist
from workers.augment import Augment, build_crop_augment
from workers.losses import dino_loss
from workers.methods.base import Batch, Method, MethodContext, register_method
from workers.methods.moco import momentum_update
from workers.optim import cosine_momentum

LOCAL_MIN_SCALE = 0.05  # the smallest local crop's fraction of the image, as in the paper


class DINOHead(nn.Module):
    """3-layer MLP with GELU to a bottleneck, L2 normalisation, then a weight-normalised
    linear to K prototypes whose norms are fixed to 1 (the paper's ``norm_last_layer``);
    ``batchnorm``: BatchNorm after each hidden linear (the paper code's ``use_bn_in_head``).
    Shapes: (B, in_dim) -> (B, K)."""

    def __init__(
        self, in_dim: int, hidden_dim: int, bottleneck_dim: int, prototypes: int, batchnorm: bool
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in (in_dim, hidden_dim):
            layers.append(nn.Linear(width, hidden_dim))
            layers.extend([nn.BatchNorm1d(hidden_dim)] if batchnorm else [])
            layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, prototypes, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0  # g, (K, 1)
        magnitude.data.fill_(1.0)
        magnitude.requires_grad_(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(features), dim=-1))


@lru_cache(maxsize=16)
def _crop_augments(
    preset: str, side: int, local_side: int, split: float, seed: int, rank: int
) -> tuple[Augment, Augment]:
    """The global and the local crop augmentations of one rank (built once, not per step)."""
    return (
        build_crop_augment(preset, side, (split, 1.0), seed, rank),
        build_crop_augment(preset, local_side, (LOCAL_MIN_SCALE, split), seed, rank),
    )


class MultiCrop:
    """Two global crops at the image's side from (split, 1] of its area, then ``count``
    local crops at ``local_size`` pixels from (0.05, split], each followed by the preset's
    other transforms; views 0 and 1 are global, 2.. local, seeded per (seed, rank, step, view)
    as ``Batch.view`` is. A plain callable, not a module, so tests can swap in their own."""

    def __init__(
        self, preset: str, count: int, local_size: int, split: float, patch_size: int
    ) -> None:
        self.preset, self.count, self.split = preset, count, split
        self.local_size, self.patch_size = local_size, patch_size

    def local_side(self, side: int) -> int:
        """``local_size``, or (0) half the side in whole patches, at least one patch."""
        if self.local_size:
            return self.local_size
        return max(self.patch_size, side // 2 // self.patch_size * self.patch_size)

    def __call__(self, batch: Batch) -> list[torch.Tensor]:
        side = batch.images.shape[-1]
        augments = _crop_augments(
            self.preset, side, self.local_side(side), self.split, batch.seed, dist.rank()
        )
        views = range(2 + self.count)
        return [augments[view >= 2](batch.images, batch.step, view) for view in views]


Crops = Callable[[Batch], list[torch.Tensor]]  # batch -> 2 global crops, then the local ones


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """tau_t at ``step``: linear from ``start`` at step 0 to ``end`` at ``warmup_steps``,
    then ``end``."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


@register_method(DINOParams)
class DINO(Method):
    def __init__(self, params: DINOParams, context: MethodContext) -> None:
        super().__init__()
        self.params = params
        self.backbone = context.backbone
        self.head = DINOHead(
            context.feature_dim,
            params.hidden_dim,
            params.bottleneck_dim,
            params.prototypes,
            params.head_batchnorm,
        )
        self.teacher = nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.head))
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(params.prototypes))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ["center"])
        self.total_steps = context.total_steps
        self.warmup_steps = params.warmup_teacher_epochs * context.steps_per_epoch
        self.crops: Crops = MultiCrop(
            context.augment_preset,
            params.local_crops,
            params.local_crop_size,
            params.crop_scale_split,
            getattr(self.backbone, "patch_size", 1),  # ViTs: local crops in whole patches
        )
        self._update: tuple[float, torch.Tensor] | None = None  # (momentum, batch centre)

    def _student_parameters(self) -> Iterator[nn.Parameter]:
        return chain(self.backbone.parameters(), self.head.parameters())

    def momentum_at(self, step: int) -> float:
        if self.params.momentum_schedule == "cosine":
            return cosine_momentum(step, self.total_steps, self.params.momentum)
        return self.params.momentum

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        crops = self.crops(batch)  # 2 x (n, C, S, S), then (V - 2) x (n, C, s, s)
        n, views = len(batch.images), len(crops)
        # One backbone pass per resolution (the paper's): a batch needs one crop size.
        features = [self.backbone(torch.cat(crops[:2]))]
        if views > 2:
            features.append(self.backbone(torch.cat(crops[2:])))
        student = self.head(torch.cat(features)).view(views, n, -1)  # (V, n, K)
        with torch.no_grad():
            teacher = self.teacher(torch.cat(crops[:2])).view(2, n, -1)  # (2, n, K)
        tau_t = teacher_temperature(
            batch.step,
            self.warmup_steps,
            self.params.warmup_teacher_temperature,
            self.params.teacher_temperature,
        )
        loss = dino_loss(student, teacher, self.center, self.params.student_temperature, tau_t)
        with torch.no_grad():
            targets = F.softmax((teacher - self.center) / tau_t, dim=-1)
            # One all-reduce for both global-batch means: the outputs' and the targets'.
            means = torch.stack([teacher.flatten(0, 1).mean(0), targets.flatten(0, 1).mean(0)])
            batch_center, mean_target = dist.all_reduce_mean(means.float())  # (K,) each
        momentum = self.momentum_at(batch.step)
        self._update = (momentum, batch_center)
        return {
            "loss": loss,
            "teacher_temperature": torch.tensor(tau_t),
            "momentum": torch.tensor(momentum),
            # Collapse to one prototype drives it to 0; uniform targets give log K.
            "teacher_entropy": torch.special.entr(mean_target).sum(),
        }

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self._update is None:
            return
        momentum, batch_center = self._update
        momentum_update(self._student_parameters(), self.teacher.parameters(), momentum)
        rate = self.params.center_momentum
        self.center.mul_(rate).add_(batch_center, alpha=1.0 - rate)
        self._update = None

    def encoder(self) -> nn.Module:
        return self.backbone
