"""DINO: the loss term by term, the centre and teacher updates by hand, the schedules, the
teacher's stop-gradient, exact resume, 2 gloo ranks against one process on the concatenated
batch (through the shared run of tests/latent_ranks.py), and a short ViT-tiny training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipelines.params import DINOParams
from pipelines.spec import EncoderSpec
from tests.latent_ranks import part_results, register_part
from tests.resume import straight_halfway_resumed
from tests.test_contrastive_dist import shifted_views, without_batchnorm
from workers import dist
from workers.augment import build_augment
from workers.data import load_dataset
from workers.encoders import build_encoder
from workers.losses import dino_loss
from workers.methods.base import Batch, MethodContext
from workers.methods.dino import DINO, MultiCrop, teacher_temperature
from workers.optim import cosine_momentum
from workers.step import Training

WORLD, LOCAL, STEPS, LOCAL_CROPS = 2, 3, 2, 2
NO_AUGMENT = build_augment("none", 8, 0, 0)
pytestmark = pytest.mark.usefixtures("one_thread")  # many small products: 2 threads fight


def fixed_crops(batch: Batch) -> list[torch.Tensor]:
    """Deterministic, rank-independent crops: 2 global 8x8, then 4x4 local windows."""
    images = batch.images
    global_crops = [shifted_views(images, batch.step, view) for view in (0, 1)]
    local_crops = [
        images[..., view : view + 4, 2 * view : 2 * view + 4] * (1.0 - 0.05 * view)
        for view in range(1, LOCAL_CROPS + 1)
    ]
    return global_crops + local_crops


def dino(
    backbone: nn.Module,
    feature_dim: int,
    preset: str = "none",
    total_steps: int = 20,
    steps_per_epoch: int = 5,
    **overrides: Any,
) -> DINO:
    params = {
        "name": "dino",
        "hidden_dim": 16,
        "bottleneck_dim": 8,
        "prototypes": 12,
        "local_crops": LOCAL_CROPS,
        "local_crop_size": 4,
        "momentum": 0.9,
        "student_temperature": 0.1,
        "teacher_temperature": 0.06,
        "warmup_teacher_temperature": 0.02,
        "warmup_teacher_epochs": 2,
        **overrides,
    }
    context = MethodContext(backbone, feature_dim, 64, total_steps, steps_per_epoch, preset)
    return DINO(DINOParams.model_validate(params), context)


def small_dino(**overrides: Any) -> DINO:
    """A small convnet without BatchNorm, crops swapped for ``fixed_crops``."""
    torch.manual_seed(0)
    backbone = build_encoder(EncoderSpec(arch="small-convnet", out_dim=16).config(1, 8))
    method = without_batchnorm(dino(backbone, 16, **overrides))
    method.crops = fixed_crops
    return method


def global_images(step: int) -> torch.Tensor:
    return torch.rand(WORLD * LOCAL, 1, 8, 8, generator=torch.Generator().manual_seed(step))


def test_loss_term_by_term() -> None:
    generator = torch.Generator().manual_seed(0)
    views, n, k, tau_s, tau_t = 4, 3, 5, 0.1, 0.04
    student = torch.randn(views, n, k, generator=generator, requires_grad=True)
    teacher = torch.randn(2, n, k, generator=generator, requires_grad=True)
    center = torch.randn(k, generator=generator)
    terms = []
    for i in range(2):
        for j in range(views):
            if i == j:
                continue
            for b in range(n):
                target = F.softmax((teacher[i, b] - center) / tau_t, dim=0)
                log_prob = F.log_softmax(student[j, b] / tau_s, dim=0)
                terms.append(-(target * log_prob).sum())
    assert len(terms) == 2 * (views - 1) * n
    loss = dino_loss(student, teacher, center, tau_s, tau_t)
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0  # the teacher is a target


def test_schedules_at_first_middle_and_last_step() -> None:
    # Warm-up: 2 epochs of 5 steps, 0.02 -> 0.06; the run: 20 steps.
    assert teacher_temperature(0, 10, 0.02, 0.06) == pytest.approx(0.02)
    assert teacher_temperature(5, 10, 0.02, 0.06) == pytest.approx(0.04)
    assert teacher_temperature(10, 10, 0.02, 0.06) == pytest.approx(0.06)
    assert teacher_temperature(19, 10, 0.02, 0.06) == pytest.approx(0.06)
    assert teacher_temperature(0, 0, 0.02, 0.06) == pytest.approx(0.06)  # no warm-up
    cosine, constant = small_dino(), small_dino(momentum_schedule="constant")
    assert [cosine.momentum_at(s) for s in (0, 10, 20)] == pytest.approx([0.9, 0.95, 1.0])
    assert [constant.momentum_at(s) for s in (0, 10, 20)] == pytest.approx([0.9] * 3)
    # What forward logs is the schedule at the batch's step.
    outputs = cosine(Batch(global_images(0), torch.arange(6), 5, NO_AUGMENT))
    assert outputs["teacher_temperature"].item() == pytest.approx(0.04)
    assert outputs["momentum"].item() == pytest.approx(cosine_momentum(5, 20, 0.9))


def test_teacher_gets_no_gradient() -> None:
    method = small_dino()
    method(Batch(global_images(0), torch.arange(6), 0, NO_AUGMENT))["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is not None for p in method.backbone.parameters())


def test_centre_and_teacher_updates_by_hand() -> None:
    method = small_dino(center_momentum=0.7)
    method.center.normal_(generator=torch.Generator().manual_seed(3))
    images, step = global_images(0), 4
    center = method.center.clone()
    teacher = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    crops = fixed_crops(Batch(images, torch.arange(6), step, NO_AUGMENT))
    with torch.no_grad():
        outputs = method.teacher(torch.cat(crops[:2]))  # (2n, K), before any update
    training = Training.of(method, torch.optim.SGD(method.parameters(), lr=0.1), NO_AUGMENT)
    training.step = step
    logged = training.train_step(images, torch.arange(6))

    torch.testing.assert_close(method.center, 0.7 * center + 0.3 * outputs.mean(0))
    momentum = cosine_momentum(step, 20, 0.9)
    student = dict(method.backbone.named_parameters(prefix="0"))
    student |= dict(method.head.named_parameters(prefix="1"))
    for name, value in method.teacher.named_parameters():
        expected = momentum * teacher[name] + (1 - momentum) * student[name]
        torch.testing.assert_close(value, expected, msg=name)
    tau_t = teacher_temperature(step, 10, 0.02, 0.06)
    mean_target = F.softmax((outputs - center) / tau_t, dim=1).mean(0)
    entropy = -(mean_target * mean_target.log()).sum()
    torch.testing.assert_close(logged["teacher_entropy"], entropy)
    assert 0 < entropy <= math.log(12) + 1e-6


def test_local_crop_side_in_whole_patches() -> None:
    assert MultiCrop("none", 2, 0, 0.4, 1).local_side(9) == 4
    assert MultiCrop("none", 2, 0, 0.4, 4).local_side(8) == 4
    assert MultiCrop("none", 2, 0, 0.4, 3).local_side(8) == 3
    assert MultiCrop("none", 2, 0, 0.4, 8).local_side(8) == 8  # at least one patch
    assert MultiCrop("none", 2, 6, 0.4, 1).local_side(8) == 6


def test_multi_crop_views_are_seeded_and_sized() -> None:
    crops = MultiCrop("digits", 3, 4, 0.4, 1)
    images = load_dataset("builtin:digits").images[:5]
    views = crops(Batch(images, torch.arange(5), 2, NO_AUGMENT, seed=1))
    assert [v.shape[-1] for v in views] == [8, 8, 4, 4, 4]
    again = crops(Batch(images, torch.arange(5), 2, NO_AUGMENT, seed=1))
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))
    other_step = crops(Batch(images, torch.arange(5), 3, NO_AUGMENT, seed=1))
    assert not torch.equal(views[2], other_step[2])


def build(seed: int) -> Training:
    torch.manual_seed(seed)
    backbone = build_encoder(EncoderSpec(arch="small-convnet", out_dim=32).config(1, 8))
    # Warm-up over 4 of the 6 steps: the resumed half starts inside it.
    method = dino(backbone, 32, preset="digits", total_steps=6, steps_per_epoch=2)
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    return Training.of(method, optimizer, build_augment("digits", 8, 0, 0))


LOGGED: list[tuple[int, float, float]] = []  # (step, teacher temperature, momentum)


def train_steps(training: Training, steps: range, images: torch.Tensor) -> None:
    assert training.step == steps.start
    for step in steps:
        indices = (torch.arange(16) + 16 * step) % 64
        out = training.train_step(images[indices], indices)
        LOGGED.append((step, out["teacher_temperature"].item(), out["momentum"].item()))


def test_resume_is_exact(tmp_path: Path) -> None:
    LOGGED.clear()
    images = load_dataset("builtin:digits").images[:64]
    expected, halfway, actual = straight_halfway_resumed(build, train_steps, images, tmp_path)
    assert expected.keys() == actual.keys()
    assert not torch.equal(expected["center"], halfway["center"])
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    straight, resumed = LOGGED[:6], LOGGED[6:]
    assert [s for s, *_ in resumed] == list(range(6))
    assert straight == resumed  # the schedules resume at the step, not at 0


def train_on(method: DINO, batches: list[torch.Tensor], wrap: bool) -> dict[str, Any]:
    model = DistributedDataParallel(method) if wrap else None
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    training = Training.of(method, optimizer, NO_AUGMENT, model=model)
    losses = []
    for images in batches:
        loss = training.train_step(images, torch.arange(len(images)))["loss"]
        losses.append(dist.all_reduce_mean(loss.detach()).item())
    state = {key: value.detach().clone() for key, value in method.state_dict().items()}
    return {"losses": losses, "state": state}


def on_each_rank(_: None) -> dict[str, Any]:
    torch.set_num_threads(1)
    rank = dist.rank()
    batches = [global_images(step)[rank * LOCAL : (rank + 1) * LOCAL] for step in range(STEPS)]
    return train_on(small_dino(), batches, wrap=True)


register_part("dino", on_each_rank)


@pytest.fixture(scope="module")
def ranks(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return part_results("dino", tmp_path_factory)


def test_two_ranks_equal_one_process_on_the_concatenated_batch(ranks: list[dict]) -> None:
    one = train_on(small_dino(), [global_images(step) for step in range(STEPS)], wrap=False)
    # The centre is the same on both ranks (DDP broadcasts nothing into it) ...
    assert torch.equal(ranks[0]["state"]["center"], ranks[1]["state"]["center"])
    assert ranks[0]["state"]["center"].abs().sum() > 0
    for rank in ranks:
        # ... and everything is what one process computes on the concatenated batches.
        for key, value in one["state"].items():
            torch.testing.assert_close(rank["state"][key], value, rtol=1e-4, atol=1e-6, msg=key)
        assert rank["losses"] == pytest.approx(one["losses"], rel=1e-5)
    initial = small_dino().state_dict()
    assert not torch.allclose(
        initial["backbone.project.weight"], one["state"]["backbone.project.weight"]
    )


def test_vit_tiny_trains_on_digits() -> None:
    torch.manual_seed(0)
    config = EncoderSpec(arch="vit-tiny", patch_size=2).config(1, 8)
    method = dino(build_encoder(config), 192, preset="digits", local_crop_size=0)
    images = load_dataset("builtin:digits").images[:32]
    sides = [
        crop.shape[-1] for crop in method.crops(Batch(images, torch.arange(32), 0, NO_AUGMENT))
    ]
    assert sides == [8, 8, 4, 4]  # local crops: half the side, in whole 2-pixel patches
    optimizer = torch.optim.AdamW(method.parameters(), lr=5e-4)
    training = Training.of(method, optimizer, build_augment("digits", 8, 0, 0))
    for _ in range(3):
        outputs = training.train_step(images, torch.arange(32))
        assert all(torch.isfinite(value) for value in outputs.values())
    assert set(outputs) == {"loss", "teacher_temperature", "momentum", "teacher_entropy"}
