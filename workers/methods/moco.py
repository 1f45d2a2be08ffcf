"""MoCo v2 (He et al. 2019; Chen et al. 2020): a query encoder trained by gradient, a key
encoder that is its exponential moving average, and a FIFO queue of K past keys as negatives.

Distributed details, all exact (tests/test_contrastive_dist.py):
- the keys of the *global* batch are gathered before they are enqueued, so every rank holds
  the same queue; the queue and its pointer are buffers (in the checkpoint) that DDP leaves
  alone, so no rank's copy is ever overwritten by another's;
- shuffled BatchNorm: the key encoder sees the global batch in a permuted order split over
  the ranks, so a sample's key is not normalised with the statistics of its own query's
  sub-batch (a no-op at one worker);
- the key encoder is updated once per optimizer step, after it; so is the queue.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipelines.params import MoCoParams
from workers import dist
from workers.losses import info_nce_loss
from workers.methods.base import Batch, Method, MethodContext, register_method
from workers.methods.simclr import projection_head


@torch.no_grad()
def momentum_update(
    online: Iterable[torch.Tensor], target: Iterable[torch.Tensor], momentum: float
) -> None:
    """target <- momentum * target + (1 - momentum) * online, tensor by tensor."""
    for source, average in zip(online, target, strict=True):
        average.mul_(momentum).add_(source, alpha=1.0 - momentum)


@torch.no_grad()
def enqueue(queue: torch.Tensor, pointer: torch.Tensor, keys: torch.Tensor) -> None:
    """Write ``keys`` (n, d) into the ring buffer ``queue`` (K, d) from ``pointer`` on,
    wrapping around, and advance the pointer: O(n), and correct for any n <= K, so a batch
    shorter than the others cannot leave a stale gap or run past the end."""
    slots = (pointer + torch.arange(len(keys), device=queue.device)) % len(queue)  # (n,)
    queue[slots] = keys.to(queue.dtype)  # keys made under autocast are bf16/fp16
    pointer.copy_((pointer + len(keys)) % len(queue))


@register_method(MoCoParams)
class MoCo(Method):
    def __init__(self, params: MoCoParams, context: MethodContext) -> None:
        super().__init__()
        self.backbone = context.backbone
        # fc-BN-ReLU-fc (SimCLR's head, as MoCo v3's) rather than MoCo v2's fc-ReLU-fc: without
        # BatchNorm the small convnet's first outputs all point one way (mean cosine 0.997), the
        # queue fills with near-identical keys and the loss stalls at log(K + 1).
        self.head = projection_head(context.feature_dim, params.hidden_dim, params.projection_dim)
        self.key_encoder = nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.head))
        self.key_encoder.requires_grad_(False)
        self.momentum, self.temperature = params.momentum, params.temperature
        queue = F.normalize(torch.randn(params.queue_size, params.projection_dim), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        # DDP would otherwise broadcast rank 0's queue at every forward: O(K) traffic per step,
        # and it would hide a rank whose own queue went wrong.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, ["queue", "queue_pointer"]
        )
        self._keys_to_enqueue: torch.Tensor | None = None  # (N, d), set by forward

    def _query_parameters(self) -> Iterator[nn.Parameter]:
        return chain(self.backbone.parameters(), self.head.parameters())

    @torch.no_grad()
    def _keys(self, images: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit keys of this rank's images (n, d) and of the global batch (N, d)."""
        if dist.world_size() == 1:
            keys = F.normalize(self.key_encoder(images), dim=1)
            return keys, keys
        local_n, rank = len(images), dist.rank()
        everyone = dist.gather(images)  # (N, C, H, W)
        # Seeded by the step, so every rank draws the same permutation and a resumed run too.
        order = torch.randperm(len(everyone), generator=torch.Generator().manual_seed(step))
        order = order.to(images.device)
        mine = order[rank * local_n : (rank + 1) * local_n]
        shuffled = dist.gather(F.normalize(self.key_encoder(everyone[mine]), dim=1))  # (N, d)
        keys = torch.empty_like(shuffled)
        keys[order] = shuffled  # back to the global batch's order
        return keys[rank * local_n : (rank + 1) * local_n], keys

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        query = self.head(self.backbone(batch.view(0)))  # (n, d)
        keys, global_keys = self._keys(batch.view(1), batch.step)  # (n, d), (N, d)
        self._keys_to_enqueue = global_keys
        return {"loss": info_nce_loss(query, keys, self.queue, self.temperature)}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        momentum_update(self._query_parameters(), self.key_encoder.parameters(), self.momentum)
        if self._keys_to_enqueue is not None:
            enqueue(self.queue, self.queue_pointer, self._keys_to_enqueue)
            self._keys_to_enqueue = None

    def encoder(self) -> nn.Module:
        return self.backbone
