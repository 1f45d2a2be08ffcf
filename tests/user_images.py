"""Users' images for the job tests: crops of bundled photographs at mixed sizes, grey and
colour, with an RGBA image and files that are not images, in a bucket on moto's S3 server,
and the spec of a small job on them."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from examples.make_image_folder import generate_images
from tests.s3 import S3Endpoint

CLASSES = ("astronaut", "brick", "coffee", "grass", "chelsea")  # brick and grass are grey
PER_CLASS = 40
BUCKET, PREFIX = "selfsup-images", "photos/"
# Not images, though named as images: random bytes, a PNG cut short, an empty file.
BROKEN = {
    "astronaut/broken-0.jpg": b"this is not a JPEG",
    "brick/broken-1.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 20,
    "coffee/broken-2.png": b"",
    "grass/broken-3.jpg": b"\xff\xd8\xff\xe0 truncated",
    "chelsea/broken-4.webp": b"RIFF....WEBP",
    "astronaut/broken-5.bmp": b"BM",
}


def rgba_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (45, 70, 4), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(encoded, format="PNG")
    return encoded.getvalue()


def job_document(name: str, method: dict, source: str, **data: object) -> dict:
    return {
        "name": name,
        "method": method,
        "encoder": {"arch": "small-convnet", "out_dim": 64},
        "data": {"source": source, "image_size": 32, "channels": 3, **data},
        "augment": {"preset": "simclr"},
        "train": {"epochs": 2, "batch_size": 64, "lr": 2e-3, "seed": 0, "log_every_steps": 1},
        # Two workers of half a CPU and one CPU for the decode tasks: the 2-CPU test stack.
        "resources": {"workers": 2, "cpus_per_worker": 0.5, "data_cpus": 1},
        "evaluate": {
            "linear": True,
            "knn": True,
            "label_fractions": [],
            "finetune": False,
            "baselines": False,
        },
        "register": {"model": name, "alias": "candidate"},
    }


def fill_bucket(s3: S3Endpoint) -> str:
    """The bucket's images, broken files included; returns the source URI."""
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    objects = dict(generate_images(PER_CLASS, seed=1, classes=CLASSES))
    objects |= BROKEN | {"grass/rgba.png": rgba_png(1)}
    for key, data in objects.items():
        client.put_object(Bucket=BUCKET, Key=PREFIX + key, Body=data)
    return f"s3://{BUCKET}/{PREFIX}"
