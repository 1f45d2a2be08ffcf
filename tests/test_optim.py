"""workers/optim.py: LARS against a hand computation and across a resume, build_optimizer
against the train loop's former optimizers, and the learning-rate and EMA-momentum
schedules."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from workers.optim import LARS, OPTIMIZERS, build_optimizer, cosine_momentum, warmup_cosine


# The train loop's optimizer and learning-rate factor as they were before workers/optim.py
# took them over, verbatim: the references build_optimizer and warmup_cosine must match.
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


def f64(values: list[float] | list[list[float]]) -> torch.Tensor:
    """A float64 tensor of exactly these decimals (as Python floats), never rounded to float32."""
    return torch.tensor(values, dtype=torch.float64)


def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    """A float64 nn.Linear with the given weight (out, in) and bias (out,)."""
    layer = nn.Linear(len(weight[0]), len(weight)).double()
    with torch.no_grad():
        layer.weight.copy_(f64(weight))
        layer.bias.copy_(f64(bias))
    return layer


def test_lars_steps_match_a_hand_computation() -> None:
    lr, wd, eta = 0.1, 0.1, 0.001
    model = linear([[3.0, 0.0], [0.0, 4.0]], [1.0, -2.0])
    optimizer = build_optimizer("lars", model, lr=lr, weight_decay=wd)
    assert optimizer.param_groups[0]["eta"] == eta
    weight_grad, bias_grad = f64([[0.3, 0.0], [0.0, 0.4]]), f64([0.5, 0.5])

    def step() -> None:
        model.weight.grad, model.bias.grad = weight_grad.clone(), bias_grad.clone()
        optimizer.step()

    # Step 1. Weight: g' = g + wd w = diag(0.6, 0.8), ||g'|| = 1, ||w|| = 5, trust = 0.005,
    # buf = 0.005 g' = diag(0.003, 0.004), w = w - 0.1 buf = diag(2.9997, 3.9996).
    # Bias (no decay, no trust ratio): buf = g = 0.5, b = b - 0.05.
    step()
    torch.testing.assert_close(
        model.weight, f64([[2.9997, 0.0], [0.0, 3.9996]]), rtol=0, atol=1e-15
    )
    torch.testing.assert_close(model.bias, f64([0.95, -2.05]), rtol=0, atol=1e-15)

    # Step 2: g' = g + wd w, trust = eta ||w|| / ||g'||, buf = 0.9 buf + trust g'.
    w = [2.9997, 3.9996]
    update = [0.3 + wd * w[0], 0.4 + wd * w[1]]
    trust = eta * math.hypot(*w) / math.hypot(*update)
    buffer = [0.9 * 0.003 + trust * update[0], 0.9 * 0.004 + trust * update[1]]
    step()
    expected = [[w[0] - lr * buffer[0], 0.0], [0.0, w[1] - lr * buffer[1]]]
    torch.testing.assert_close(model.weight, f64(expected), rtol=0, atol=1e-15)
    # Bias: buf = 0.9 * 0.5 + 0.5 = 0.95, b = b - 0.095.
    torch.testing.assert_close(model.bias, f64([0.855, -2.145]), rtol=0, atol=1e-15)


def test_lars_groups_exclude_biases_and_norms_from_decay_and_adaptation() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))
    optimizer = build_optimizer("lars", model, lr=0.5, weight_decay=1e-4)
    adapted, plain = optimizer.param_groups
    assert [p.shape for p in adapted["params"]] == [(4, 3), (2, 4)]
    assert adapted["lars_adapt"] and adapted["weight_decay"] == 1e-4
    assert [p.shape for p in plain["params"]] == [(4,), (4,), (4,)]
    assert not plain["lars_adapt"] and plain["weight_decay"] == 0.0
    # Closed-form methods have no parameters: both groups are there, empty, and step is a no-op.
    empty = build_optimizer("lars", nn.Module(), lr=0.5, weight_decay=1e-4)
    assert [len(group["params"]) for group in empty.param_groups] == [0, 0]
    empty.step()


def test_trust_ratio_is_one_for_zero_weights_and_zero_updates() -> None:
    # Zero weights: ||w|| = 0, so the step is plain SGD (trust 1), not a step of zero.
    weight = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    optimizer = LARS([weight], lr=0.1, weight_decay=0.5)
    weight.grad = torch.ones(2, 2, dtype=torch.float64)
    optimizer.step()
    assert torch.equal(weight.detach(), torch.full((2, 2), -0.1, dtype=torch.float64))
    # Zero update (g = -wd w): nothing moves, and nothing is NaN.
    weight = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    optimizer = LARS([weight], lr=0.1, weight_decay=0.5)
    weight.grad = torch.full((2, 2), -0.5, dtype=torch.float64)
    optimizer.step()
    assert torch.equal(weight.detach(), torch.ones(2, 2, dtype=torch.float64))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    """Steps on fixed data, a batch per step drawn from the step's index."""
    for index in steps:
        generator = torch.Generator().manual_seed(index)
        inputs = torch.randn(16, 5, generator=generator)
        targets = torch.randn(16, 3, generator=generator)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


