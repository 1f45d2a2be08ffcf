"""MAE in one process: the loss counts masked patches only, the norm-pix target, the masks
(count, per-rank, per-step, repeatable), the encoder sees the visible tokens only, the spec's
checks, exact resume, the figure, and a short training that lowers the loss."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.spec import JobSpec, SpecError, load_spec_text, parse_spec, read_yaml
from tests.resume import straight_halfway_resumed
from workers import dist
from workers.augment import build_augment
from workers.data import load_dataset
from workers.encoders import build_encoder
from workers.losses import masked_patch_mse
from workers.methods import Batch, MethodContext, build_method
from workers.methods.mae import MAE, random_masking
from workers.step import Training, build_training

EXAMPLE = Path(__file__).parent.parent / "examples" / "mae-digits.yaml"
AUGMENT = build_augment("digits", 8, seed=0, rank=0)
BATCH = 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Many small ViT products: one thread is faster on the shared cores."""


def spec(**method: object) -> JobSpec:
    document = read_yaml(EXAMPLE.read_text())
    document["method"].update(method)
    return parse_spec(document)


def build(seed: int = 0, **method: object) -> tuple[MAE, torch.optim.Optimizer]:
    job = spec(**method)
    torch.manual_seed(seed)
    backbone = build_encoder(job.encoder.config(1, 8))
    mae = build_method(job.method, MethodContext(backbone, job.encoder.out_dim, 64))
    return mae, torch.optim.AdamW(mae.parameters(), lr=1e-3, weight_decay=0.05)


def digits() -> torch.Tensor:
    return load_dataset("builtin:digits").images[:64]


def batch(step: int = 0, seed: int = 0) -> Batch:
    return Batch(digits()[:BATCH], torch.arange(BATCH), step, AUGMENT, seed)


# ---- the loss and its target ---------------------------------------------------------------


