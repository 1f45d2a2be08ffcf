"""The contrastive family on 2 real gloo DDP ranks (Ray Train), against one process on the
concatenated batch: gather-with-gradient losses (SimCLR's NT-Xent, Siamese's margin loss),
MoCo's queue and shuffled BatchNorm, PIRL's memory bank with a sampler-padding duplicate.

The distributed work is this module's part of the Ray Train run shared with the other
distributed tests (tests/latent_ranks.py: a run costs ~10-20 s to start); each test then
checks one property of what the ranks returned.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipelines.params import MoCoParams, PIRLParams
from tests.latent_ranks import part_results, register_part
from workers import dist
from workers.losses import margin_contrastive_loss, nt_xent_loss
from workers.methods import Method, MethodContext
from workers.methods.moco import MoCo
from workers.methods.pirl import PIRL
from workers.step import Training

WORLD = 2
LOCAL = 3  # samples per rank and step
STEPS = 2
LOSSES = {
    "nt_xent": lambda a, b: nt_xent_loss(a, b, 0.3),
    "margin": lambda a, b: margin_contrastive_loss(a, b, 1.5),
}
# PIRL's global batches: the second one repeats index 4, as DistributedSampler pads a round
# with samples from its start.
PIRL_INDICES = [torch.tensor([0, 1, 2, 3, 5, 6]), torch.tensor([7, 4, 9, 10, 11, 4])]


def shifted_views(images: torch.Tensor, step: int, view: int) -> torch.Tensor:
    """Deterministic, rank-independent views, so two ranks see what one process sees."""
    return images.roll(shifts=view + step, dims=-1) * (1.0 - 0.1 * view)


def global_images(step: int) -> torch.Tensor:
    return torch.rand(WORLD * LOCAL, 1, 8, 8, generator=torch.Generator().manual_seed(step))


def pirl_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global (images, dataset indices) per step; a repeated index is the same image."""
    dataset = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(11))
    return [(dataset[indices], indices) for indices in PIRL_INDICES]


