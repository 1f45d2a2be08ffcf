"""Users' image sources without a cluster: URI parsing (hypothesis), listing into a catalog
with class folders, decoding any image into the spec's shape, and the evaluation subset."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from pipelines import user_data
from pipelines.sources import Catalog, ImageSource, source_problems
from workers.images import _UNREADABLE, decode_image, load_images

BUCKET_NAME = st.from_regex(r"[a-z0-9][a-z0-9-]{2,20}[a-z0-9]", fullmatch=True)
PREFIX = st.lists(st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True), max_size=3)


@given(st.text(max_size=60))
def test_any_text_parses_or_gets_a_value_error(text: str) -> None:
    try:
        source = ImageSource.parse(text)
    except ValueError as error:
        assert str(error)
    else:
        assert source.scheme in ("file", "s3") and source.uri == text


@given(BUCKET_NAME, PREFIX, st.booleans())
def test_an_s3_uri_names_its_bucket_and_a_folder_prefix(
    bucket: str, parts: list[str], slash: bool
) -> None:
    prefix = "/".join(parts) + ("/" if slash and parts else "")
    source = ImageSource.parse(f"s3://{bucket}/{prefix}")
    assert source.root == bucket
    assert source.prefix == (prefix.rstrip("/") + "/" if parts else "")


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("s3://AKIA:secret@bucket/images/", "credentials"),
        ("s3://bucket/images/?X-Amz-Signature=abc", "credentials"),
        ("file://relative/images", "three slashes"),
        ("s3:///images/", "names no bucket"),
        ("https://example.com/images/", "not a file:// or s3:// URI"),
    ],
)
def test_uris_that_cannot_name_a_source_are_refused(uri: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ImageSource.parse(uri)


def _encoded(mode: str, size: tuple[int, int], fmt: str = "PNG") -> bytes:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], channels), np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
    encoded = io.BytesIO()
    image.save(encoded, format=fmt)
    return encoded.getvalue()


@given(
    st.sampled_from(["L", "RGB", "RGBA"]),
    st.integers(1, 200),
    st.integers(1, 200),
    st.sampled_from([1, 3]),
    st.sampled_from([4, 17, 32]),
)
def test_any_image_decodes_to_the_spec_shape(
    mode: str, width: int, height: int, channels: int, side: int
) -> None:
    decoded = decode_image(_encoded(mode, (width, height)), side, channels)
    assert decoded.shape == (channels, side, side) and decoded.dtype == np.uint8


def test_a_grey_image_becomes_three_equal_channels() -> None:
    decoded = decode_image(_encoded("L", (40, 30), "JPEG"), 16, 3)
    assert np.array_equal(decoded[0], decoded[1]) and np.array_equal(decoded[1], decoded[2])


@pytest.mark.parametrize(
    "data", [b"", b"not an image", _encoded("RGB", (20, 20))[:60], b"\xff\xd8\xff\xe0junk"]
)
def test_files_that_are_not_whole_images_raise_a_decode_error(data: bytes) -> None:
    with pytest.raises(_UNREADABLE):
        decode_image(data, 8, 3)


def _tree(root: Path, files: dict[str, bytes]) -> ImageSource:
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return ImageSource.parse(f"file://{root}")


def test_class_folders_become_labels_and_non_images_are_skipped(tmp_path: Path) -> None:
    png = _encoded("RGB", (12, 12))
    source = _tree(
        tmp_path,
        {
            "dogs/b.png": png,
            "cats/a.PNG": png,
            "cats/z.jpg": png,
            "cats/notes.txt": b"x",
            "dogs/.hidden.png": png,
        },
    )
    catalog = Catalog.list(source)
    assert catalog.keys == ["cats/a.PNG", "cats/z.jpg", "dogs/b.png"]  # sorted: global indices
    assert catalog.classes == ["cats", "dogs"] and catalog.labels == [0, 0, 1]
    images, kept = load_images(catalog, np.array([2, 0]), 8, 3)
    assert images.shape == (2, 3, 8, 8) and kept.tolist() == [2, 0]


def test_an_image_outside_class_folders_means_no_labels(tmp_path: Path) -> None:
    png = _encoded("RGB", (12, 12))
    catalog = Catalog.list(_tree(tmp_path, {"a/1.png": png, "top.png": png}))
    assert catalog.labels is None and len(catalog.keys) == 2


def test_folder_problems_name_the_field(tmp_path: Path) -> None:
    (tmp_path / "file.png").write_bytes(b"x")
    assert "does not exist" in source_problems(f"file://{tmp_path}/nope", "data.source")[0][1]
    ((field, message),) = source_problems(f"file://{tmp_path}/file.png", "evaluate.data")
    assert field == "evaluate.data" and "is not a folder" in message
    assert source_problems(f"file://{tmp_path}", "data.source") == []


def test_the_evaluation_subset_keeps_every_class_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(user_data, "EVAL_MAX_IMAGES", 100)
    labels = [0] * 800 + [1] * 200  # 4:1
    chosen = user_data._subset(np.arange(1000), labels, seed=0)
    counts = np.bincount(np.asarray(labels)[chosen])
    assert counts.tolist() == [80, 20]
    assert np.array_equal(chosen, user_data._subset(np.arange(1000), labels, seed=0))
    assert len(user_data._subset(np.arange(50), labels, seed=0)) == 50
