"""Speed and memory of users' images streamed by Ray Data, against the in-memory tensor path.

On the example folder dataset (examples/make_image_folder.py) written to a temporary folder,
uploaded to moto's S3 server on loopback, and uploaded there as Parquet and WebDataset shards
of 500 images, at 32x32 and 96x96:

- images/s delivered to one training worker: one epoch of the training split through the
  shard a TorchTrainer worker gets (``streaming_split(1, equal=True)``, then
  ``iter_torch_batches``), against batches of the same images decoded beforehand into a
  tensor (a DataLoader over a TensorDataset, what builtins use);
- the SimCLR step rate with each feed (``workers.step``'s train step on the batches as they
  arrive), as a ratio against the in-memory rate measured in the same run, before and after;
- the consuming process's peak resident memory while it streams one epoch, at two dataset
  sizes 10x apart (each in a fresh process).

    .venv/bin/python -m benchmarks.bench_stream [--images 2800] [--steps 20]

Ray runs in this process with 2 CPUs: decode tasks and the training step share the machine's
cores, as they do on the 2-core test stack (one CPU reserved for decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import ray
import torch
from torch.utils.data import DataLoader, TensorDataset

from examples.make_image_folder import (
    CLASSES,
    SHARD_WRITERS,
    generate_images,
    shuffled,
    write_image_folder,
)
from pipelines.sources import Catalog, ImageSource
from pipelines.spec import JobSpec, load_spec_text
from pipelines.user_data import catalog_labels
from workers.data import split_samples
from workers.images import BadSamples, image_stream, load_images
from workers.step import build_training

COMMAND = ".venv/bin/python -m benchmarks.bench_stream"
BATCH = 64
SIDES = (32, 96)


def _spec(source: str, side: int) -> JobSpec:
    document = {
        "name": "bench-stream",
        "method": {"name": "simclr", "temperature": 0.2, "projection_dim": 64, "hidden_dim": 256},
        "encoder": {"arch": "small-convnet", "out_dim": 128},
        "data": {"source": source, "image_size": side, "channels": 3},
        "augment": {"preset": "simclr"},
        "train": {"epochs": 1, "batch_size": BATCH, "seed": 0},
        "resources": {"workers": 1, "data_cpus": 1},
    }
    return load_spec_text(json.dumps(document))


def _stream_batches(source: str, side: int) -> Iterator[torch.Tensor]:
    """One epoch of the training split as a TorchTrainer worker's shard delivers it."""
    catalog = Catalog.list(ImageSource.parse(source))
    split = split_samples(len(catalog.keys), catalog_labels(catalog), 0.25, 0)
    stream = image_stream(catalog, split.train, side, 3, BadSamples.remote(), seed=0)
    (shard,) = stream.streaming_split(1, equal=True)
    for batch in shard.iter_torch_batches(batch_size=BATCH, drop_last=True):
        yield batch["image"].float().div_(255.0)


def _memory_batches(images: torch.Tensor) -> Iterator[torch.Tensor]:
    loader = DataLoader(TensorDataset(images), batch_size=BATCH, shuffle=True, drop_last=True)
    for (batch,) in loader:
        yield batch


def _decoded(source: str, side: int) -> torch.Tensor:
    catalog = Catalog.list(ImageSource.parse(source))
    split = split_samples(len(catalog.keys), catalog_labels(catalog), 0.25, 0)
    images, _ = load_images(catalog, split.train, side, 3)
    return torch.from_numpy(images).float().div_(255.0)


def _images_per_second(batches: Iterator[torch.Tensor]) -> float:
    start, count = time.perf_counter(), 0
    for batch in batches:
        count += len(batch)
    return count / (time.perf_counter() - start)


def _steps_per_second(
    spec: JobSpec, side: int, batches: Iterator[torch.Tensor], steps: int
) -> float:
    training = build_training(spec, (3, side), 1000, steps, torch.device("cpu"))
    positions = torch.arange(BATCH)
    timed, start = 0, 0.0
    for number, images in enumerate(batches):
        if number == 2:  # the first two steps warm up (allocations, the stream's start)
            start = time.perf_counter()
        training.train_step(images, positions)
        if number >= 2:
            timed += 1
        if timed == steps:
            break
    if timed < steps:
        raise SystemExit(f"the epoch had only {timed + 2} batches; use more --images")
    return timed / (time.perf_counter() - start)


