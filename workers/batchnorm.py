"""BatchNorm over the global batch (``train.sync_batchnorm``), on any device.

PyTorch's SyncBatchNorm refuses CPU tensors, and selfsup runs the same code on gloo and NCCL;
this one all-reduces each channel's sum and sum of squares (with gradient) through
``workers.dist``, so the statistics, the output and the gradients equal one BatchNorm over
the concatenated batch. In one process, or in eval mode, it is plain BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from workers import dist


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d whose training statistics are those of the global batch:

        mean_c = (1/N) sum x_c,   var_c = (1/N) sum x_c^2 - mean_c^2,
        y = weight_c * (x - mean_c) / sqrt(var_c + eps) + bias_c

    with sums and N over every rank's samples (and positions, for images). The running
    variance takes the unbiased var_c * N / (N - 1), as BatchNorm's does."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected 2-D to 4-D input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or dist.world_size() == 1:
            return super().forward(input)
        # Statistics of 16-bit activations (autocast) in float32; float64 stays float64.
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        total = dist.all_reduce_sum_with_grad(torch.cat([x.sum(dims), (x * x).sum(dims)]))
        n = dist.all_reduce_sum_with_grad(count)  # no gradient flows into a constant
        mean, square = (total / n).chunk(2)
        var = square - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None: BatchNorm's cumulative average over the batches seen.
                momentum = self.momentum or 1.0 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), momentum)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d under ``module`` (in place) by a GlobalBatchNorm holding
    the same parameters and running statistics; returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d | nn.BatchNorm2d):
            like = child.weight if child.affine else child.running_mean  # dtype, device
            replacement = GlobalBatchNorm(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
                **({"device": like.device, "dtype": like.dtype} if like is not None else {}),
            )
            replacement.load_state_dict(child.state_dict())
            # A frozen copy (an EMA target, a key encoder) stays frozen.
            if child.affine:
                replacement.requires_grad_(child.weight.requires_grad)
            setattr(module, name, replacement)
        else:
            convert_to_global_batchnorm(child)
    return module
