"""Datasets as in-memory image tensors, and the fixed train/test split every stage shares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split


@dataclass(frozen=True)
class ImageDataset:
    images: torch.Tensor  # (N, C, H, W), float32 in [0, 1]
    labels: torch.Tensor  # (N,), int64; used by evaluation only, never by pretraining

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]


def _digits() -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797,1,8,8)
    return ImageDataset(images=images, labels=torch.from_numpy(bunch.target.astype(np.int64)))


_BUILTIN = {"digits": _digits}


def load_dataset(source: str) -> ImageDataset:
    """Load a data source named as in the spec (``builtin:digits``)."""
    scheme, _, name = source.partition(":")
    if scheme != "builtin" or name not in _BUILTIN:
        raise ValueError(f"unknown data source {source!r}")
    return _BUILTIN[name]()


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
