"""Speed of the contrastive family's training step, against the plain SimCLR step.

For each method at a fixed global batch on builtin:digits (example spec, one process):
optimizer steps per second, and peak training memory, with ratios against SimCLR measured
in the same run. Then the time of one MoCo enqueue and one PIRL bank update against the
method's forward pass, at growing queue and bank sizes: they must stay flat (O(batch), not
O(K)).

    .venv/bin/python -m benchmarks.bench_contrastive [--batch 256] [--steps 20]

Timing: all methods live in one process and take turns step by step (a rotating order,
then the median step time), so a burst of other work on a shared machine slows them alike.
Memory: each method in a fresh process; the peak resident set over its steps (reset through
/proc/self/clear_refs) minus the resident set just before the first step, with the model,
data and optimizer built: what training adds (gradients, optimizer state, activations,
temporaries).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.contrastive_inprocess import InProcess, example_spec, in_process
from pipelines.spec import JobSpec
from workers.methods import Batch
from workers.methods.moco import enqueue
from workers.methods.pirl import update_bank

METHODS = ("simclr", "siamese", "moco", "pirl")
STORE_SIZES = (1_024, 16_384, 262_144)  # queue sizes K, and bank sizes N
COMMAND = ".venv/bin/python -m benchmarks.bench_contrastive"


def _memory_mib(field: str) -> float:
    """A field of /proc/self/status: VmRSS (resident now) or VmHWM (peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise KeyError(field)


def ready_step(spec: JobSpec) -> tuple[InProcess, Callable[[], object]]:
    """``spec`` set up as the train loop does, and its training step (the train loop's own,
    ``workers.step.Training.train_step``) on one fixed batch."""
    run = in_process(spec)
    images, indices = next(iter(run.loader))
    run.training.model.train()
    return run, partial(run.training.train_step, images, indices)


def _ready(method: str, batch_size: int) -> tuple[InProcess, Callable[[], object]]:
    """The method's example spec at ``batch_size`` (its schedule barely moving), ready."""
    return ready_step(example_spec(method, batch_size=batch_size, epochs=1000))


def _rotations(names: list, rounds: int) -> list[list]:
    """``rounds`` orders of ``names``, each rotated by one: nobody is always first."""
    return [names[i % len(names) :] + names[: i % len(names)] for i in range(rounds)]


def peak_training_mib(method: str, batch_size: int, steps: int) -> float:
    """What ``steps`` training steps add to this process's peak resident set (MiB)."""
    _, step = _ready(method, batch_size)
    Path("/proc/self/clear_refs").write_text("5")  # peak := current resident set
    before = _memory_mib("VmRSS")
    for _ in range(steps):
        step()
    return _memory_mib("VmHWM") - before


def interleaved_step_times(
    steppers: dict[str, Callable[[], object]], steps: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Median seconds per step of each stepper, ``{"wall": ..., "cpu": ...}`` (wall clock and
    this process's CPU time), over ``steps`` steps each after ``warmup`` ones, the steppers
    taking turns step by step in a rotating order."""
    for step in steppers.values():
        for _ in range(warmup):
            step()
    names = list(steppers)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for order in _rotations(names, steps):
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            steppers[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: {"wall": statistics.median(wall[name]), "cpu": statistics.median(cpu[name])}
        for name in names
    }


def steps_per_second(batch_size: int, steps: int, warmup: int) -> dict[str, float]:
    steppers = {method: _ready(method, batch_size)[1] for method in METHODS}
    times = interleaved_step_times(steppers, steps, warmup)
    return {method: 1.0 / median["wall"] for method, median in times.items()}


def update_rows(batch_size: int, repeats: int) -> list[str]:
    """Markdown rows: one enqueue / bank update against one forward pass, per store size,
    interleaved (a forward, then the sizes in a rotating order: the first update after a
    forward runs on cold caches), medians of ``repeats``."""
    rows = []
    for method in ("moco", "pirl"):
        run, _ = _ready(method, batch_size)
        images, indices = next(iter(run.loader))
        dim = run.spec.method.projection_dim
        keys = F.normalize(torch.randn(batch_size, dim), dim=1)
        forward = partial(run.training.method, Batch(images, indices, 0, run.training.augment))
        actions: dict[object, Callable[[], object]] = {"forward": forward}
        for size in STORE_SIZES:
            store = F.normalize(torch.randn(size, dim), dim=1)
            if method == "moco":
                actions[size] = partial(enqueue, store, torch.zeros((), dtype=torch.long), keys)
            else:
                picked = torch.randint(size, (batch_size,))
                actions[size] = partial(update_bank, store, picked, keys, 0.5)
        times: dict[object, list[float]] = {name: [] for name in actions}
        with torch.no_grad():
            for order in _rotations(list(STORE_SIZES), repeats):
                for name in ["forward", *order]:
                    start = time.perf_counter()
                    actions[name]()
                    times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(values) for name, values in times.items()}
        label = "moco enqueue, K" if method == "moco" else "pirl bank update, N"
        for size in STORE_SIZES:
            rows.append(
                f"| {label} = {size} | {1e6 * median[size]:.0f} us "
                f"| {1e3 * median['forward']:.1f} ms | {median[size] / median['forward']:.5f} |"
            )
    return rows


def run(batch_size: int = 256, steps: int = 20, warmup: int = 3) -> str:
    """All measurements, as the markdown the results doc records."""
    load_before = os.getloadavg()[0]
    speed = steps_per_second(batch_size, steps, warmup)
    memory = {}
    for method in METHODS:
        command = [sys.executable, "-m", "benchmarks.bench_contrastive", "--memory", method]
        command += ["--batch", str(batch_size), "--steps", str(warmup + 2)]
        memory[method] = float(
            subprocess.run(command, capture_output=True, text=True, check=True).stdout
        )
    lines = [
        f"Training step (forward, backward, Adam, state updates), global batch {batch_size}, "
        f"one process, {torch.get_num_threads()} threads; median of {steps} steps per method "
        f"after {warmup} warm-up steps, the methods taking turns step by step:",
        "",
        "| method | steps/s | images/s | vs SimCLR | peak training memory | vs SimCLR |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        lines.append(
            f"| {method} | {speed[method]:.2f} | {speed[method] * batch_size:.0f}"
            f" | {speed[method] / speed['simclr']:.2f}x | {memory[method]:.0f} MiB"
            f" | {memory[method] / memory['simclr']:.2f}x |"
        )
    lines += [
        "",
        "One state update of the global batch's keys / embeddings against one forward pass of "
        f"the method (no grad), global batch {batch_size}, medians of 30 interleaved repeats:",
        "",
        "| update | time | forward pass | update / forward |",
        "|---|---|---|---|",
        *update_rows(batch_size, repeats=30),
        "",
        f"Load average (1 min) of the machine: {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after. On 2 cores with 2 torch threads any other busy "
        "process stalls torch's parallel sections, small operations (the updates) most: "
        "compare figures within one run only.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        print(peak_training_mib(args.memory, args.batch, args.steps))
    else:
        print(run(args.batch, args.steps, args.warmup))


if __name__ == "__main__":
    main()
