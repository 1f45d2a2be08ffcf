"""Write an image-folder dataset made from the photographs and textures that ship with
scikit-image and scikit-learn: one class folder per source picture, each image a crop at a
random position and scale, sometimes flipped, saved as PNG or JPEG. Grey pictures stay grey
(the loader expands them), and crops come out at a few sizes (the loader resizes them).

    python examples/make_image_folder.py /data/example-images --per-class 200

then point a spec at it: ``data: {source: "file:///data/example-images"}``
(examples/simclr-folder.yaml). Nothing is downloaded: every picture is bundled with a package.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable, Iterator
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--per-class", type=int, default=200, help="images per class")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    count = write_image_folder(arguments.root, arguments.per_class, arguments.seed)
    print(f"wrote {count} images in {len(CLASSES)} classes under {arguments.root.resolve()}")
    print(f'train on it with data: {{source: "file://{arguments.root.resolve()}"}}')


if __name__ == "__main__":
    main()
