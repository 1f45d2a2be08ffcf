"""Shard sets, for datasets too large for one object per image: Parquet files with a column of
encoded images (and optionally a label column), or WebDataset tars whose members
``<sample>.<ext>`` hold an image and optionally a label (``<sample>.cls``). Torch-free.

A set is read in pieces, a Parquet row group or a whole tar at a time. A sample's global
index is its place in the set: shards in sorted key order, then rows (or samples) in file
order. Listing reads each Parquet footer, plus the label column when one is named, and each
tar's headers: a tar has no index, so a WebDataset set is read through once when a job starts.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.sources import IMAGE_SUFFIXES, ImageSource

ShardKind = Literal["parquet", "webdataset"]
SHARD_SUFFIXES: dict[str, ShardKind] = {".parquet": "parquet", ".tar": "webdataset"}
PARQUET_IMAGE_COLUMN = "image"
PARQUET_LABEL_COLUMN = "label"  # used when present and no label column is named
TAR_LABEL = "cls"
_TAR_IMAGES = tuple(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES)


def shard_kind(key: str) -> ShardKind | None:
    return next((kind for suffix, kind in SHARD_SUFFIXES.items() if key.endswith(suffix)), None)


@dataclass(frozen=True)
class Piece:
    """What one read returns: ``rows`` samples from global index ``start`` on."""

    shard: str
    start: int
    rows: int
    row_group: int = -1  # Parquet's; a tar is read whole
    first_row: int = 0  # the piece's first row within its Parquet shard


@dataclass(frozen=True)
class TarSample:
    name: str  # the member name without its extension
    offset: int  # where the image's bytes start in the tar, and how many there are
    size: int
    label: str | None
    data: bytes | None  # read only when asked for


def _tar_samples(stream: Any, image: str | None, label: str, read: bool) -> Iterator[TarSample]:
    """The samples of a tar in file order: consecutive members sharing a name up to the
    first dot of the file name are one sample. One without an image member is skipped."""
    current: dict[str, Any] = {}

    def finished() -> Iterator[TarSample]:
        if "offset" in current:
            yield TarSample(**current)

    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, filename = member.name.rpartition("/")
            stem, _, extension = filename.partition(".")
            name = f"{folder}/{stem}" if folder else stem
            if current.get("name") != name:
                yield from finished()
                current = {"name": name, "label": None, "data": None}
            wanted = extension == image if image else extension.lower() in _TAR_IMAGES
            if wanted and "offset" not in current:
                current |= {"offset": member.offset_data, "size": member.size}
                if read:
                    current["data"] = tar.extractfile(member).read()
            elif extension == label:
                current["label"] = tar.extractfile(member).read().decode().strip()
        yield from finished()


def _image_bytes(column: pa.ChunkedArray) -> list[bytes | None]:
    """Encoded images from a binary column, or from the ``bytes`` field of a struct column
    (the layout Hugging Face datasets write)."""
    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, "bytes")
    return column.to_pylist()


@dataclass(frozen=True)
class ShardSet:
    """What reading a listed shard set takes; it travels to every decode task."""

    source: ImageSource
    kind: ShardKind
    image_column: str | None  # Parquet column, or tar member extension (None: any image)
    pieces: tuple[Piece, ...]
    # WebDataset: where each sample's image lies in its tar, for reads of single samples.
    offsets: np.ndarray | None = None
    sizes: np.ndarray | None = None

    def read_piece(self, piece: Piece) -> Iterator[tuple[int, str, bytes | None]]:
        """(global index, sample name, encoded image) of every sample of ``piece``, in
        order; the names are the catalog's (``shard#row``, ``shard/sample``)."""
        if self.kind == "parquet":
            with self.source.open(piece.shard) as handle:
                table = pq.ParquetFile(handle).read_row_group(
                    piece.row_group, columns=[self.image_column]
                )
            for row, data in enumerate(_image_bytes(table.column(0)), start=piece.first_row):
                yield piece.start + row - piece.first_row, f"{piece.shard}#{row}", data
            return
        with self.source.open_stream(piece.shard) as stream:
            samples = _tar_samples(stream, self.image_column, TAR_LABEL, read=True)
            for index, sample in enumerate(samples, start=piece.start):
                yield index, f"{piece.shard}/{sample.name}", sample.data

    def read(self, indices: Iterable[int]) -> Iterator[tuple[int, bytes | None]]:
        """Scattered samples, each piece opened once for all of its samples asked for."""
        starts = np.array([piece.start for piece in self.pieces])
        by_piece: dict[int, list[int]] = {}
        for index in indices:
            by_piece.setdefault(int(np.searchsorted(starts, index, "right")) - 1, []).append(
                int(index)
            )
        for number, wanted in by_piece.items():
            piece = self.pieces[number]
            if self.kind == "parquet":
                rows = {index: data for index, _, data in self.read_piece(piece)}
                yield from ((index, rows[index]) for index in wanted)
                continue
            with self.source.open(piece.shard) as handle:
                for index in wanted:
                    handle.seek(int(self.offsets[index]))
                    yield index, handle.read(int(self.sizes[index]))


