"""The training options of the shared step (workers/step.py): precision, channels_last,
torch.compile, LARS, BatchNorm over the global batch, the divergence guard and the collapse
statistics; and the spec's checks of the new encoder fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pipelines.spec import EncoderSpec, SpecError, load_spec_text, parse_spec, read_yaml
from tests.latent_ranks import part_results, register_part
from workers import dist
from workers.batchnorm import GlobalBatchNorm, convert_to_global_batchnorm
from workers.collapse import embedding_health
from workers.data import load_data_section, load_dataset
from workers.methods import METHODS
from workers.step import build_training

EXAMPLES = Path(__file__).parent.parent / "examples"
CPU = torch.device("cpu")


def simclr_spec(**train: Any):
    spec = load_spec_text((EXAMPLES / "simclr-digits.yaml").read_text())
    return spec.model_copy(update={"train": spec.train.model_copy(update=train)})


def losses(spec, steps: int = 3, images: torch.Tensor | None = None) -> list[float]:
    """Losses of ``steps`` shared training steps on the first 64 digits."""
    images = load_dataset("builtin:digits").images[:64] if images is None else images
    training = build_training(spec, (1, 8), 1000, 10, CPU)
    return [training.train_step(images, torch.arange(64))["loss"].item() for _ in range(steps)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here on one thread."""


def test_reduced_precision_trains_close_to_fp32_and_fp16_checkpoints_its_loss_scale() -> None:
    reference = losses(simclr_spec())
    for precision in ("bf16", "fp16"):
        reduced = losses(simclr_spec(precision=precision))
        assert reduced != reference  # autocast really ran in the lower precision
        assert reduced == pytest.approx(reference, rel=0.05), precision
    training = build_training(simclr_spec(precision="fp16"), (1, 8), 1000, 10, CPU)
    assert "scaler" in training.state_dict()
    assert "scaler" not in build_training(simclr_spec(), (1, 8), 1000, 10, CPU).state_dict()


def test_channels_last_gives_the_same_step() -> None:
    assert losses(simclr_spec(channels_last=True)) == pytest.approx(losses(simclr_spec()), rel=1e-4)


def test_lars_trains_through_the_spec() -> None:
    trained = losses(simclr_spec(optimizer="lars", lr=0.5), steps=6)
    assert trained[-1] < trained[0]


def test_compiled_encoder_gives_the_same_step() -> None:
    spec = load_spec_text((EXAMPLES / "dae-spiral.yaml").read_text())
    points = load_dataset("builtin:spiral").samples[:64]
    compiled = spec.model_copy(update={"train": spec.train.model_copy(update={"compile": True})})
    plain_training = build_training(spec, (2, 1), 1000, 10, CPU)
    compiled_training = build_training(compiled, (2, 1), 1000, 10, CPU)
    for _ in range(2):
        plain = plain_training.train_step(points, torch.arange(64))["loss"].item()
        fast = compiled_training.train_step(points, torch.arange(64))["loss"].item()
        assert fast == pytest.approx(plain, rel=1e-4)
    # Compiled in place: the stored encoder keeps the keys a loader expects.
    keys = set(compiled_training.method.encoder().state_dict())
    assert keys == set(plain_training.method.encoder().state_dict())


def test_a_loss_that_is_not_finite_fails_the_step() -> None:
    images = load_dataset("builtin:digits").images[:64].clone()
    images[0] = float("nan")  # a whole image, so that no crop can miss it
    with pytest.raises(FloatingPointError, match="diverged"):
        losses(simclr_spec(), steps=1, images=images)


def test_collapse_statistics_tell_spread_from_collapsed_features() -> None:
    generator = torch.Generator().manual_seed(0)
    spread = embedding_health(torch.randn(512, 64, generator=generator))
    assert spread["std"] == pytest.approx(64**-0.5, rel=0.05)
    assert spread["effective_rank"] > 50
    one_direction = torch.randn(512, 1, generator=generator) * torch.randn(1, 64)
    collapsed = embedding_health(one_direction + 1e-3 * torch.randn(512, 64))
    assert collapsed["effective_rank"] < 2
    assert embedding_health(torch.ones(512, 64))["std"] == pytest.approx(0, abs=1e-6)


# ---- BatchNorm over the global batch, on 2 real gloo ranks -------------------------------

WORLD, LOCAL = 2, 5


def batchnorm_net() -> nn.Module:
    torch.manual_seed(0)
    # float64: the comparison is of the statistics, not of float32 rounding.
    layers = [nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten()]
    return nn.Sequential(*layers).double()


