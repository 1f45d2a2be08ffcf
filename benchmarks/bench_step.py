"""Images per second of selfsup's training step against a plain PyTorch loop, same device.

For SimCLR and BYOL with ResNet-18 (CIFAR stem) on colour 32x32 patches, the simclr
augmentations, at each precision asked for:

- selfsup: ``workers.step.build_training`` on the method's example spec moved to that
  setting, and ``Training.train_step`` (what the train loop runs: the method objects, the
  seeded augmentations, autocast per ``train.precision``, the divergence guard, the optimizer,
  the learning-rate schedule, ``after_optimizer_step``);
- reference: the same maths written here as a plain loop: the same ResNet-18
  (``build_encoder``), projection head, predictor and EMA target built in the same order from
  the same seed (so the initial weights are the same, which is checked), the kornia pipeline
  of the preset called directly, the loss functions of ``workers.losses``, a ``torch.optim``
  optimizer with the spec's settings and ``torch.autocast`` with the same dtype, and no
  Training, Batch or Method objects, no schedule object, no divergence guard.

Both train on one fixed batch already on the device (``--batch`` images, the first of the
patches), so no data loading is timed. After ``--warmup`` steps each they take turns step by
step (selfsup, reference, selfsup, ...), so a burst of other work on a shared machine slows
both alike; each step is timed alone, between ``torch.cuda.synchronize()`` calls on a GPU.
Images/s is the batch (images, not views) over the median wall time of a step; on the CPU
the table also gives the process's CPU time per step. The first warm-up step is a check:
the reference draws its views with the global RNG seeded as selfsup's augmentations seed
theirs, so both see the same views from the same weights, and the table gives both losses.

    .venv/bin/python -m benchmarks.bench_step [--batch 256] [--steps 30] [--warmup 5]
        [--precision fp32 bf16 fp16] [--channels-last] [--methods simclr byol] [--threads N]

It runs on ``cuda`` when there is one, else on the CPU (default batch 256 on a GPU, 32 on
the CPU). It prints a markdown table. On a CPU that other work shares, ``--threads 1``: with
as many torch threads as cores, every parallel region waits for whichever thread the other
work has descheduled, and a step's time says more about the load than about the step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from pipelines.spec import JobSpec, parse_spec, read_yaml
from workers.augment import _PRESETS
from workers.data import load_dataset
from workers.encoders import build_encoder
from workers.losses import byol_loss, nt_xent_loss
from workers.step import build_training

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
COMMAND = ".venv/bin/python -m benchmarks.bench_step"
METHODS = ("simclr", "byol")
PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PATCHES = {"size": 32, "channels": 3, "count": 2048}
EPOCHS = 1000  # the schedules (learning rate, BYOL's momentum) barely move over a benchmark


def step_spec(method: str, batch: int, precision: str, channels_last: bool) -> JobSpec:
    """examples/<method>-digits.yaml moved to ResNet-18 on colour 32x32 patches with the
    simclr augmentations: the example's method parameters, optimizer and learning rate."""
    document = read_yaml((EXAMPLES / f"{method}-digits.yaml").read_text())
    document["encoder"] = {"arch": "resnet18"}
    document["data"] = {"source": "builtin:patches", "patches": dict(PATCHES)}
    document["augment"] = {"preset": "simclr"}
    document["resources"]["workers"] = 1  # one process, the whole batch
    document["train"].update(
        batch_size=batch, epochs=EPOCHS, precision=precision, channels_last=channels_last
    )
    return parse_spec(document)


def shape(spec: JobSpec) -> tuple[int, int]:
    return spec.data.patches.channels, spec.data.patches.size


