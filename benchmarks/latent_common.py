"""What the latent-family benchmarks share: natural-image patches, a dictionary learned on
them by this project's sparse coding (the method's own step, one process), and timing."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from pipelines.params import SparseCodingParams
from workers import sparse
from workers.augment import build_augment
from workers.data import load_dataset
from workers.encoders import build_encoder
from workers.methods import Method, MethodContext
from workers.methods.sparse_coding import SparseCoding
from workers.step import Training


def patches(size: int, count: int, seed: int = 0) -> torch.Tensor:
    """Whitened natural-image patches (builtin:patches, whiten: true), flattened: (count, D)."""
    options = {"size": size, "count": count, "seed": seed, "whiten": True}
    return load_dataset("builtin:patches", options).samples.flatten(1)


def learn_dictionary(
    train: torch.Tensor, atoms: int, lam: float, steps: int, lr: float = 3e-3, batch: int = 256
) -> torch.Tensor:
    """Sparse coding's dictionary after ``steps`` steps of the method on ``train``: (D, atoms).

    The same method class the jobs train (FISTA codes, Adam step, unit columns), seeded."""
    torch.manual_seed(0)
    dim = train.shape[1]
    backbone = build_encoder({"arch": "mlp", "in_channels": dim, "image_size": 1, "out_dim": 1})
    params = SparseCodingParams(
        name="sparse_coding", atoms=atoms, lam=float(lam), solver="fista", tol=1e-4, max_iter=300
    )
    method = SparseCoding(params, MethodContext(backbone, feature_dim=1, num_samples=len(train)))
    train_method(method, torch.optim.Adam(method.parameters(), lr=lr), train, steps, batch)
    return method.coder.dictionary.detach().clone()


def train_method(
    method: Method, optimizer: torch.optim.Optimizer, data: torch.Tensor, steps: int, batch: int
) -> dict[str, torch.Tensor]:
    """``steps`` training steps of ``method`` in one process, the train loop's own
    (``workers.step.Training``, constant learning rate), on batches drawn with replacement
    from ``data`` by a seeded generator; returns the last step's outputs."""
    training = Training.of(method, optimizer, build_augment("none", 1, 0, 0))
    generator = torch.Generator().manual_seed(0)
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(steps):
        rows = torch.randint(0, len(data), (batch,), generator=generator)
        outputs = training.train_step(data[rows], rows)
    return outputs


def fista(
    y: torch.Tensor, dictionary: torch.Tensor, lam: float, tol: float, max_iter: int, **kw: Any
) -> sparse.Solution:
    """Batched FISTA (``accelerated=False``: ISTA) on y (n, D) with W (D, atoms)."""
    return sparse.solve_dense(y, dictionary, lam, tol, max_iter, **kw)


def objective(y: torch.Tensor, codes: torch.Tensor, dictionary: torch.Tensor, lam: float) -> float:
    """sum over samples of E(y, z) = ||y - W z||^2 + lam |z|_1, in float64."""
    forward, _ = sparse.dense_operators(dictionary.double())
    return sparse.energy(y.double(), codes.double(), forward, lam).sum().item()


def best_time(work: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The fastest of ``repeats`` runs of ``work`` in seconds, and what the last one returned."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - start)
    return best, result
