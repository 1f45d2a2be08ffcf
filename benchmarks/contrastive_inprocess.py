"""One process training a method from a job spec, for benchmarks and the results table.

It mirrors one worker of ``workers.train_loop`` at ``resources.workers = 1`` (same split,
same sampler order, same optimizer, schedule and augmentations, the global batch on one
process) without Ray, MLflow or checkpoints, so a benchmark times the method alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pipelines.spec import JobSpec, load_spec_text
from workers.augment import Augment, build_augment
from workers.data import ImageDataset, Split, load_dataset, split_indices
from workers.encoders import backbone_config, build_encoder
from workers.methods import Batch, Method, build_method
from workers.train_loop import _lr_factor, _optimizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_spec(method: str, **train: object) -> JobSpec:
    """examples/<method>-digits.yaml, with ``train`` fields overridden."""
    spec = load_spec_text((EXAMPLES / f"{method}-digits.yaml").read_text())
    return spec.model_copy(update={"train": spec.train.model_copy(update=train)})


@dataclass
class Training:
    spec: JobSpec
    dataset: ImageDataset
    split: Split
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: DistributedSampler
    loader: DataLoader
    augment: Augment
    step: int = 0

    def train_step(self, images: torch.Tensor, indices: torch.Tensor) -> float:
        loss = self.method(Batch(images, indices, self.step, self.augment))["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.method.after_optimizer_step()
        self.step += 1
        return loss.item()

    def train_epoch(self, epoch: int) -> float:
        self.sampler.set_epoch(epoch)
        self.method.train()
        losses = [self.train_step(images, indices) for images, indices in self.loader]
        return sum(losses) / len(losses)


def build_training(spec: JobSpec) -> Training:
    train = spec.train
    torch.manual_seed(train.seed)
    dataset = load_dataset(spec.data.source)
    split = split_indices(dataset.labels, spec.data.test_fraction, spec.data.split_seed)
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
    encoder_config = backbone_config(
        spec.encoder.arch, dataset.in_channels, dataset.image_size, spec.encoder.out_dim
    )
    method = build_method(
        spec.model_dump(mode="json")["method"],
        build_encoder(encoder_config),
        spec.encoder.out_dim,
        len(train_images),
    )
    optimizer = _optimizer(spec.model_dump(mode="json")["train"], method)
    total_steps, warmup_steps = train.epochs * len(loader), train.warmup_epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, warmup_steps, total_steps)
    )
    augment = build_augment(spec.augment.preset, dataset.image_size, train.seed, 0)
    return Training(spec, dataset, split, method, optimizer, scheduler, sampler, loader, augment)
