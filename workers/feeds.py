"""Where a worker's training batches come from: a builtin dataset in memory (each rank a
``DistributedSampler``'s share), or a user's images streamed by Ray Data (each rank the shard
Ray Train's ``streaming_split(equal=True)`` hands it).

Both feeds give float images in [0, 1] on the device with their position in the training
split, the same number of batches on every rank (the steps gather across ranks), and a few
fixed images for the reference features, the pictures and the collapse statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import ray
import ray.train
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pipelines.spec import JobSpec
from workers.data import load_data_section, split_dataset
from workers.images import StreamedImages

# How many held-out images the final checkpoint keeps with their features, so that a loaded
# encoder can be checked against the one that finished training.
REFERENCE_IMAGES = 32
# Training samples handed to Method.figures at the end of training, and embedded each epoch
# for the collapse statistics.
FIGURE_SAMPLES = 512
# A streamed epoch shuffles rows within a buffer of this many batches (blocks arrive in a
# fixed, seeded order).
SHUFFLE_BATCHES = 8

Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, C, S, S) float, positions (B,) int64


@dataclass(frozen=True)
class BadSampleCount:
    """Unreadable training images met so far, and how many the job allows."""

    count: int
    examples: list[str]
    allowed: int

    @property
    def exceeded(self) -> bool:
        return self.count > self.allowed


class Feed:
    """The interface of both feeds; ``shape`` is (channels, side)."""

    shape: tuple[int, int]
    train_count: int
    steps_per_epoch: int
    reference: torch.Tensor
    sample: torch.Tensor

    def batches(self, epoch: int) -> Iterator[Batch]:
        raise NotImplementedError

    def bad_samples(self) -> BadSampleCount | None:
        """None where every sample is already decoded (builtins)."""
        return None


def _no_full_batch(batch_size: int, images: int) -> ValueError:
    return ValueError(
        f"train.batch_size {batch_size} is larger than the {images} training images: no full "
        "batch can be formed"
    )


class MemoryFeed(Feed):
    def __init__(self, spec: JobSpec, rank: int, world: int, device: torch.device) -> None:
        dataset = load_data_section(spec.data.model_dump(mode="json"))
        split = split_dataset(dataset, spec.data.test_fraction, spec.data.split_seed)
        train_images = dataset.images[split.train]
        self.sampler = DistributedSampler(
            TensorDataset(train_images),
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=spec.train.seed,
            drop_last=True,
        )
        self.loader = DataLoader(
            TensorDataset(train_images, torch.arange(len(train_images))),
            batch_size=spec.train.batch_size // world,
            sampler=self.sampler,
            drop_last=True,
        )
        if len(self.loader) == 0:
            raise _no_full_batch(spec.train.batch_size, len(train_images))
        self.device = device
        self.shape = (dataset.in_channels, dataset.image_size)
        self.train_count, self.steps_per_epoch = len(train_images), len(self.loader)
        self.reference = dataset.images[split.test[:REFERENCE_IMAGES]].to(device)
        self.sample = train_images[:FIGURE_SAMPLES].to(device)

    def batches(self, epoch: int) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch)
        for images, positions in self.loader:
            yield images.to(self.device), positions.to(self.device)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


class StreamFeed(Feed):
    def __init__(
        self, spec: JobSpec, images: StreamedImages, world: int, device: torch.device
    ) -> None:
        self.shard = ray.train.get_dataset_shard(images.dataset)
        self.per_rank, self.seed = spec.train.batch_size // world, spec.train.seed
        self.images, self.device = images, device
        self.shape = (images.channels, images.side)
        self.train_count = images.train_count
        # Unreadable images make an epoch a little shorter; the schedule is set by this count.
        self.steps_per_epoch = images.train_count // world // self.per_rank
        if self.steps_per_epoch == 0:
            raise _no_full_batch(spec.train.batch_size, images.train_count)
        self.reference = _as_float(torch.from_numpy(images.reference)).to(device)
        self.sample = _as_float(torch.from_numpy(images.sample)).to(device)

    def batches(self, epoch: int) -> Iterator[Batch]:
        rows = self.shard.iter_torch_batches(
            batch_size=self.per_rank,
            drop_last=True,
            local_shuffle_buffer_size=SHUFFLE_BATCHES * self.per_rank,
            local_shuffle_seed=(self.seed * 100_003 + epoch) % 2**31,
            device=self.device,
        )
        for batch in rows:
            yield _as_float(batch["image"]), batch["position"]

    def bad_samples(self) -> BadSampleCount:
        count, examples = ray.get(self.images.bad.summary.remote())
        return BadSampleCount(count, examples, self.images.max_bad)


def make_feed(
    spec: JobSpec, images: StreamedImages | None, rank: int, world: int, device: torch.device
) -> Feed:
    if images is None:
        return MemoryFeed(spec, rank, world, device)
    return StreamFeed(spec, images, world, device)
