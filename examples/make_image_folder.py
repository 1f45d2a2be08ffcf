"""Write an image-folder dataset made from the photographs and textures that ship with
scikit-image and scikit-learn: one class folder per source picture, each image a crop at a
random position and scale, sometimes flipped, saved as PNG or JPEG. Grey pictures stay grey
(the loader expands them), and crops come out at a few sizes (the loader resizes them).

    python examples/make_image_folder.py /data/example-images --per-class 200

then point a spec at it: ``data: {source: "file:///data/example-images"}``
(examples/simclr-folder.yaml). ``--format parquet`` writes the same images as Parquet shards
(columns ``image``: the encoded bytes, ``label``: the class), ``--format webdataset`` as
WebDataset tars (``000017.png`` beside ``000017.cls``), both in a seeded order that mixes the
classes. Nothing is downloaded: every picture is bundled with a package.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image


def _pictures() -> dict[str, Callable[[], np.ndarray]]:
    """Class name -> a loader of one bundled picture (H, W) or (H, W, 3), uint8."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    pictures: dict[str, Callable[[], np.ndarray]] = {
        name: getattr(data, name)
        for name in (
            "astronaut",
            "coffee",
            "chelsea",
            "rocket",
            "hubble_deep_field",
            "immunohistochemistry",
            "retina",
            "camera",
            "brick",
            "grass",
            "gravel",
            "coins",
        )
    }
    for name in ("china", "flower"):
        pictures[name] = lambda name=name: load_sample_image(f"{name}.jpg")
    return pictures


CLASSES = tuple(_pictures())
# Output sides, mixed so that the loader's resize is exercised.
SIDES = (48, 64, 80)


def _crop(picture: np.ndarray, side: int, rng: np.random.Generator) -> Image.Image:
    height, width = picture.shape[:2]
    crop = int(min(height, width) * rng.uniform(0.15, 0.5))
    top, left = rng.integers(0, height - crop + 1), rng.integers(0, width - crop + 1)
    image = Image.fromarray(picture[top : top + crop, left : left + crop])
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image.resize((side, side), Image.Resampling.BILINEAR)


def generate_images(
    per_class: int, seed: int = 0, classes: tuple[str, ...] = CLASSES
) -> Iterator[tuple[str, bytes]]:
    """(key, encoded bytes) for ``per_class`` crops of each class: ``astronaut/0007.png``."""
    pictures = _pictures()
    rng = np.random.default_rng(seed)
    for name in classes:
        picture = pictures[name]()
        for number in range(per_class):
            image = _crop(picture, int(rng.choice(SIDES)), rng)
            encoded = io.BytesIO()
            suffix = "png" if number % 2 == 0 else "jpg"
            image.save(encoded, format="PNG" if suffix == "png" else "JPEG", quality=90)
            yield f"{name}/{number:04d}.{suffix}", encoded.getvalue()


def write_image_folder(
    root: Path, per_class: int, seed: int = 0, classes: tuple[str, ...] = CLASSES
) -> int:
    """Write the dataset under ``root``; returns how many images were written."""
    count = 0
    for key, encoded in generate_images(per_class, seed, classes):
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded)
        count += 1
    return count


def shuffled(images: Iterable[tuple[str, bytes]], seed: int) -> list[tuple[str, bytes]]:
    """The images in a seeded order, so that each shard mixes the classes."""
    listed = list(images)
    return [listed[i] for i in np.random.default_rng(seed).permutation(len(listed))]


def write_parquet_shards(
    root: Path, images: list[tuple[str, bytes]], per_shard: int = 1000, row_group: int = 250
) -> int:
    """Parquet shards ``shard-00000.parquet`` ... under ``root``, ``per_shard`` images each
    in row groups of ``row_group``, the class (the key's folder) in ``label``; returns how
    many images were written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, len(images), per_shard)):
        chunk = images[start : start + per_shard]
        table = pa.table(
            {
                "image": pa.array([data for _, data in chunk], pa.binary()),
                "label": [key.partition("/")[0] for key, _ in chunk],
            }
        )
        pq.write_table(table, root / f"shard-{number:05d}.parquet", row_group_size=row_group)
    return len(images)


def write_tar_shards(root: Path, images: list[tuple[str, bytes]], per_shard: int = 1000) -> int:
    """WebDataset shards ``shard-00000.tar`` ... under ``root``: per image ``<n>.png`` (or
    ``.jpg``) and ``<n>.cls`` with its class (the key's folder); returns how many images were
    written."""
    root.mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, len(images), per_shard)):
        with tarfile.open(root / f"shard-{number:05d}.tar", "w") as tar:
            for offset, (key, data) in enumerate(images[start : start + per_shard]):
                sample = f"{start + offset:06d}"
                label = key.partition("/")[0].encode()
                for name, payload in (
                    (f"{sample}.{key.rpartition('.')[2]}", data),
                    (f"{sample}.cls", label),
                ):
                    member = tarfile.TarInfo(name)
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))
    return len(images)


SHARD_WRITERS = {"parquet": write_parquet_shards, "webdataset": write_tar_shards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--per-class", type=int, default=200, help="images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=["folder", *SHARD_WRITERS], default="folder")
    arguments = parser.parse_args()
    if arguments.format == "folder":
        count = write_image_folder(arguments.root, arguments.per_class, arguments.seed)
    else:
        images = shuffled(generate_images(arguments.per_class, arguments.seed), arguments.seed)
        count = SHARD_WRITERS[arguments.format](arguments.root, images)
    print(f"wrote {count} images in {len(CLASSES)} classes under {arguments.root.resolve()}")
    print(f'train on it with data: {{source: "file://{arguments.root.resolve()}"}}')


if __name__ == "__main__":
    main()
