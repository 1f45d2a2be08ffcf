"""What each Ray Train worker runs: its data shard, augmentations on the device, the method's
step under DDP, a checkpoint every epoch, and (rank 0 only) metrics to MLflow."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from workers import dist
from workers.augment import build_augment
from workers.data import load_data_section, split_dataset
from workers.encoders import backbone_config, build_encoder
from workers.export import save_encoder
from workers.methods import Batch, Method, build_method
from workers.tracking import RunLogger

STATE_FILE = "state.pt"
ENCODER_DIR = "encoder"
REFERENCE_FILE = "reference.safetensors"
# How many held-out images the final checkpoint keeps with their features, so that a loaded
# encoder can be checked against the one that finished training.
REFERENCE_IMAGES = 32
# Training samples handed to Method.figures at the end of training.
FIGURE_SAMPLES = 512


def _lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero, per optimizer step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(train: dict[str, Any], model: torch.nn.Module) -> torch.optim.Optimizer:
    # One group even when it is empty: closed-form methods (k-means, PCA) have nothing to step.
    params, lr, decay = [{"params": list(model.parameters())}], train["lr"], train["weight_decay"]
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=decay)
    if train["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=decay)


def _save_checkpoint(
    directory: Path,
    method: Method,
    state: dict[str, Any],
    reference_images: torch.Tensor | None,
) -> None:
    torch.save({"method": method.state_dict(), **state}, directory / STATE_FILE)
    encoder = method.encoder()
    save_encoder(directory / ENCODER_DIR, encoder)
    if reference_images is not None:
        was_training = encoder.training
        encoder.eval()
        with torch.no_grad():
            features = encoder(reference_images)
        encoder.train(was_training)
        save_file(
            {
                "images": reference_images.cpu().contiguous(),
                "features": features.cpu().contiguous(),
            },
            str(directory / REFERENCE_FILE),
        )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    spec, train = config["spec"], config["spec"]["train"]
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(train["seed"])  # identical initial weights on every rank

    dataset = load_data_section(spec["data"])
    split = split_dataset(dataset, spec["data"]["test_fraction"], spec["data"]["split_seed"])
    train_images = dataset.images[split.train]
    shard = DistributedSampler(
        TensorDataset(train_images),
        num_replicas=world,
        rank=rank,
        shuffle=True,
        seed=train["seed"],
        drop_last=True,
    )
    # Every step needs equal-sized batches on all ranks (the global negatives are gathered).
    loader = DataLoader(
        TensorDataset(train_images, torch.arange(len(train_images))),
        batch_size=train["batch_size"] // world,
        sampler=shard,
        drop_last=True,
    )
    if len(loader) == 0:
        raise ValueError(
            f"train.batch_size {train['batch_size']} is larger than the {len(train_images)} "
            "training images: no full batch can be formed"
        )

    encoder_config = backbone_config(
        spec["encoder"]["arch"], dataset.in_channels, dataset.image_size, spec["encoder"]["out_dim"]
    )
    method = build_method(
        spec["method"], build_encoder(encoder_config), encoder_config["out_dim"], len(train_images)
    )
    # Closed-form methods learn inside forward from statistics summed over ranks: without a
    # trainable parameter there is nothing for DDP to synchronise.
    trainable = any(parameter.requires_grad for parameter in method.parameters())
    model = ray.train.torch.prepare_model(method, parallel_strategy="ddp" if trainable else None)
    optimizer = _optimizer(train, model)
    total_steps = train["epochs"] * len(loader)
    warmup_steps = train["warmup_epochs"] * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, warmup_steps, total_steps)
    )
    augment = build_augment(spec["augment"]["preset"], dataset.image_size, train["seed"], rank)

    start_epoch, global_step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]

    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    if logger and checkpoint:
        logger.log({"train.resumed_from_epoch": start_epoch - 1}, step=global_step)
    reference_images = dataset.images[split.test[:REFERENCE_IMAGES]].to(device)
    if checkpoint and start_epoch >= train["epochs"]:
        # An earlier attempt finished training but not the job: hand its final checkpoint on.
        ray.train.report(
            {"epoch": start_epoch - 1, "step": global_step},
            checkpoint=checkpoint if rank == 0 else None,
        )
        return

    for epoch in range(start_epoch, train["epochs"]):
        shard.set_epoch(epoch)
        model.train()
        epoch_start, loss_sum = time.perf_counter(), torch.zeros((), device=device)
        for images, indices in loader:
            batch = Batch(
                images.to(device), indices.to(device), global_step, augment, train["seed"]
            )
            outputs = model(batch)
            loss = outputs["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {global_step}: diverged")
            optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
            optimizer.step()
            scheduler.step()
            method.after_optimizer_step()
            global_step += 1
            loss_sum += loss.detach()
            if logger and global_step % train["log_every_steps"] == 0:
                extra = {
                    f"train.{key}": value.item() for key, value in outputs.items() if key != "loss"
                }
                logger.log(
                    {
                        "train.loss": loss.item(),
                        "train.lr": scheduler.get_last_lr()[0],
                        "train.step": global_step,
                        **extra,
                    },
                    step=global_step,
                )
        elapsed = time.perf_counter() - epoch_start
        epoch_loss = dist.all_reduce_mean(loss_sum / len(loader)).item()
        metrics = {
            "epoch": epoch,
            "step": global_step,
            "loss": epoch_loss,
            "samples_per_sec": len(loader) * train["batch_size"] / elapsed,
        }
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "global_step": global_step,
        }
        last = epoch == train["epochs"] - 1
        with tempfile.TemporaryDirectory() as directory:
            report_checkpoint = None
            if rank == 0:
                _save_checkpoint(
                    Path(directory),
                    method,
                    state,
                    reference_images if last else None,
                )
                report_checkpoint = ray.train.Checkpoint.from_directory(directory)
                logger.log(
                    {
                        "train.epoch": epoch,
                        "train.epoch_loss": epoch_loss,
                        "train.samples_per_sec": metrics["samples_per_sec"],
                    },
                    step=global_step,
                )
            ray.train.report(metrics, checkpoint=report_checkpoint)
    if logger:
        _log_figures(logger, method, train_images[:FIGURE_SAMPLES].to(device))


def _log_figures(logger: RunLogger, method: Method, data: torch.Tensor) -> None:
    was_training = method.training
    method.eval()
    with torch.no_grad():
        figures = method.figures(data)
    method.train(was_training)
    for name, image in figures.items():
        logger.log_image(image, f"figures/{name}")
