"""Datasets as in-memory sample tensors, and the fixed train/test split every stage shares.

Built-in sources ship with installed packages; nothing is downloaded:
- ``builtin:digits``: scikit-learn's 8x8 digits, labelled.
- ``builtin:patches``: random square patches of the natural photographs bundled with
  scikit-image and scikit-learn, grey or colour, optionally whitened; unlabelled, or labelled
  with the photograph each patch came from.
- ``builtin:spiral``: points on a noisy 2-D spiral, as vectors; unlabelled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split


@dataclass(frozen=True)
class SampleDataset:
    """Samples are images (N, C, H, W) or vectors (N, D). A vector counts as a 1x1 image with
    D channels (``in_channels`` D, ``image_size`` 1), so encoder configs describe both."""

    samples: torch.Tensor  # float32; images lie in [0, 1] unless whitened
    labels: torch.Tensor | None  # (N,) int64 for evaluation only; None when unlabelled

    @property
    def images(self) -> torch.Tensor:
        return self.samples

    @property
    def in_channels(self) -> int:
        return self.samples.shape[1]

    @property
    def image_size(self) -> int:
        return self.samples.shape[-1] if self.samples.dim() == 4 else 1


# The name evaluation code imports; every dataset is a SampleDataset.
ImageDataset = SampleDataset


def _digits() -> SampleDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797,1,8,8)
    return SampleDataset(samples=images, labels=torch.from_numpy(bunch.target.astype(np.int64)))


def natural_images(colour: bool = False) -> list[np.ndarray]:
    """The bundled natural photographs as float64 arrays in [0, 1], always in this order:
    scikit-image's (those that need no download) and scikit-learn's two sample images. Grey
    (H, W) by default; with ``colour``, RGB (H, W, 3), the grey ``camera`` repeated over the
    three channels."""
    import skimage.data
    from skimage.color import rgb2gray
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "camera", "chelsea", "coffee", "rocket")
    pictures = [getattr(skimage.data, name)() for name in names]
    pictures += list(load_sample_images().images)
    if colour:
        rgb = [p if p.ndim == 3 else np.repeat(p[..., None], 3, axis=2) for p in pictures]
        return [np.asarray(p, dtype=np.float64) / 255.0 for p in rgb]
    grey = [rgb2gray(p) if p.ndim == 3 else p / 255.0 for p in pictures]
    return [np.asarray(g, dtype=np.float64) for g in grey]


def zca_whiten(patches: np.ndarray, epsilon: float) -> np.ndarray:
    """Remove each patch's mean, then ZCA-whiten: x <- U diag(1/sqrt(s + eps)) U^T x, with
    U s U^T the patch covariance. ``epsilon`` (relative to the mean eigenvalue) keeps the
    noisy highest frequencies from being blown up. Shapes: (N, D) -> (N, D)."""
    centred = patches - patches.mean(axis=1, keepdims=True)
    covariance = centred.T @ centred / len(centred)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    damping = epsilon * eigenvalues.mean()
    transform = (
        eigenvectors @ np.diag(1.0 / np.sqrt(eigenvalues.clip(0) + damping)) @ eigenvectors.T
    )
    return centred @ transform


def _patches(
    size: int = 8,
    count: int = 20000,
    seed: int = 0,
    whiten: bool = False,
    channels: int = 1,
    labelled: bool = False,
) -> SampleDataset:
    """``count`` patches of ``size`` x ``size``, spread evenly over the photographs, at
    positions drawn from ``seed``: samples (count, channels, size, size), grey for
    ``channels`` 1, RGB for 3. The positions depend on ``seed`` only, so patch i of a colour
    set is patch i of the grey set in colour. Whitening is ZCA over the flattened
    channels * size * size vector, then a rescale to unit variance per pixel. ``labelled``:
    labels (count,) int64, the index of the photograph each patch was cut from (one class per
    photograph); otherwise None."""
    if channels not in (1, 3):
        raise ValueError(f"patches have 1 (grey) or 3 (RGB) channels, not {channels}")
    rng = np.random.default_rng(seed)
    pictures = natural_images(colour=channels == 3)
    per_picture = [
        count // len(pictures) + (i < count % len(pictures)) for i in range(len(pictures))
    ]
    patches = []
    for picture, number in zip(pictures, per_picture, strict=True):
        rows = rng.integers(0, picture.shape[0] - size + 1, number)
        cols = rng.integers(0, picture.shape[1] - size + 1, number)
        patches += [picture[r : r + size, c : c + size] for r, c in zip(rows, cols, strict=True)]
    stacked = np.stack(patches)  # (count, size, size), or (count, size, size, 3) in colour
    if channels == 3:
        stacked = np.moveaxis(stacked, -1, 1)  # channels first, as torch lays images out
    flat = stacked.reshape(count, channels * size * size)
    if whiten:
        flat = zca_whiten(flat, epsilon=1.0)
        flat = flat / flat.std()
    samples = torch.from_numpy(flat.astype(np.float32)).view(count, channels, size, size)
    # Patches are stacked photograph by photograph, so the labels are runs of each index.
    photograph = np.repeat(np.arange(len(pictures), dtype=np.int64), per_picture)
    return SampleDataset(samples=samples, labels=torch.from_numpy(photograph) if labelled else None)


def _spiral(count: int = 2000, noise: float = 0.02, seed: int = 0) -> SampleDataset:
    """One arm of an Archimedean spiral, two turns, scaled into [-1, 1]^2, with Gaussian noise
    of std ``noise``: the 2-D data the energy-based-model lectures draw landscapes over."""
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.uniform(0.05, 1.0, count))  # uniform along the arm's length, roughly
    angle = 4.0 * math.pi * t
    points = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1)
    points += noise * rng.standard_normal(points.shape)
    return SampleDataset(samples=torch.from_numpy(points.astype(np.float32)), labels=None)


_BUILTIN: dict[str, Callable[..., SampleDataset]] = {
    "digits": _digits,
    "patches": _patches,
    "spiral": _spiral,
}


def load_dataset(source: str, options: Mapping[str, Any] | None = None) -> SampleDataset:
    """Load a data source named as in the spec (``builtin:digits``), with its options (the
    spec's ``data.patches`` / ``data.spiral`` section; defaults when None)."""
    scheme, _, name = source.partition(":")
    if scheme != "builtin" or name not in _BUILTIN:
        raise ValueError(f"unknown data source {source!r}")
    return _BUILTIN[name](**(options or {}))


def load_data_section(data: Mapping[str, Any]) -> SampleDataset:
    """The dataset a job spec's ``data`` section (as JSON) names; a source's options sit
    under its name (``data.patches``)."""
    return load_dataset(data["source"], data.get(data["source"].partition(":")[2]))


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # indices into the dataset
    test: np.ndarray


def split_indices(labels: torch.Tensor, test_fraction: float, seed: int) -> Split:
    """A stratified split fixed by ``seed``: pretraining sees ``train`` only, and every
    evaluation of every encoder uses the same two halves."""
    indices = np.arange(len(labels))
    train, test = train_test_split(
        indices, test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    return Split(train=np.sort(train), test=np.sort(test))


def split_samples(
    count: int, labels: torch.Tensor | None, test_fraction: float, seed: int
) -> Split:
    """``split_indices`` for ``count`` labelled samples; a seeded unstratified split (same
    sizes) for unlabelled ones."""
    if labels is not None:
        return split_indices(labels, test_fraction, seed)
    train, test = train_test_split(np.arange(count), test_size=test_fraction, random_state=seed)
    return Split(train=np.sort(train), test=np.sort(test))


def split_dataset(dataset: SampleDataset, test_fraction: float, seed: int) -> Split:
    return split_samples(len(dataset.samples), dataset.labels, test_fraction, seed)
