"""Shard sets (pipelines/shards.py) listed and read from a folder and from moto's S3 server:
every sample gets one global index in set order, pieces hold exactly their samples, labels
come from the label column or the ``.cls`` members, scattered reads come back in the order
asked for, and the submit check names a missing column from the first shard alone."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.make_image_folder import (
    generate_images,
    shuffled,
    write_parquet_shards,
    write_tar_shards,
)
from pipelines.shards import _tar_samples
from pipelines.sources import Catalog, ImageSource, source_problems
from tests.s3 import S3Endpoint
from tests.user_images import rgba_png
from workers.images import load_images

CLASSES = ("coins", "camera", "grass")
WRITERS = {"parquet": write_parquet_shards, "webdataset": write_tar_shards}


def _images(per_class: int) -> list[tuple[str, bytes]]:
    return shuffled(generate_images(per_class, seed=3, classes=CLASSES), seed=3)


def _catalog_of(kind: str, root: Path) -> tuple[Catalog, int]:
    count = WRITERS[kind](root, _images(10), per_shard=12)
    return Catalog.list(ImageSource.parse(f"file://{root}")), count


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_every_sample_has_one_index_and_its_class(kind: str, tmp_path: Path) -> None:
    catalog, count = _catalog_of(kind, tmp_path)
    assert len(catalog.keys) == count == 30 and catalog.classes == sorted(CLASSES)
    shards = catalog.shards
    assert shards is not None and shards.kind == kind
    read = [(index, name) for piece in shards.pieces for index, name, _ in shards.read_piece(piece)]
    # Pieces in set order cover every index once, under the catalog's names.
    assert read == list(enumerate(catalog.keys)) and len(read) == count
    # The label of each sample is the class its image was cut from.
    per_class = {name: catalog.labels.count(number) for number, name in enumerate(catalog.classes)}
    assert per_class == dict.fromkeys(CLASSES, 10)


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_scattered_reads_come_back_in_the_order_asked(kind: str, tmp_path: Path) -> None:
    catalog, _ = _catalog_of(kind, tmp_path)
    wanted = np.array([29, 0, 13, 7, 12])
    images, kept = load_images(catalog, wanted, 16, 3)
    assert kept.tolist() == wanted.tolist() and images.shape == (5, 3, 16, 16)
    every, _ = load_images(catalog, np.arange(30), 16, 3)
    np.testing.assert_array_equal(images, every[wanted])


def test_parquet_row_groups_are_pieces_and_struct_columns_are_read(tmp_path: Path) -> None:
    """A Hugging Face layout (image: struct of bytes and path), rows of 4 per group, a null
    image, and an integer label column named explicitly."""
    good = rgba_png(0)
    images = [{"bytes": good, "path": f"{i}.png"} for i in range(9)] + [None]
    table = pa.table({"img": images, "y": list(range(10))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=4)
    catalog = Catalog.list(ImageSource.parse(f"file://{tmp_path}"), "img", "y")
    assert [(p.start, p.rows, p.row_group) for p in catalog.shards.pieces] == [
        (0, 4, 0),
        (4, 4, 1),
        (8, 2, 2),
    ]
    assert catalog.keys[9] == "a.parquet#9" and catalog.classes[:3] == ["0", "1", "2"]
    _, kept = load_images(catalog, np.arange(10), 8, 3)
    assert kept.tolist() == list(range(9))  # the null image is unreadable, not an error


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    encoded = io.BytesIO()
    with tarfile.open(fileobj=encoded, mode="w") as tar:
        for name, payload in members:
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    return encoded.getvalue()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["png", "jpg", "seg.png"]),
            st.sampled_from([None, "cat", "dog"]),
        ),
        max_size=12,
    )
)
def test_tar_members_group_into_samples(samples: list[tuple[str, str | None]]) -> None:
    """Consecutive members named alike are one sample; a sample's image is its first image
    member whatever the order; the offsets point at that image's bytes."""
    members = []
    for number, (extension, label) in enumerate(samples):
        if label is not None:
            members.append((f"dir/{number:04d}.cls", label.encode()))
        members.append((f"dir/{number:04d}.{extension}", f"image {number}".encode()))
    data = _tar(members)
    found = list(_tar_samples(io.BytesIO(data), None, "cls", read=True))
    # "seg.png" is not an image extension of its own: those samples have no image.
    expected = [(n, label) for n, (ext, label) in enumerate(samples) if ext != "seg.png"]
    assert [(int(s.name[4:]), s.label) for s in found] == expected
    for sample in found:
        assert data[sample.offset : sample.offset + sample.size] == sample.data
        assert sample.data == f"image {int(sample.name[4:])}".encode()


def test_one_source_is_image_files_or_one_kind_of_shard(tmp_path: Path) -> None:
    write_parquet_shards(tmp_path, _images(2))
    (tmp_path / "extra.tar").write_bytes(_tar([("0.png", rgba_png(1))]))
    with pytest.raises(ValueError, match="mixes image files, Parquet and tar shards"):
        Catalog.list(ImageSource.parse(f"file://{tmp_path}"))


@pytest.mark.parametrize(
    ("kind", "columns", "field", "message"),
    [
        ("parquet", {"image_column": "jpeg"}, "data.image_column", "has no column 'jpeg'"),
        ("parquet", {"label_column": "class"}, "data.label_column", "has no column 'class'"),
        ("webdataset", {"image_column": "webp"}, "data.image_column", "no sample with an .webp"),
        ("webdataset", {"label_column": "txt"}, "data.label_column", "has no .txt member"),
    ],
)
def test_a_missing_column_is_named_at_submit(
    kind: str, columns: dict[str, str], field: str, message: str, tmp_path: Path
) -> None:
    WRITERS[kind](tmp_path, _images(2))
    (problem,) = source_problems(f"file://{tmp_path}", "data.source", **columns)
    assert problem[0] == field and message in problem[1], problem
    assert source_problems(f"file://{tmp_path}", "data.source") == []


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_shards_on_s3_read_like_local_ones(kind: str, s3: S3Endpoint, tmp_path: Path) -> None:
    local, count = _catalog_of(kind, tmp_path)
    client, bucket = s3.client(), f"shards-{kind}"
    client.create_bucket(Bucket=bucket)
    for path in tmp_path.iterdir():
        client.upload_file(str(path), bucket, f"set/{path.name}")
    remote = Catalog.list(ImageSource.parse(f"s3://{bucket}/set/"))
    assert remote.keys == local.keys and remote.labels == local.labels
    wanted = np.array([3, 25, 14])
    np.testing.assert_array_equal(
        load_images(remote, wanted, 16, 3)[0], load_images(local, wanted, 16, 3)[0]
    )
    assert source_problems(f"s3://{bucket}/set/", "data.source", image_column="nope") != []
    assert count == 30