def batchnorm_step(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward and backward of a GlobalBatchNorm network on this rank's images."""
    net = convert_to_global_batchnorm(batchnorm_net())
    out = net(images)
    (out * torch.arange(out.shape[1])).pow(2).mean().backward()
    norm = net[1]
    return {
        "out": out.detach(),
        "grad": net[0].weight.grad.clone(),
        "running_var": norm.running_var.clone(),
    }


def global_images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.rand(WORLD * LOCAL, 1, 4, 4, generator=generator, dtype=torch.float64)


def on_each_rank(_: None) -> dict[str, Any]:
    images = global_images()
    rank = dist.rank()
    return batchnorm_step(images[rank * LOCAL : (rank + 1) * LOCAL])


register_part("global_batchnorm", on_each_rank)


def test_global_batchnorm_on_two_ranks_equals_one_batchnorm_on_the_whole_batch(
    ray_local: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ranks = part_results("global_batchnorm", tmp_path_factory)
    images = global_images()
    whole = batchnorm_net()  # plain BatchNorm2d over all 10 samples in one process
    out = whole(images)
    (out * torch.arange(out.shape[1])).pow(2).mean().backward()
    torch.testing.assert_close(torch.cat([rank["out"] for rank in ranks]), out.detach())
    torch.testing.assert_close(whole[1].running_var, ranks[0]["running_var"])
    # Each rank's loss is the mean over its own half: DDP would average the two gradients.
    averaged = (ranks[0]["grad"] + ranks[1]["grad"]) / 2
    torch.testing.assert_close(averaged, whole[0].weight.grad)
    # Per-rank statistics would not match: the test can fail.
    local = batchnorm_net()(images[:LOCAL]).detach()
    assert not torch.allclose(local, out[:LOCAL].detach(), atol=1e-3)
    assert isinstance(convert_to_global_batchnorm(batchnorm_net())[1], GlobalBatchNorm)
    # A frozen copy (an EMA target) stays frozen, else DDP waits for gradients it never gets.
    frozen = convert_to_global_batchnorm(batchnorm_net().requires_grad_(False))
    assert not any(parameter.requires_grad for parameter in frozen.parameters())


# ---- the spec's encoder fields -----------------------------------------------------------


def document(**sections: Any) -> dict:
    base = read_yaml((EXAMPLES / "simclr-digits.yaml").read_text())
    base.update(sections)
    return base


@pytest.mark.parametrize(
    ("encoder", "field", "message"),
    [
        ({"arch": "resnet18", "out_dim": 128}, "encoder", "resnet18 features are 512 wide"),
        ({"arch": "small-convnet", "stem": "cifar"}, "encoder", "applies to ResNets"),
        ({"arch": "resnet18", "patch_size": 2}, "encoder", "applies to ViTs"),
        ({"arch": "vit-tiny", "patch_size": 3}, "encoder.patch_size", "does not divide the 8"),
        ({"arch": "resnet101"}, "encoder", "unknown encoder.arch"),
    ],
)
def test_bad_encoder_fields_name_the_field(encoder: dict, field: str, message: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_spec(document(encoder=encoder))
    assert any(path == field and message in text for path, text in error.value.problems), (
        error.value.problems
    )


def test_encoder_config_fills_widths_stems_and_patches() -> None:
    resnet = parse_spec(document(encoder={"arch": "resnet50"}))
    assert resnet.encoder.out_dim == 2048
    # Resolved for the data at parse time, so MLflow's params say what trains.
    assert resnet.encoder.stem == "cifar"  # 8x8 digits
    assert resnet.flat_params()["encoder.stem"] == "cifar"
    assert "encoder.patch_size" not in resnet.flat_params()
    assert EncoderSpec(arch="resnet50").config(3, 96)["stem"] == "imagenet"
    vit = EncoderSpec(arch="vit-small")
    assert parse_spec(document(encoder={"arch": "vit-small"})).encoder.patch_size == 1  # 8 / 8
    assert vit.config(3, 32) == {
        "arch": "vit-small",
        "in_channels": 3,
        "image_size": 32,
        "out_dim": 384,
        "patch_size": 4,
    }


def example_of(method: str) -> Path:
    """The method's digits example, or its only example."""
    digits = EXAMPLES / f"{method}-digits.yaml"
    return digits if digits.exists() else next(EXAMPLES.glob(f"{method}-*.yaml"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_takes_a_finite_reduced_precision_step(method: str, precision: str) -> None:
    spec = load_spec_text(example_of(method).read_text())
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"precision": precision})})
    dataset = load_data_section(spec.data.model_dump(mode="json"))
    # k-means starts its 64 clusters from a whole global batch; reduced precision on a CPU
    # without bf16 or fp16 instructions costs several times fp32: no bigger a batch.
    batch = min(spec.train.batch_size, 64)
    training = build_training(spec, (dataset.in_channels, dataset.image_size), 1000, 10, CPU)
    outputs = training.train_step(dataset.samples[:batch], torch.arange(batch))
    assert all(torch.isfinite(value).all() for value in outputs.values()), outputs
