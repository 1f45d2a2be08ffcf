"""One process training a method from a job spec, for benchmarks and the results table.

It is one worker of ``workers.train_loop`` at ``resources.workers = 1`` (same split, same
sampler order, the global batch on one process) around the train loop's own set-up and step
(``workers.step.build_training``: optimizer, schedule, precision, augmentations), without
Ray, MLflow or checkpoints, so a benchmark times the method alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pipelines.spec import JobSpec, load_spec_text
from workers.data import ImageDataset, Split, load_data_section, split_dataset
from workers.step import Training, build_training

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_spec(method: str, **train: object) -> JobSpec:
    """examples/<method>-digits.yaml, with ``train`` fields overridden."""
    spec = load_spec_text((EXAMPLES / f"{method}-digits.yaml").read_text())
    return spec.model_copy(update={"train": spec.train.model_copy(update=train)})


@dataclass
class InProcess:
    """A spec's training in this process: its data, split and loader, and the train loop's
    ``Training`` (``training.method``, ``training.train_step``, ``training.step``)."""

    spec: JobSpec
    dataset: ImageDataset
    split: Split
    sampler: DistributedSampler
    loader: DataLoader
    training: Training

    def train_epoch(self, epoch: int, stop: Callable[[], bool] | None = None) -> float:
        """One epoch of the train loop's steps; the mean loss. ``stop``, asked after each
        step, ends the epoch early when it says so (a budget spent)."""
        self.sampler.set_epoch(epoch)
        self.training.model.train()
        losses = []
        for images, indices in self.loader:
            losses.append(self.training.train_step(images, indices)["loss"].item())
            if stop is not None and stop():
                break
        return sum(losses) / len(losses)


def in_process(spec: JobSpec, dataset: ImageDataset | None = None) -> InProcess:
    """``dataset``: already decoded images (a user's, decoded once), else the spec's builtin."""
    train = spec.train
    if dataset is None:
        dataset = load_data_section(spec.data.model_dump(mode="json"))  # with its options
    split = split_dataset(dataset, spec.data.test_fraction, spec.data.split_seed)
    train_images = dataset.images[split.train]
    sampler = DistributedSampler(
        TensorDataset(train_images), num_replicas=1, rank=0, seed=train.seed, drop_last=True
    )
    loader = DataLoader(
        TensorDataset(train_images, torch.arange(len(train_images))),
        batch_size=train.batch_size,
        sampler=sampler,
        drop_last=True,
    )
    training = build_training(
        spec,
        (dataset.in_channels, dataset.image_size),
        len(train_images),
        len(loader),
        torch.device("cpu"),
    )
    return InProcess(spec, dataset, split, sampler, loader, training)