def steps_per_epoch(spec: JobSpec) -> int:
    return max(1, spec.data.patches.count // spec.train.batch_size)


def selfsup_step(
    spec: JobSpec, images: torch.Tensor, device: torch.device
) -> tuple[nn.Module, Callable[[], object]]:
    """selfsup's own set-up and step; returns the method (for the weight check) and the step."""
    count = spec.data.patches.count
    training = build_training(spec, shape(spec), count, steps_per_epoch(spec), device)
    training.model.train()
    indices = torch.arange(len(images), device=device)
    return training.method, lambda: training.train_step(images, indices)


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SimCLR's projection head and BYOL's projector and predictor: Linear-BN-ReLU-Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def _optimizer(spec: JobSpec, parameters: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    train = spec.train
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=train.lr, momentum=0.9, weight_decay=train.weight_decay
        )
    if train.optimizer not in _OPTIMIZERS:
        raise ValueError(f"the reference loop has no {train.optimizer!r} optimizer")
    return _OPTIMIZERS[train.optimizer](parameters, lr=train.lr, weight_decay=train.weight_decay)


def reference_step(
    spec: JobSpec, images: torch.Tensor, device: torch.device
) -> tuple[nn.Module, Callable[[], object]]:
    """The plain loop: returns every module it trains (in the method's registration order,
    for the weight check) and its step."""
    train, params = spec.train, spec.method
    channels, side = shape(spec)
    torch.manual_seed(train.seed)  # as build_training does, then the same modules in order
    backbone = build_encoder(spec.encoder.config(channels, side))
    width = spec.encoder.out_dim
    if params.name == "simclr":
        head = _mlp(width, params.hidden_dim, params.projection_dim)
        model = nn.ModuleList([backbone, head])
        trained = model.parameters
    else:
        projector = _mlp(width, params.hidden_dim, params.projection_dim)
        predictor = _mlp(params.projection_dim, params.predictor_hidden_dim, params.projection_dim)
        target = nn.Sequential(copy.deepcopy(backbone), copy.deepcopy(projector))
        target.requires_grad_(False)
        model = nn.ModuleList([backbone, projector, predictor, target])

        def trained() -> Iterator[nn.Parameter]:
            return chain(backbone.parameters(), projector.parameters(), predictor.parameters())

    channels_last = train.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device).train()
    optimizer = _optimizer(spec, trained())
    augment = _PRESETS[spec.augment.preset](side, None)  # the same kornia pipeline, unseeded
    dtype = DTYPES[train.precision]
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    total_steps = train.epochs * steps_per_epoch(spec)
    step = 0

    def two_views(x: torch.Tensor, seeded: bool) -> torch.Tensor:
        # seeded (the check step only): the global RNG seeded as selfsup's augmentations seed
        # theirs for (seed, rank 0, step, view), so that both draw the same views.
        views = []
        for view in (0, 1):
            if seeded:
                torch.manual_seed(hash((train.seed, 0, step, view)) & 0x7FFF_FFFF)
            views.append(augment(x))
        return torch.cat(views)

    def autocast() -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def backward_and_step(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    def simclr(seeded: bool = False) -> torch.Tensor:
        nonlocal step
        x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        with autocast():
            views = two_views(x, seeded)
            z_a, z_b = head(backbone(views)).chunk(2)
            loss = nt_xent_loss(z_a, z_b, params.temperature)
        backward_and_step(loss)
        step += 1
        return loss

    def byol(seeded: bool = False) -> torch.Tensor:
        nonlocal step
        x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        with autocast():
            views = two_views(x, seeded)
            p1, p2 = predictor(projector(backbone(views))).chunk(2)
            with torch.no_grad():
                t1, t2 = target(views).chunk(2)
            loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        backward_and_step(loss)
        tau = params.momentum
        if params.momentum_schedule == "cosine":
            progress = min(step, total_steps) / total_steps
            tau = 1.0 - (1.0 - tau) * (math.cos(math.pi * progress) + 1.0) / 2.0
        with torch.no_grad():
            online = chain(backbone.parameters(), projector.parameters())
            for source, average in zip(online, target.parameters(), strict=True):
                average.mul_(tau).add_(source, alpha=1.0 - tau)
        step += 1
        return loss

    return model, simclr if params.name == "simclr" else byol


def _same_weights(method: nn.Module, model: nn.Module) -> bool:
    """Whether the two start from the same parameters and buffers, entry by entry."""
    ours, theirs = list(method.state_dict().values()), list(model.state_dict().values())
    return len(ours) == len(theirs) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """One call of ``step``: wall seconds, and CPU seconds of this process (all threads)."""
    _synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    _synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


@dataclass
class Case:
    method: str
    precision: str
    selfsup: list[float]  # wall seconds per step
    reference: list[float]
    selfsup_cpu: list[float]  # CPU seconds of this process per step
    reference_cpu: list[float]
    losses: tuple[float, float]  # first step's loss, selfsup's and the reference's


def run_case(
    method: str,
    precision: str,
    args: argparse.Namespace,
    images: torch.Tensor,
    device: torch.device,
) -> Case:
    spec = step_spec(method, len(images), precision, args.channels_last)
    trained, ours = selfsup_step(spec, images, device)
    model, theirs = reference_step(spec, images, device)
    if not _same_weights(trained, model):
        raise AssertionError(f"{method}: selfsup and the reference start from different weights")
    # The first step on the same views (the reference's seeded as selfsup's): the same maths
    # gives the same loss. It counts as a warm-up step.
    losses = (ours()["loss"].item(), theirs(seeded=True).item())
    for _ in range(args.warmup - 1):
        ours()
        theirs()
    times: list[tuple[float, float, float, float]] = []
    for _ in range(args.steps):
        times.append((*timed(ours, device), *timed(theirs, device)))
    wall, cpu, reference_wall, reference_cpu = (list(column) for column in zip(*times, strict=True))
    return Case(method, precision, wall, reference_wall, cpu, reference_cpu, losses)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"CPU: {line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def git_commit() -> str:
    """HEAD's short hash, and whether the checkout differs from it (untracked files too)."""

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise OSError(done.stderr)
        return done.stdout.strip()

    try:
        commit, changes = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain")
    except OSError:
        return "unknown (no git checkout)"
    return f"{commit}, with uncommitted changes" if changes else commit


def table(cases: list[Case], batch: int, channels_last: bool, cpu: bool) -> str:
    """Markdown, a row per case; with ``cpu``, the CPU time of this process too: on a shared
    CPU, other work stretches the wall time of a step more than the CPU time it takes."""
    layout = ", channels_last" if channels_last else ""
    header = (
        "| method | precision | selfsup images/s | reference images/s | selfsup / reference "
        "| selfsup s/step (min-max) | reference s/step (min-max) |"
    )
    if cpu:
        header += " CPU s/step, selfsup / reference | selfsup / reference (CPU) |"
    header += " first loss, selfsup / reference |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for case in cases:
        ours, theirs = statistics.median(case.selfsup), statistics.median(case.reference)
        row = (
            f"| {case.method} | {case.precision}{layout} | {batch / ours:.1f} "
            f"| {batch / theirs:.1f} | {theirs / ours:.3f} "
            f"| {ours:.3f} ({min(case.selfsup):.3f}-{max(case.selfsup):.3f}) "
            f"| {theirs:.3f} ({min(case.reference):.3f}-{max(case.reference):.3f}) |"
        )
        if cpu:
            ours_cpu = statistics.median(case.selfsup_cpu)
            theirs_cpu = statistics.median(case.reference_cpu)
            row += f" {ours_cpu:.3f} / {theirs_cpu:.3f} | {theirs_cpu / ours_cpu:.3f} |"
        lines.append(row + f" {case.losses[0]:.6f} / {case.losses[1]:.6f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, help="images per step (256 on a GPU, 32 on CPU)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each, alternating")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each, >= 1")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32", "bf16"])
    parser.add_argument("--channels-last", action="store_true", help="NHWC for both")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.warmup, args.steps = max(1, args.warmup), max(1, args.steps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (256 if device.type == "cuda" else 32)
    on_cpu = device.type == "cpu"

    dataset = load_dataset("builtin:patches", PATCHES)
    images = dataset.images[torch.arange(batch) % len(dataset.images)].to(device)
    load_before = os.getloadavg()
    cases = []
    for method in args.methods:
        for precision in args.precision:
            cases.append(run_case(method, precision, args, images, device))
            print(table(cases[-1:], batch, args.channels_last, on_cpu).splitlines()[-1], flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    load_after = os.getloadavg()
    threads = torch.get_num_threads()

    print()
    print(table(cases, batch, args.channels_last, on_cpu))
    print()
    print(
        f"ResNet-18 (CIFAR stem), colour 32x32 patches, simclr augmentations, batch {batch} "
        f"(two views each); median of {args.steps} alternating steps each after {args.warmup} "
        "warm-up steps each; selfsup / reference is the ratio of images/s (> 1: selfsup faster). "
        "First loss: both from the same weights on the same views (the first warm-up step)."
    )
    print(
        f"Device: {device_name(device)}; torch {torch.__version__}; "
        f"{threads} torch thread{'s' * (threads != 1)}; load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.2f}' for x in load_before)} before, "
        f"{', '.join(f'{x:.2f}' for x in load_after)} after; commit {git_commit()}."
    )


if __name__ == "__main__":
    main()
