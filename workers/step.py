"""One training step, and the one way to set it up: what the train loop runs on each Ray
Train worker, what the benchmarks time and what the tests train, so that all three take
exactly the same step (precision, divergence guard, optimizer, schedule, method updates)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipelines.spec import JobSpec
from workers.augment import Augment, build_augment
from workers.batchnorm import convert_to_global_batchnorm
from workers.encoders import build_encoder
from workers.methods import Batch, Method, MethodContext, build_method
from workers.optim import build_optimizer, warmup_cosine

_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """``train.precision``: autocast to bf16 or fp16 around the forward pass; fp16 also scales
    the loss so that small gradients survive the cast, and skips steps whose gradients
    overflowed. Weights and optimizer state stay fp32."""

    device_type: str
    dtype: torch.dtype | None  # None: plain fp32
    scaler: torch.amp.GradScaler | None

    @classmethod
    def named(cls, name: str, device: torch.device) -> Precision:
        dtype = _AUTOCAST_DTYPES[name]
        scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
        return cls(device.type, dtype, scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if not loss.requires_grad:  # closed-form methods (k-means, PCA) learn in forward
            optimizer.step()
        elif self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()


@dataclass
class Training:
    """A method ready to train: ``model`` is the method itself, or its DDP wrapper."""

    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    precision: Precision
    augment: Augment
    seed: int  # train.seed: with the rank and the step, seeds the method's own noise
    channels_last: bool = False
    step: int = 0  # global optimizer steps taken so far

    @classmethod
    def of(
        cls,
        method: Method,
        optimizer: torch.optim.Optimizer,
        augment: Augment,
        model: nn.Module | None = None,
        seed: int = 0,
    ) -> Training:
        """A method with a hand-made optimizer and augmentation, a constant learning rate and
        fp32: what tests and benchmarks train by hand. ``model``: the method's DDP wrapper."""
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        precision = Precision("cpu", None, None)
        wrapped = model if model is not None else method
        return cls(wrapped, method, optimizer, scheduler, precision, augment, seed)

    def train_step(self, images: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step on this rank's batch; returns the method's outputs (``loss``
        first). A loss that is not finite fails the job: the run has diverged."""
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.precision.autocast():
            outputs = self.model(Batch(images, indices, self.step, self.augment, self.seed))
        loss = outputs["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step}: diverged")
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward_and_step(loss, self.optimizer)
        self.scheduler.step()
        self.method.after_optimizer_step()
        self.step += 1
        return outputs

    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the data order: weights, queues, banks,
        EMA targets (the method's state dict), optimizer, schedule and loss scale."""
        state = {
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "global_step": self.step,
        }
        if self.precision.scaler is not None:
            state["scaler"] = self.precision.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and "scaler" in state:
            self.precision.scaler.load_state_dict(state["scaler"])
        self.step = state["global_step"]


def build_training(
    spec: JobSpec,
    sample_shape: tuple[int, int],
    num_samples: int,
    steps_per_epoch: int,
    device: torch.device,
    rank: int = 0,
    wrap: Callable[[Method], nn.Module] | None = None,
) -> Training:
    """Set up ``spec``'s method for data of ``sample_shape`` = (channels, side) with
    ``num_samples`` training samples, on ``device``. ``wrap`` turns the method into what the
    step calls (Ray Train's ``prepare_model``, which moves it and wraps it in DDP); without it
    the method is moved to ``device`` and called as it is.

    The global RNG is seeded with ``train.seed`` first, so every rank starts from the same
    weights."""
    train = spec.train
    torch.manual_seed(train.seed)
    backbone = build_encoder(spec.encoder.config(*sample_shape))
    total_steps = train.epochs * steps_per_epoch
    context = MethodContext(
        backbone,
        spec.encoder.out_dim,
        num_samples,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        augment_preset=spec.augment.preset,
    )
    method = build_method(spec.method, context)
    if train.sync_batchnorm:
        convert_to_global_batchnorm(method)
    if train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if train.compile:
        # In place, after the method is built: its momentum copies are made by then, and the
        # encoder's state-dict keys stay those a stored encoder loads with.
        method.encoder().compile()
    model = wrap(method) if wrap else method.to(device)
    optimizer = build_optimizer(train.optimizer, model, train.lr, train.weight_decay)
    warmup_steps = train.warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps)
    )
    augment = build_augment(spec.augment.preset, sample_shape[1], train.seed, rank)
    precision = Precision.named(train.precision, device)
    return Training(
        model, method, optimizer, scheduler, precision, augment, train.seed, train.channels_last
    )
