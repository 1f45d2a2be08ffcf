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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from PIL import Image

from pipelines.shards import ShardSet
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


def _decoded_rows(
    encoded: Iterable[tuple[str, int, int, bytes | None]], size: int, channels: int, bad: Any
) -> dict[str, np.ndarray]:
    """Rows of (name, global index, position, encoded image) decoded; the unreadable ones
    dropped and recorded by name."""
    images, indices, positions, unreadable = [], [], [], []
    for name, index, position, data in encoded:
        try:
            if data is None:
                raise ValueError("no image bytes")
            images.append(decode_image(data, size, channels))
            indices.append(index)
            positions.append(position)
        except _UNREADABLE:
            unreadable.append(name)
    if unreadable:
        # Waited for, so that the count is complete when the epoch's stream has ended.
        ray.get(bad.add.remote(unreadable))
    empty = np.zeros((0, channels, size, size), dtype=np.uint8)
    return {
        "image": np.stack(images) if images else empty,
        "index": np.asarray(indices, dtype=np.int64),
        "position": np.asarray(positions, dtype=np.int64),
    }


def _decode_files(
    batch: dict[str, np.ndarray], source: ImageSource, size: int, channels: int, bad: Any
) -> dict[str, np.ndarray]:
    def encoded() -> Iterator[tuple[str, int, int, bytes | None]]:
        for key, index, position in zip(
            batch["key"], batch["index"], batch["position"], strict=True
        ):
            try:
                data = source.read(str(key))
            except OSError:  # gone since the listing
                data = None
            yield str(key), int(index), int(position), data

    return _decoded_rows(encoded(), size, channels, bad)


def _decode_pieces(
    batch: dict[str, np.ndarray],
    shards: ShardSet,
    position_of: np.ndarray,
    size: int,
    channels: int,
    bad: Any,
) -> dict[str, np.ndarray]:
    """Each piece read whole, its samples outside the training split skipped undecoded."""

    def encoded() -> Iterator[tuple[str, int, int, bytes | None]]:
        for number in batch["piece"]:
            for index, name, data in shards.read_piece(shards.pieces[number]):
                if position_of[index] >= 0:
                    yield name, index, int(position_of[index]), data

    return _decoded_rows(encoded(), size, channels, bad)


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
    i-th of ``indices`` at position i. Image files come in an order drawn from ``seed`` once,
    so that each block mixes classes; a shard set's pieces come in an order drawn the same
    way, each piece's samples in file order. Each epoch then shuffles within a buffer."""
    rng = np.random.default_rng(seed)
    if catalog.shards is not None:
        position_of = np.full(len(catalog.keys), -1, dtype=np.int64)
        position_of[np.asarray(indices, dtype=np.int64)] = np.arange(len(indices))
        order = rng.permutation(len(catalog.shards.pieces))
        blocks = [pa.table({"piece": [int(number)]}) for number in order]
        decode, batch_size = _decode_pieces, 1
        arguments = {"shards": catalog.shards, "position_of": position_of}
    else:
        positions = rng.permutation(len(indices))
        chosen = np.asarray(indices, dtype=np.int64)[positions]
        table = pa.table(
            {"key": [catalog.keys[i] for i in chosen], "index": chosen, "position": positions}
        )
        blocks = [table.slice(start, BLOCK_ROWS) for start in range(0, len(table), BLOCK_ROWS)]
        decode, arguments, batch_size = _decode_files, {"source": catalog.source}, DECODE_BATCH
    return ray.data.from_arrow(blocks).map_batches(
        decode,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={**arguments, "size": size, "channels": channels, "bad": bad},
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
    dataset: str = "train"  # the name the trainer was handed the stream under


def load_images(
    catalog: Catalog, indices: np.ndarray, size: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``indices`` decoded in this process (the few that evaluation, reference
    features and pictures need): uint8 (n, C, S, S) and the indices that decoded, in order."""
    order = {int(index): rank for rank, index in enumerate(indices)}
    decoded = []
    for index, data in catalog.read(indices):  # a shard set reads piece by piece
        try:
            if data is not None:
                decoded.append((order[index], index, decode_image(data, size, channels)))
        except _UNREADABLE:
            continue
    decoded.sort(key=lambda item: item[0])
    if not decoded:
        return np.zeros((0, channels, size, size), np.uint8), np.zeros(0, dtype=np.int64)
    return np.stack([image for *_, image in decoded]), np.array([i for _, i, _ in decoded])