def _peak_rss_child(source: str, side: int) -> None:
    """Stream one epoch, and print the growth of this process's peak resident set (MiB)."""
    ray.init(address=os.environ["BENCH_RAY_ADDRESS"], log_to_driver=False)
    batches = _stream_batches(source, side)
    first = next(batches)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    base = _status_mib("VmRSS")
    count = len(first) + sum(len(batch) for batch in batches)
    print(json.dumps({"peak_growth_mib": _status_mib("VmHWM") - base, "images": count}))


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _peak_rss(source: str, side: int, address: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_stream", "--peak-rss-of", source, str(side)],
        env={**os.environ, "BENCH_RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2800, help="images in the dataset")
    parser.add_argument("--steps", type=int, default=20, help="timed SimCLR steps per feed")
    parser.add_argument("--peak-rss-of", nargs=2, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.peak_rss_of:
        _peak_rss_child(arguments.peak_rss_of[0], int(arguments.peak_rss_of[1]))
        return

    from tests.s3 import s3_server

    per_class = max(1, arguments.images // len(CLASSES))
    with tempfile.TemporaryDirectory() as scratch, s3_server() as s3:
        os.environ.update(s3.env)
        small, large = Path(scratch) / "small", Path(scratch) / "large"
        write_image_folder(small, per_class)
        write_image_folder(large, 10 * per_class, seed=1)
        client = s3.client()
        client.create_bucket(Bucket="bench")
        for key, data in generate_images(per_class):
            client.put_object(Bucket="bench", Key=f"images/{key}", Body=data)
        sources = {"folder": f"file://{small}", "s3": "s3://bench/images/"}
        for kind, writer in SHARD_WRITERS.items():
            writer(Path(scratch) / kind, shuffled(generate_images(per_class), 0), per_shard=500)
            for path in sorted((Path(scratch) / kind).iterdir()):
                client.upload_file(str(path), "bench", f"{kind}/{path.name}")
            sources[f"s3 {kind}"] = f"s3://bench/{kind}/"
        context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        torch.set_num_threads(1)  # the other core decodes
        print(f"{COMMAND} --images {arguments.images} --steps {arguments.steps}")
        print(f"{per_class * len(CLASSES)} images, batch {BATCH}, Ray with 2 CPUs, torch 1 thread")
        print("| side | feed | images/s delivered | x in-memory | SimCLR steps/s | x in-memory |")
        print("|---|---|---|---|---|---|")
        for side in SIDES:
            spec = _spec(sources["folder"], side)
            memory = _decoded(sources["folder"], side)
            delivered = _images_per_second(_memory_batches(memory))
            before = _steps_per_second(spec, side, _memory_batches(memory), arguments.steps)
            rows = []
            for name, source in sources.items():
                rate = _images_per_second(_stream_batches(source, side))
                steps = _steps_per_second(
                    spec, side, _stream_batches(source, side), arguments.steps
                )
                rows.append((name, rate, steps))
            after = _steps_per_second(spec, side, _memory_batches(memory), arguments.steps)
            reference = (before + after) / 2
            print(f"| {side} | in-memory tensor | {delivered:.0f} | 1 | {reference:.2f} | 1 |")
            for name, rate, steps in rows:
                print(
                    f"| {side} | {name} stream | {rate:.0f} | {rate / delivered:.3f} | "
                    f"{steps:.2f} | {steps / reference:.2f} |"
                )
        address = context.address_info["address"]
        print("\n| images | peak RSS growth of the consuming process (MiB), 32x32 folder stream |")
        print("|---|---|")
        for folder in (small, large):
            measured = _peak_rss(f"file://{folder}", 32, address)
            print(f"| {measured['images']} (training split) | {measured['peak_growth_mib']:.1f} |")
        ray.shutdown()


if __name__ == "__main__":
    main()
