"""The contrastive family in one process: losses against their equations, the momentum
update, enqueue and bank update against hand computations, the jigsaw, the spec's checks of
MoCo's queue and PIRL's negatives, and exact resume of MoCo and PIRL."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.params import MoCoParams
from pipelines.spec import (
    EncoderSpec,
    SpecError,
    load_spec_text,
    parse_spec,
    read_yaml,
)
from tests.resume import straight_halfway_resumed
from workers.augment import build_augment
from workers.data import load_dataset, split_indices
from workers.encoders import build_encoder
from workers.losses import info_nce_loss, margin_contrastive_loss
from workers.methods import Batch, MethodContext, build_method
from workers.methods.moco import MoCo, enqueue
from workers.methods.pirl import jigsaw, update_bank
from workers.step import Training

EXAMPLES = Path(__file__).parent.parent / "examples"


# ---- losses ------------------------------------------------------------------------------


def test_margin_loss_matches_the_equation_term_by_term() -> None:
    generator = torch.Generator().manual_seed(3)
    z_a, z_b = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    margin = 1.2
    u_a, u_b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    n = len(z_a)
    similar = sum(float((u_a[i] - u_b[i]).norm()) ** 2 for i in range(n)) / n
    dissimilar = sum(
        max(0.0, margin - float((u_a[i] - u_b[j]).norm())) ** 2
        for i in range(n)
        for j in range(n)
        if i != j
    ) / (n * (n - 1))
    loss = margin_contrastive_loss(z_a, z_b, margin).item()
    assert loss == pytest.approx(similar + dissimilar, rel=1e-5)


def test_margin_loss_is_zero_for_coinciding_views_of_far_apart_samples() -> None:
    z = torch.eye(3)  # pairwise distance sqrt(2) > margin 1
    assert margin_contrastive_loss(z, z.clone(), margin=1.0).item() == pytest.approx(0, abs=1e-6)


def test_info_nce_matches_the_equation_term_by_term() -> None:
    generator = torch.Generator().manual_seed(5)
    query, positive = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    negatives = torch.randn(6, 3, generator=generator)
    temperature = 0.3
    q, k = F.normalize(query, dim=1), F.normalize(positive, dim=1)
    n_ = F.normalize(negatives, dim=1)
    expected = 0.0
    for i in range(4):
        numerator = math.exp(float(q[i] @ k[i]) / temperature)
        denominator = numerator + sum(math.exp(float(q[i] @ n_[j]) / temperature) for j in range(6))
        expected += -math.log(numerator / denominator) / 4
    loss = info_nce_loss(query, positive, negatives, temperature).item()
    assert loss == pytest.approx(expected, rel=1e-5)


# ---- MoCo: momentum update, queue --------------------------------------------------------


def tiny_moco(queue_size: int = 8, momentum: float = 0.9) -> MoCo:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(16, 6))
    params = MoCoParams(
        name="moco",
        queue_size=queue_size,
        momentum=momentum,
        temperature=0.2,
        projection_dim=3,
        hidden_dim=5,
    )
    return MoCo(params, MethodContext(backbone, feature_dim=6, num_samples=100))


def shifted_views(images: torch.Tensor, step: int, view: int) -> torch.Tensor:
    """Two cheap, different, deterministic "augmentations" for tests."""
    return images.roll(shifts=view, dims=-1) * (1.0 - 0.1 * view)


def test_momentum_update_by_hand_once_per_optimizer_step() -> None:
    method = tiny_moco(momentum=0.9)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    key_before = method.key_encoder[0][1].weight.detach().clone()
    images = torch.rand(4, 1, 4, 4)
    # The step by hand, not Training.train_step: the key encoder is checked between the
    # optimizer's step and the momentum update.
    loss = method(Batch(images, torch.arange(4), 0, shifted_views))["loss"]
    loss.backward()
    optimizer.step()
    # The optimizer never touches the key encoder: it has no gradient and stays put.
    assert method.key_encoder[0][1].weight.grad is None
    assert torch.equal(method.key_encoder[0][1].weight, key_before)
    query_after = method.backbone[1].weight.detach().clone()
    assert not torch.equal(query_after, key_before)
    method.after_optimizer_step()
    key_after = method.key_encoder[0][1].weight
    for row, column in [(0, 0), (2, 7), (5, 15)]:
        by_hand = 0.9 * float(key_before[row, column]) + 0.1 * float(query_after[row, column])
        assert float(key_after[row, column]) == pytest.approx(by_hand, rel=1e-6, abs=1e-7)
    assert all(not p.requires_grad for p in method.key_encoder.parameters())


def test_enqueue_writes_fifo_slots_and_wraps() -> None:
    queue, pointer = torch.zeros(8, 1), torch.zeros((), dtype=torch.long)
    for start in (1, 4, 7):  # three batches of 3 keys: 1..3, 4..6, 7..9
        enqueue(queue, pointer, torch.arange(start, start + 3, dtype=torch.float32)[:, None])
    # Slots 0-2 took 1-3, slots 3-5 took 4-6, slots 6, 7, 0 took 7, 8, 9.
    assert queue.squeeze(1).tolist() == [9, 2, 3, 4, 5, 6, 7, 8]
    assert pointer.item() == 1


def test_short_last_batch_keeps_the_queue_the_newest_keys() -> None:
    method = tiny_moco(queue_size=8)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    enqueued = []
    for step, size in enumerate([4, 4, 3, 4, 4]):  # the third batch is short
        images = torch.rand(size, 1, 4, 4, generator=generator)
        # The step by hand, not Training.train_step: the keys are read between the forward
        # pass and after_optimizer_step, which enqueues and clears them.
        loss = method(Batch(images, torch.arange(size), step, shifted_views))["loss"]
        enqueued.append(method._keys_to_enqueue.clone())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step()
    newest = torch.cat(enqueued)[-8:]  # the queue holds exactly the last K keys
    assert method.queue_pointer.item() == sum([4, 4, 3, 4, 4]) % 8
    order = (method.queue_pointer + torch.arange(8)) % 8  # oldest slot first
    assert torch.equal(method.queue[order], newest)


# ---- PIRL: bank update, jigsaw -----------------------------------------------------------


def test_bank_update_by_hand_with_a_repeated_index() -> None:
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    indices = torch.tensor([1, 3, 1])  # index 1 twice, as sampler padding repeats samples
    embeddings = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    update_bank(bank, indices, embeddings, momentum=0.5)
    # Entry 1: one step with the mean of its two embeddings (0.3, 0.9), momentum on the old.
    mixed = (0.5 * 1.0 + 0.5 * 0.3, 0.5 * 0.0 + 0.5 * 0.9)
    norm = math.hypot(*mixed)
    assert bank[1].tolist() == pytest.approx([mixed[0] / norm, mixed[1] / norm], rel=1e-6)
    mixed = (0.5 * 0.6 + 0.5 * 1.0, 0.5 * 0.8 + 0.5 * 0.0)
    norm = math.hypot(*mixed)
    assert bank[3].tolist() == pytest.approx([mixed[0] / norm, mixed[1] / norm], rel=1e-6)
    assert bank[0].tolist() == [1.0, 0.0] and bank[2].tolist() == [0.0, 1.0]  # untouched
    # Momentum 0 replaces the entry outright.
    update_bank(bank, torch.tensor([0]), torch.tensor([[0.0, 1.0]]), momentum=0.0)
    assert bank[0].tolist() == [0.0, 1.0]


def test_jigsaw_shuffles_a_3x3_grid_of_overlapping_patches() -> None:
    images = torch.rand(5, 2, 8, 8)
    orders = torch.rand(5, 9, generator=torch.Generator().manual_seed(0)).argsort(dim=1)
    patches = jigsaw(images, orders)
    assert patches.shape == (5, 9, 2, 4, 4)
    for i in range(5):
        # 4x4 cells at stride 2 cover the 8x8 image; cells numbered row by row.
        grid = [
            images[i, :, 2 * r : 2 * r + 4, 2 * c : 2 * c + 4] for r in range(3) for c in range(3)
        ]
        for k in range(9):
            assert torch.equal(patches[i, k], grid[orders[i, k]])


# ---- spec checks -------------------------------------------------------------------------


def example(method: str) -> dict:
    return read_yaml((EXAMPLES / f"{method}-digits.yaml").read_text())


@pytest.mark.parametrize("test_fraction", [0.25, 0.1, 0.33])
def test_train_size_without_torch_matches_the_real_split(test_fraction: float) -> None:
    spec = parse_spec({**example("siamese"), "data": {"test_fraction": test_fraction}})
    labels = load_dataset("builtin:digits").labels
    assert spec.data.train_size == len(split_indices(labels, test_fraction, 0).train)


def moco_problems(queue_size: int, batch_size: int, test_fraction: float = 0.25) -> list:
    document = example("moco")
    document["method"]["queue_size"] = queue_size
    document["train"]["batch_size"] = batch_size
    document["data"]["test_fraction"] = test_fraction
    try:
        parse_spec(document)
    except SpecError as error:
        return error.problems
    return []


def test_queue_must_be_a_multiple_of_the_global_batch() -> None:
    ((field, message),) = moco_problems(queue_size=1000, batch_size=256)
    assert field == "method.queue_size" and "multiple of the global batch" in message
    assert moco_problems(queue_size=1024, batch_size=256) == []
    assert moco_problems(queue_size=960, batch_size=64) == []


def test_queue_must_be_smaller_than_the_data_minus_one_batch() -> None:
    # 1347 training images at test_fraction 0.25: K < 1347 - 256 = 1091.
    ((field, message),) = moco_problems(queue_size=1280, batch_size=256)
    assert field == "method.queue_size" and "1091" in message and "1347" in message
    # A larger training split (test_fraction 0.1: 1617 images) admits the same queue.
    assert moco_problems(queue_size=1280, batch_size=256, test_fraction=0.1) == []


def test_pirl_negatives_must_fit_in_the_bank_and_bad_values_name_their_field() -> None:
    document = example("pirl")
    document["method"]["num_negatives"] = 1347
    with pytest.raises(SpecError) as raised:
        parse_spec(document)
    assert raised.value.problems[0][0] == "method.num_negatives"
    for method, field, value in [
        ("siamese", "margin", 2.5),
        ("moco", "momentum", 1.0),
        ("pirl", "bank_momentum", -0.1),
        ("pirl", "loss_lambda", 1.5),
    ]:
        document = example(method)
        document["method"][field] = value
        with pytest.raises(SpecError) as raised:
            parse_spec(document)
        assert raised.value.problems[0][0] == f"method.{field}"


# ---- exact resume ------------------------------------------------------------------------


def build(method_name: str, seed: int) -> Training:
    spec = load_spec_text((EXAMPLES / f"{method_name}-digits.yaml").read_text())
    change = {"queue_size": 32} if method_name == "moco" else {"num_negatives": 32}
    params = spec.method.model_copy(update=change)
    torch.manual_seed(seed)
    backbone = build_encoder(EncoderSpec(out_dim=32).config(in_channels=1, image_size=8))
    method = build_method(params, MethodContext(backbone, feature_dim=32, num_samples=64))
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    return Training.of(method, optimizer, build_augment("digits", 8, seed=0, rank=0))


def train_steps(training: Training, steps: range, images: torch.Tensor) -> None:
    for step in steps:
        indices = (torch.arange(16) + 16 * step) % 64
        training.train_step(images[indices], indices)


@pytest.mark.parametrize("method_name", ["moco", "pirl"])
def test_resume_is_exact(method_name: str, tmp_path: Path) -> None:
    images = load_dataset("builtin:digits").images[:64]
    expected, halfway, actual = straight_halfway_resumed(
        lambda seed: build(method_name, seed=seed), train_steps, images, tmp_path
    )
    assert expected.keys() == actual.keys()
    store = "queue" if method_name == "moco" else "bank"
    assert store in expected and not torch.equal(expected[store], halfway[store])
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
