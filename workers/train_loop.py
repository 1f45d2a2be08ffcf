"""What each Ray Train worker runs: its data shard, augmentations on the device, the method's
step under DDP, a checkpoint every epoch, and (rank 0 only) metrics to MLflow."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from safetensors.torch import save_file

from pipelines.spec import JobSpec
from workers import dist
from workers.collapse import embedding_health
from workers.export import save_encoder
from workers.feeds import make_feed
from workers.methods import Method
from workers.step import Training, build_training
from workers.tracking import RunLogger

STATE_FILE = "state.pt"
ENCODER_DIR = "encoder"
REFERENCE_FILE = "reference.safetensors"


@contextlib.contextmanager
def _evaluating(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode and without autograd, then back to the mode it was in: the
    reference features, the collapse statistics and the pictures all read a training model."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _save_checkpoint(
    directory: Path, training: Training, epoch: int, reference_images: torch.Tensor | None
) -> None:
    torch.save({**training.state_dict(), "epoch": epoch}, directory / STATE_FILE)
    encoder = training.method.encoder()
    save_encoder(directory / ENCODER_DIR, encoder)
    if reference_images is not None:
        with _evaluating(encoder):
            features = encoder(reference_images)
        save_file(
            {
                "images": reference_images.cpu().contiguous(),
                "features": features.cpu().contiguous(),
            },
            str(directory / REFERENCE_FILE),
        )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """``config``: the job's ``spec`` (a JobSpec), its MLflow ``run_id`` and ``tracking_uri``,
    and for a user's images ``images`` (StreamedImages) beside the "train" dataset shard."""
    spec: JobSpec = config["spec"]
    train = spec.train
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()

    feed = make_feed(spec, config.get("images"), rank, world, device)

    def prepare(method: Method) -> torch.nn.Module:
        # Closed-form methods learn inside forward from statistics summed over ranks: without
        # a trainable parameter there is nothing for DDP to synchronise.
        trainable = any(parameter.requires_grad for parameter in method.parameters())
        return ray.train.torch.prepare_model(method, parallel_strategy="ddp" if trainable else None)

    training = build_training(
        spec, feed.shape, feed.train_count, feed.steps_per_epoch, device, rank, prepare
    )

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)
        training.load_state_dict(state)
        start_epoch = state["epoch"] + 1

    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    if logger and checkpoint:
        logger.log({"train.resumed_from_epoch": start_epoch - 1}, step=training.step)
    reference_images, sample = feed.reference, feed.sample
    if checkpoint and start_epoch >= train.epochs:
        # An earlier attempt finished training but not the job: hand its final checkpoint on.
        ray.train.report(
            {"epoch": start_epoch - 1, "step": training.step},
            checkpoint=checkpoint if rank == 0 else None,
        )
        return

    for epoch in range(start_epoch, train.epochs):
        training.model.train()
        epoch_start, loss_sum, steps = time.perf_counter(), torch.zeros((), device=device), 0
        for images, positions in feed.batches(epoch):
            outputs = training.train_step(images, positions)
            steps += 1
            loss_sum += outputs["loss"].detach().float()
            if logger and training.step % train.log_every_steps == 0:
                logger.log(
                    {
                        **{f"train.{key}": value.item() for key, value in outputs.items()},
                        "train.lr": training.scheduler.get_last_lr()[0],
                        "train.step": training.step,
                    },
                    step=training.step,
                )
        elapsed = time.perf_counter() - epoch_start
        epoch_loss = dist.all_reduce_mean(loss_sum / max(steps, 1)).item()  # also a barrier
        metrics = {
            "epoch": epoch,
            "step": training.step,
            "loss": epoch_loss,
            "samples_per_sec": steps * train.batch_size / elapsed,
        }
        bad = feed.bad_samples()  # read by every rank after the barrier: all stop together
        if bad is not None:
            metrics["data.bad_samples"] = bad.count
            if logger:
                logger.log({"data.bad_samples": bad.count}, step=training.step)
                if bad.count:
                    print(f"skipped {bad.count} unreadable images so far, e.g. {bad.examples}")
            if bad.exceeded:
                # The driver fails the job as a user error; retrying the gang would not help.
                ray.train.report(metrics)
                return
        last = epoch == train.epochs - 1
        with tempfile.TemporaryDirectory() as directory:
            report_checkpoint = None
            if rank == 0:
                _save_checkpoint(
                    Path(directory), training, epoch, reference_images if last else None
                )
                report_checkpoint = ray.train.Checkpoint.from_directory(directory)
                health = _embedding_health(training.method, sample)
                logger.log(
                    {
                        "train.epoch": epoch,
                        "train.epoch_loss": epoch_loss,
                        "train.workers": world,  # an elastic gang's size this epoch
                        "train.samples_per_sec": metrics["samples_per_sec"],
                        **{f"collapse.{key}": value for key, value in health.items()},
                    },
                    step=training.step,
                )
            ray.train.report(metrics, checkpoint=report_checkpoint)
    if logger:
        _log_figures(logger, training.method, sample)


def _embedding_health(method: Method, sample: torch.Tensor) -> dict[str, float]:
    """Collapse statistics of the encoder's features of a fixed sample of training data."""
    encoder = method.encoder()
    with _evaluating(encoder):
        return embedding_health(encoder(sample))


def _log_figures(logger: RunLogger, method: Method, data: torch.Tensor) -> None:
    with _evaluating(method):
        figures = method.figures(data)
    for name, image in figures.items():
        logger.log_image(image, f"figures/{name}")