@dataclass(frozen=True)
class ListedShards:
    shards: ShardSet
    names: list[str]  # shard#row (Parquet) or shard/sample (tar), in global index order
    labels: list[str] | None


def list_shards(
    source: ImageSource,
    keys: list[str],
    kind: ShardKind,
    image_column: str | None,
    label_column: str | None,
) -> ListedShards:
    if kind == "parquet":
        return _list_parquet(source, keys, image_column or PARQUET_IMAGE_COLUMN, label_column)
    return _list_tars(source, keys, image_column, label_column or TAR_LABEL)


def _list_parquet(
    source: ImageSource, keys: list[str], image: str, label: str | None
) -> ListedShards:
    pieces, names, labels = [], [], []
    if label is None:
        with source.open(keys[0]) as handle:
            present = pq.ParquetFile(handle).schema_arrow.names
        label = PARQUET_LABEL_COLUMN if PARQUET_LABEL_COLUMN in present else None
    for key in keys:
        with source.open(key) as handle:
            shard = pq.ParquetFile(handle)
            columns = shard.schema_arrow.names
            for column, field in ((image, "image_column"), (label, "label_column")):
                if column is not None and column not in columns:
                    raise ValueError(
                        f"data.{field}: shard {key} has no column {column!r} "
                        f"(its columns: {', '.join(columns)})"
                    )
            row = 0
            for group in range(shard.num_row_groups):
                rows = shard.metadata.row_group(group).num_rows
                pieces.append(Piece(key, len(names), rows, group, first_row=row))
                names.extend(f"{key}#{number}" for number in range(row, row + rows))
                row += rows
            if label is not None:
                labels.extend(str(value) for value in shard.read(columns=[label]).column(0))
    shards = ShardSet(source, "parquet", image, tuple(pieces))
    return ListedShards(shards, names, labels if label is not None else None)


def _list_tars(source: ImageSource, keys: list[str], image: str | None, label: str) -> ListedShards:
    pieces, names, labels, offsets, sizes = [], [], [], [], []
    for key in keys:
        with source.open_stream(key) as stream:
            samples = list(_tar_samples(stream, image, label, read=False))
        pieces.append(Piece(key, len(names), len(samples)))
        for sample in samples:
            names.append(f"{key}/{sample.name}")
            labels.append(sample.label)
            offsets.append(sample.offset)
            sizes.append(sample.size)
    shards = ShardSet(
        source, "webdataset", image, tuple(pieces), np.array(offsets), np.array(sizes)
    )
    labelled = bool(labels) and all(value is not None for value in labels)
    return ListedShards(shards, names, labels if labelled else None)


def shard_problems(
    source: ImageSource,
    field: str,
    key: str,
    kind: ShardKind,
    image: str | None,
    label: str | None,
) -> list[tuple[str, str]]:
    """What the first shard says about the named columns: its footer (Parquet) or its first
    samples (a tar), never the whole set."""
    try:
        if kind == "parquet":
            with source.open(key) as handle:
                columns = pq.ParquetFile(handle).schema_arrow.names
            wanted = {"image_column": image or PARQUET_IMAGE_COLUMN, "label_column": label}
            return [
                (
                    f"data.{field}",
                    f"shard {key} has no column {name!r} (its columns: {', '.join(columns)})",
                )
                for field, name in wanted.items()
                if name is not None and name not in columns
            ]
        with source.open_stream(key) as stream:
            first = next(_tar_samples(stream, image, label or TAR_LABEL, read=False), None)
    except (OSError, pa.ArrowInvalid, tarfile.TarError) as error:
        return [(field, f"cannot read shard {key}: {error}")]
    if first is None:
        what = f".{image}" if image else "image"
        return [("data.image_column", f"shard {key} has no sample with an {what} member")]
    if label is not None and first.label is None:
        return [("data.label_column", f"the first sample of shard {key} has no .{label} member")]
    return []
