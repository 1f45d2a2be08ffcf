"""Evaluation protocols on builtin:digits, one CPU thread (``pipelines.protocols.THREADS``)
against the process's default thread count, side by side in one run; prints wall seconds and
the ratio. The load average is printed too: the gap depends on how busy the cores are.

Run: .venv/bin/python -m benchmarks.bench_evaluate [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from pipelines import protocols
from pipelines.spec import EncoderSpec
from workers.data import load_dataset, split_indices
from workers.encoders import build_encoder


def _timed(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    dataset = load_dataset("builtin:digits")
    split = split_indices(dataset.labels, 0.25, 0)
    labels = dataset.labels.numpy()
    torch.manual_seed(0)
    encoder = build_encoder(EncoderSpec().config(in_channels=1, image_size=8))
    features = protocols.extract_features(encoder, dataset.images)
    subset = split.train[protocols.label_subset(labels[split.train], 0.1, 0)]
    cases = {
        "features (1797 images)": lambda: protocols.extract_features(encoder, dataset.images),
        "linear probe (1347 x 128)": lambda: protocols.linear_probe_scores(
            features[split.train], labels[split.train], features[split.test], 10
        ),
        "kNN (k=20)": lambda: protocols.knn_scores(
            features[split.train], labels[split.train], features[split.test], 10, 20, 0.07
        ),
        "fine-tune (10% labels, 100 steps)": lambda: protocols.finetune_scores(
            encoder,
            dataset.images[subset],
            labels[subset],
            dataset.images[split.test],
            10,
            100,
            1e-3,
            0,
        ),
    }
    default_threads = torch.get_num_threads()
    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; median of "
        f"{args.repeats}; default threads {default_threads}"
    )
    print(f"{'protocol':36}{'1 thread s':>12}{'default s':>12}{'default/1':>11}")
    for name, case in cases.items():
        seconds = {}
        for threads in (1, default_threads):
            protocols.THREADS = threads
            seconds[threads] = _timed(case, args.repeats)
        ratio = seconds[default_threads] / seconds[1]
        print(f"{name:36}{seconds[1]:12.3f}{seconds[default_threads]:12.3f}{ratio:11.1f}")


if __name__ == "__main__":
    main()
