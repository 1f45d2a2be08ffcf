"""Users' images as a Ray Data stream: read and decode as Ray Data tasks on the cluster's
CPUs, a few blocks at a time, so that no process holds the dataset.

Each row is ``{"image": uint8 (C, S, S), "index": int64, "position": int64}``: the image
decoded, resized (shorter side to S) and centre-cropped, its global index in the source's
``Catalog``, and its position in the training split (what PIRL's memory bank is indexed by).
A file that cannot be decoded is dropped from the stream and recorded by ``BadSamples``,
one actor per job that the train loop reads after each epoch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from PIL import Image

from pipelines.sources import Catalog, ImageSource

# Rows per Ray Data block: the unit of streaming, of shuffling blocks and of decode tasks.
BLOCK_ROWS = 256
# Rows per decode call inside a block.
DECODE_BATCH = 64
# Example paths of unreadable files kept for the job's log and its error.
BAD_EXAMPLES = 5
# What PIL raises on files it cannot decode: unknown formats, truncated data, huge images.
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_image(data: bytes, size: int, channels: int) -> np.ndarray:
    """An encoded image as uint8 (channels, size, size): grey expanded to RGB or colour
    turned grey as ``channels`` asks, alpha dropped, shorter side resized to ``size``, then
    the centre crop. Raises one of ``_UNREADABLE`` on a file that is not a whole image."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB" if channels == 3 else "L", (size, size))  # JPEG: decode smaller
        picture = image.convert("RGB" if channels == 3 else "L")
    width, height = picture.size
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    picture = picture.resize(resized, Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    array = np.asarray(picture.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


@ray.remote(num_cpus=0)
class BadSamples:
    """The distinct unreadable keys a job's decode tasks met, over all its epochs."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def add(self, keys: list[str]) -> None:
        self.keys.update(keys)

    def summary(self) -> tuple[int, list[str]]:
        return len(self.keys), sorted(self.keys)[:BAD_EXAMPLES]


def _decode_rows(
    batch: dict[str, np.ndarray], source: ImageSource, size: int, channels: int, bad: Any
) -> dict[str, np.ndarray]:
    images, kept, unreadable = [], [], []
    for row, key in enumerate(batch["key"]):
        try:
            images.append(decode_image(source.read(str(key)), size, channels))
            kept.append(row)
        except _UNREADABLE:
            unreadable.append(str(key))
    if unreadable:
        # Waited for, so that the count is complete when the epoch's stream has ended.
        ray.get(bad.add.remote(unreadable))
    empty = np.zeros((0, channels, size, size), dtype=np.uint8)
    return {
        "image": np.stack(images) if images else empty,
        "index": batch["index"][kept],
        "position": batch["position"][kept],
    }


def image_stream(
    catalog: Catalog,
    indices: np.ndarray,
    size: int,
    channels: int,
    bad: Any,
    seed: int,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """The images ``indices`` of ``catalog`` as a lazy Ray Data dataset of decoded rows, the
    i-th of ``indices`` at position i. The rows are put in an order drawn from ``seed`` once,
    so that each block mixes classes; each epoch then shuffles within a buffer."""
    positions = np.random.default_rng(seed).permutation(len(indices))
    chosen = np.asarray(indices, dtype=np.int64)[positions]
    table = pa.table(
        {"key": [catalog.keys[i] for i in chosen], "index": chosen, "position": positions}
    )
    blocks = [table.slice(start, BLOCK_ROWS) for start in range(0, len(table), BLOCK_ROWS)]
    return ray.data.from_arrow(blocks).map_batches(
        _decode_rows,
        batch_size=DECODE_BATCH,
        batch_format="numpy",
        fn_kwargs={"source": catalog.source, "size": size, "channels": channels, "bad": bad},
        num_cpus=num_cpus,
    )


@dataclass(frozen=True)
class StreamedImages:
    """What the workers need of a user's images beside the stream Ray Train splits."""

    train_count: int  # images in the training split, before unreadable ones are dropped
    channels: int
    side: int
    reference: np.ndarray  # uint8 (n, C, S, S): held-out images for the reference features
    sample: np.ndarray  # uint8 (m, C, S, S): training images for the pictures and statistics
    bad: Any  # the job's BadSamples actor
    max_bad: int  # unreadable training images allowed before the job fails


def load_images(
    catalog: Catalog, indices: np.ndarray, size: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``indices`` decoded in this process (the few that evaluation, reference
    features and pictures need): uint8 (n, C, S, S) and the indices that decoded."""
    images, kept = [], []
    for index in indices:
        try:
            images.append(decode_image(catalog.source.read(catalog.keys[index]), size, channels))
            kept.append(index)
        except _UNREADABLE:
            continue
    stacked = np.stack(images) if images else np.zeros((0, channels, size, size), np.uint8)
    return stacked, np.asarray(kept, dtype=np.int64)
