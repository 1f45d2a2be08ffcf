"""Convolutional sparse coding's kernels on whitened natural-image patches, learned with 1, 2,
4, 8 and 16 kernels: the picture series of docs/results-latent.md.

.venv/bin/python -m benchmarks.conv_kernels [--kernels 1 2 4 8 16] [--optimizer sgd]
    [--out docs/img/latent]

Each run is the ``conv_sparse_coding`` method's own step (convolutional FISTA for the maps,
a gradient step on the kernels with the maps fixed, kernels back to unit norm), in one
process, with the optimizer the train loop builds for ``train.optimizer: sgd`` (momentum 0.9).
The pictures are what the method's ``figures`` returns, i.e. what a job logs to MLflow.
``--optimizer adam`` reruns the same series with Adam, which is what the earlier pictures
used: Adam scales every kernel coefficient's step by that coefficient's own running gradient
size, so the weak, noisy coefficients away from a kernel's centre move as fast as the
informative ones, and after each renormalisation the kernels stay speckled.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from PIL import Image

from benchmarks.latent_common import train_method
from pipelines.params import ConvSparseCodingParams
from workers.data import load_dataset
from workers.encoders import build_encoder
from workers.methods import MethodContext
from workers.methods.conv_sparse_coding import ConvSparseCoding

# Whitened 16x16 patches: large enough for a 7x7 kernel to sit inside at several offsets,
# small enough that 200 steps of 16 kernels take well under two minutes on one core.
PATCH = {"size": 16, "count": 4000, "seed": 0, "whiten": True}
KERNEL_SIZE, LAM, TOL, MAX_ITER = 7, 1.0, 1e-3, 30
STEPS, BATCH = 200, 32
LEARNING_RATES = {"sgd": 5e-3, "adam": 2e-3}  # adam: the rate the earlier pictures used


def learn_kernels(patches: torch.Tensor, kernels: int, optimizer: str) -> ConvSparseCoding:
    torch.manual_seed(0)
    size = patches.shape[-1]
    backbone = build_encoder({"arch": "mlp", "in_channels": 1, "image_size": size, "out_dim": 1})
    params = ConvSparseCodingParams(
        name="conv_sparse_coding",
        kernels=kernels,
        kernel_size=KERNEL_SIZE,
        lam=LAM,
        tol=TOL,
        max_iter=MAX_ITER,
        pool=2,
    )
    method = ConvSparseCoding(
        params, MethodContext(backbone, feature_dim=1, num_samples=len(patches))
    )
    lr = LEARNING_RATES[optimizer]
    rule = (
        torch.optim.SGD(method.parameters(), lr=lr, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(method.parameters(), lr=lr)
    )
    start = time.perf_counter()
    outputs = train_method(method, rule, patches, STEPS, BATCH)
    print(
        f"{kernels:>7} | {optimizer} lr {lr:g} | {outputs['loss'].item():>10.2f} | "
        f"{outputs['active_fraction'].item():>13.3f} | {time.perf_counter() - start:>6.1f}",
        flush=True,
    )
    return method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--optimizer", choices=sorted(LEARNING_RATES), default="sgd")
    parser.add_argument("--out", type=Path, default=Path("docs/img/latent"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.1f}; {args.threads} thread(s)")
    patches = load_dataset("builtin:patches", PATCH).samples
    print(
        f"{len(patches)} whitened {PATCH['size']}x{PATCH['size']} patches; {KERNEL_SIZE}x"
        f"{KERNEL_SIZE} kernels, lam {LAM}, FISTA tol {TOL} / {MAX_ITER} iterations; "
        f"{STEPS} steps of {BATCH}"
    )
    print("kernels | optimizer | last batch's mean E | active fraction | time s")
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.optimizer == "sgd" else f"-{args.optimizer}"
    for kernels in args.kernels:
        method = learn_kernels(patches, kernels, args.optimizer)
        picture = method.figures(patches)["kernels.png"]
        path = args.out / f"conv-sparse-coding-patches-k{kernels}{suffix}-kernels.png"
        Image.fromarray(picture).save(path)


if __name__ == "__main__":
    main()