def without_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm by the identity. BatchNorm normalises a sample with its rank's
    sub-batch, so no per-sample result could equal one process's; every other layer here
    treats samples independently. (test_moco_shuffled_batchnorm checks BatchNorm itself.)"""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            without_batchnorm(child)
    return module


def moco(norm: bool = False) -> MoCo:
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(64, 6)] + ([nn.BatchNorm1d(6)] if norm else [])
    params = MoCoParams(
        name="moco", queue_size=12, momentum=0.9, temperature=0.2, projection_dim=4, hidden_dim=8
    )
    method = MoCo(params, MethodContext(nn.Sequential(*layers), feature_dim=6, num_samples=64))
    return method if norm else without_batchnorm(method)


def pirl() -> PIRL:
    torch.manual_seed(0)
    # Size-agnostic: the same network encodes 8x8 images and 4x4 patches.
    backbone = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
    )
    params = PIRLParams(
        name="pirl",
        temperature=0.2,
        num_negatives=5,
        bank_momentum=0.5,
        loss_lambda=0.5,
        projection_dim=4,
        hidden_dim=8,
    )
    return without_batchnorm(PIRL(params, MethodContext(backbone, feature_dim=16, num_samples=12)))


def train(
    method: Method, batches: list[tuple[torch.Tensor, torch.Tensor]], wrap: bool
) -> list[float]:
    """SGD steps as the train loop takes them; DDP-wrapped on the ranks."""
    model = DistributedDataParallel(method) if wrap else None
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    training = Training.of(method, optimizer, shifted_views, model=model)
    losses = []
    for images, indices in batches:
        loss = training.train_step(images, indices)["loss"]
        losses.append(dist.all_reduce_mean(loss.detach()).item())
    return losses


def local_slice(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    return tensor[rank * LOCAL : (rank + 1) * LOCAL]


def gradients_of(loss_name: str, inputs: torch.Tensor, wrap: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    linear = nn.Linear(5, 8)
    model = DistributedDataParallel(linear) if wrap else linear
    z_a, z_b = model(inputs).chunk(2, dim=1)
    loss = LOSSES[loss_name](z_a, z_b)
    # A bare loss and its gradient, not a method's training step: no Training here.
    loss.backward()
    return {"loss": dist.all_reduce_mean(loss.detach()).item(), "grad": linear.weight.grad}


def loss_inputs() -> torch.Tensor:
    return torch.randn(WORLD * LOCAL, 5, generator=torch.Generator().manual_seed(9))


def on_each_rank(_: None) -> dict[str, Any]:
    rank = dist.rank()
    results: dict[str, Any] = {
        name: gradients_of(name, local_slice(loss_inputs(), rank), wrap=True) for name in LOSSES
    }

    method = moco()
    batches = [(local_slice(global_images(s), rank), torch.arange(LOCAL)) for s in range(STEPS)]
    results["moco_losses"] = train(method, batches, wrap=True)
    results["moco"] = {key: value.clone() for key, value in method.state_dict().items()}

    with_norm = moco(norm=True).train()
    keys, global_keys = with_norm._keys(local_slice(global_images(7), rank), step=7)
    results["shuffled_keys"] = (keys, global_keys)

    method = pirl()
    batches = [
        (local_slice(images, rank), local_slice(indices, rank))
        for images, indices in pirl_batches()
    ]
    results["pirl_losses"] = train(method, batches, wrap=True)
    results["pirl"] = {key: value.clone() for key, value in method.state_dict().items()}
    return results


register_part("contrastive", on_each_rank)


@pytest.fixture(scope="module")
def ranks(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return part_results("contrastive", tmp_path_factory)


def assert_states_equal_one_process(ranks: list[dict], key: str, one: Method) -> None:
    expected = one.state_dict()
    for name, value in ranks[0][key].items():
        # Every rank holds bit-identical state (nothing is broadcast to make it so) ...
        assert torch.equal(value, ranks[1][key][name]), name
        # ... and it is what one process computes on the concatenated batches.
        torch.testing.assert_close(value, expected[name], msg=name)


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_gather_with_gradient_equals_one_process(ranks: list[dict], loss_name: str) -> None:
    one = gradients_of(loss_name, loss_inputs(), wrap=False)
    for rank in ranks:
        assert rank[loss_name]["loss"] == pytest.approx(one["loss"], rel=1e-5)
        # DDP averaged the ranks' gradients: they must be the one process's gradient.
        torch.testing.assert_close(rank[loss_name]["grad"], one["grad"])


def test_moco_queue_and_weights_equal_across_ranks_and_one_process(ranks: list[dict]) -> None:
    one = moco()
    losses = train(
        one, [(global_images(s), torch.arange(WORLD * LOCAL)) for s in range(STEPS)], False
    )
    assert_states_equal_one_process(ranks, "moco", one)
    assert ranks[0]["moco_losses"] == pytest.approx(losses, rel=1e-5)
    # Both steps' global keys went in: the pointer moved by 2 x 6 (mod 12) and the queue is
    # no longer its random start.
    assert ranks[0]["moco"]["queue_pointer"].item() == 0
    assert not torch.equal(ranks[0]["moco"]["queue"], moco().queue)


def test_moco_shuffled_batchnorm(ranks: list[dict]) -> None:
    """A sample's key is the key encoder (train mode) on the sub-batch of the step-seeded
    permutation of the global batch that holds it, put back in the global batch's order."""
    method = moco(norm=True).train()
    images = global_images(7)
    order = torch.randperm(WORLD * LOCAL, generator=torch.Generator().manual_seed(7))
    expected = torch.empty(WORLD * LOCAL, 4)
    with torch.no_grad():
        for rank in range(WORLD):
            chunk = order[rank * LOCAL : (rank + 1) * LOCAL]
            expected[chunk] = F.normalize(method.key_encoder(images[chunk]), dim=1)
        unshuffled = F.normalize(method.key_encoder(images[:LOCAL]), dim=1)
    for rank, result in enumerate(ranks):
        keys, global_keys = result["shuffled_keys"]
        torch.testing.assert_close(global_keys, expected)
        torch.testing.assert_close(keys, local_slice(expected, rank))
    # The shuffle did something: rank 0's own sub-batch statistics give other keys.
    assert not torch.allclose(ranks[0]["shuffled_keys"][0], unshuffled, atol=1e-3)


def test_pirl_bank_equal_across_ranks_and_one_process(ranks: list[dict]) -> None:
    one = pirl()
    batches = pirl_batches()
    losses = train(one, batches, wrap=False)
    assert_states_equal_one_process(ranks, "pirl", one)
    assert ranks[0]["pirl_losses"] == pytest.approx(losses, rel=1e-5)
    # The padding duplicate (index 4, the same image twice) is one update, not two: the bank
    # matches one process that saw index 4 once.
    once = pirl()
    keep = torch.tensor([True, True, True, True, True, False])
    train(once, [batches[0], (batches[1][0][keep], batches[1][1][keep])], wrap=False)
    torch.testing.assert_close(ranks[0]["pirl"]["bank"][4], once.bank[4])
    untouched = torch.tensor([8])
    torch.testing.assert_close(ranks[0]["pirl"]["bank"][untouched], pirl().bank[untouched])