def test_a_resumed_lars_run_equals_a_straight_one() -> None:
    straight = small_model()
    train(straight, build_optimizer("lars", straight, lr=0.5, weight_decay=1e-3), range(6))

    first = small_model()
    optimizer = build_optimizer("lars", first, lr=0.5, weight_decay=1e-3)
    train(first, optimizer, range(3))
    saved_model, saved_optimizer = copy.deepcopy(first.state_dict()), optimizer.state_dict()

    resumed = small_model()
    resumed.load_state_dict(saved_model)
    optimizer = build_optimizer("lars", resumed, lr=0.5, weight_decay=1e-3)
    optimizer.load_state_dict(saved_optimizer)
    train(resumed, optimizer, range(3, 6))
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_named_optimizers_step_exactly_as_the_train_loops_former_ones(name: str) -> None:
    new, old = small_model(), small_model()
    built = build_optimizer(name, new, lr=0.05, weight_decay=1e-2)
    reference = _optimizer({"optimizer": name, "lr": 0.05, "weight_decay": 1e-2}, old)
    assert type(built) is type(reference)
    assert built.state_dict()["param_groups"] == reference.state_dict()["param_groups"]
    train(new, built, range(4))
    train(old, reference, range(4))
    for key, value in new.state_dict().items():
        assert torch.equal(value, old.state_dict()[key]), key


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_parameterless_models_get_one_empty_group(name: str) -> None:
    optimizer = build_optimizer(name, nn.Module(), lr=0.1, weight_decay=0.0)
    assert [len(group["params"]) for group in optimizer.param_groups] == [0]


def test_unknown_optimizers_are_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'") as caught:
        build_optimizer("rmsprop", small_model(), lr=0.1, weight_decay=0.0)
    assert all(name in str(caught.value) for name in OPTIMIZERS)


def test_warmup_cosine_is_the_train_loops_former_factor() -> None:
    for warmup, total in [(0, 10), (3, 10), (5, 5), (10, 1000)]:
        factors = [warmup_cosine(step, warmup, total) for step in range(total + 3)]
        assert factors == [_lr_factor(step, warmup, total) for step in range(total + 3)]
    factors = [warmup_cosine(step, 10, 100) for step in range(105)]
    assert factors[0] == 0.1 and factors[9] == 1.0 and factors[10] == 1.0
    assert factors[100] == 0.0 and factors[104] == 0.0
    assert all(a < b for a, b in zip(factors[:10], factors[1:10], strict=False))
    assert all(a > b for a, b in zip(factors[10:100], factors[11:101], strict=True))
    assert warmup_cosine(0, 0, 100) == 1.0


def test_cosine_momentum_rises_from_base_to_one() -> None:
    values = [cosine_momentum(step, 200, 0.996) for step in range(205)]
    assert values[0] == 0.996 and values[200] == 1.0 and values[204] == 1.0
    assert values[100] == pytest.approx(0.998)
    assert all(a < b for a, b in zip(values[:200], values[1:201], strict=True))
    assert cosine_momentum(0, 0, 0.99) == 0.99