def test_masked_patch_mse_matches_the_equation_and_ignores_visible_patches() -> None:
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 5, 4, generator=generator), torch.randn(3, 5, 4)
    mask = torch.rand(3, 5, generator=generator) < 0.6
    mask[0, 0], mask[0, 1] = True, False
    expected = sum(
        float(((pred[i, j] - target[i, j]) ** 2).mean())
        for i in range(3)
        for j in range(5)
        if mask[i, j]
    ) / int(mask.sum())
    loss = masked_patch_mse(pred, target, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    visible_changed, masked_changed = pred.clone(), pred.clone()
    visible_changed[0, 1] += 10.0
    masked_changed[0, 0] += 10.0
    assert masked_patch_mse(visible_changed, target, mask).item() == loss.item()
    assert masked_patch_mse(masked_changed, target, mask).item() > loss.item() + 1.0


def test_norm_pix_target_by_hand() -> None:
    mae, _ = build(norm_pix_loss=True)
    images = torch.rand(2, 1, 8, 8)
    target = mae.target(images)  # (2, 16, 4): 2x2 patches in raster order
    assert target.shape == (2, 16, 4)
    # Patch 5 is row 1, column 1 of the 4x4 grid: pixels (2..3, 2..3), row by row.
    pixels = images[1, 0, 2:4, 2:4].flatten()
    mean, var = pixels.mean(), ((pixels - pixels.mean()) ** 2).sum() / (len(pixels) - 1)
    assert torch.allclose(target[1, 5], (pixels - mean) / (var + 1e-6).sqrt(), atol=1e-6)
    assert torch.equal(build(norm_pix_loss=False)[0].target(images)[1, 5], pixels)


# ---- masks -----------------------------------------------------------------------------------


def test_exactly_round_ratio_n_patches_are_masked_and_keep_is_the_rest() -> None:
    for ratio, masked in [(0.75, 12), (0.5, 8), (0.6, 10), (0.1, 2)]:
        keep, mask = random_masking(9, 16, ratio, torch.Generator().manual_seed(1))
        assert (mask.sum(1) == masked).all()
        assert keep.shape == (9, 16 - masked)
        assert not mask.gather(1, keep).any()  # the kept patches are exactly the visible ones
    assert len({tuple(row.tolist()) for row in mask}) > 1  # per sample, not one mask for all


def masks(step: int, rank: int, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    monkeypatch.setattr(dist, "rank", lambda: rank)
    return random_masking(BATCH, 16, 0.75, batch(step).generator())[1]


def test_masks_differ_between_ranks_and_steps_and_repeat_with_the_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = masks(3, 0, monkeypatch)
    assert not torch.equal(first, masks(3, 1, monkeypatch))
    assert not torch.equal(first, masks(4, 0, monkeypatch))
    torch.rand(1000)  # the global generator is not where the masks come from
    assert torch.equal(first, masks(3, 0, monkeypatch))


def test_the_encoder_sees_only_the_visible_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    mae, _ = build()
    seen: list[torch.Size] = []
    encode = mae.backbone.encode

    def counting(tokens: torch.Tensor) -> torch.Tensor:
        seen.append(tokens.shape)
        return encode(tokens)

    monkeypatch.setattr(mae.backbone, "encode", counting)
    outputs = mae(batch())
    assert seen == [torch.Size([BATCH, 4, 192])]  # 16 patches, 12 hidden, CLS added inside
    assert outputs["mask_fraction"].item() == 0.75 and not outputs["mask_fraction"].requires_grad


# ---- the spec --------------------------------------------------------------------------------


def problems(document: dict) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as raised:
        parse_spec(document)
    return raised.value.problems


def test_the_spec_refuses_a_convnet_and_masks_that_leave_nothing() -> None:
    document = read_yaml(EXAMPLE.read_text())
    convnet = {**document, "encoder": {"arch": "small-convnet"}}
    ((field, message),) = problems(convnet)
    assert field == "encoder.arch" and "vit-tiny" in message and "small-convnet" in message
    for method, field in [
        ({"mask_ratio": 0.99}, "method.mask_ratio"),  # round(15.84) = 16: none visible
        ({"mask_ratio": 0.01}, "method.mask_ratio"),  # none masked
        ({"decoder_dim": 130, "decoder_heads": 2}, "method.decoder_dim"),  # not a multiple of 4
        ({"decoder_dim": 128, "decoder_heads": 3}, "method.decoder_dim"),
    ]:
        changed = copy.deepcopy(document)
        changed["method"].update(method)
        assert [problem[0] for problem in problems(changed)] == [field]


# ---- training --------------------------------------------------------------------------------


def build_training_by_hand(seed: int) -> Training:
    """Other weights for another ``seed``; the same masks and views (train seed 7) for both."""
    return Training.of(*build(seed), AUGMENT, seed=7)


def train_steps(training: Training, steps: range, images: torch.Tensor) -> None:
    assert training.step == steps.start  # a resumed Training takes its step from the state
    for step in steps:
        indices = (torch.arange(BATCH) + BATCH * step) % len(images)
        training.train_step(images[indices], indices)


def test_resume_is_exact(tmp_path: Path) -> None:
    expected, halfway, actual = straight_halfway_resumed(
        build_training_by_hand, train_steps, digits(), tmp_path
    )
    assert expected.keys() == actual.keys()
    assert "mask_token" in expected and not torch.equal(
        expected["mask_token"], halfway["mask_token"]
    )
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_figures_show_images_masked_inputs_and_reconstructions() -> None:
    mae, _ = build(norm_pix_loss=True)
    (picture,) = mae.figures(digits()).values()
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    # 32 images in blocks of 8, each block shown three times: 12 rows of 32-pixel tiles.
    assert picture.shape[0] == 12 * 33 + 1


def test_a_short_training_of_the_example_lowers_the_loss() -> None:
    job = load_spec_text(EXAMPLE.read_text())
    images = load_dataset("builtin:digits").images[:256]
    # One step an epoch: the example's warm-up is 4 steps, the cosine runs over 40.
    training = build_training(job, (1, 8), len(images), 1, torch.device("cpu"))
    probe = Batch(images[:32], torch.arange(32), 0, training.augment, job.train.seed)
    with torch.no_grad():
        before = training.method(probe)["loss"].item()
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        indices = torch.randint(0, len(images), (32,), generator=generator)
        training.train_step(images[indices], indices)
    with torch.no_grad():
        after = training.method(probe)["loss"].item()
    print(f"loss on a fixed batch: {before:.4f} at init, {after:.4f} after 20 steps")
    assert after < 0.5 * before, (before, after)
