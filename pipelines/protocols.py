"""Downstream protocols, as pure functions on features (or images) and integer labels.

Each classifier returns class scores of shape (n_test, num_classes), so top-1 and top-5 are
computed the same way for all of them (``top_k_accuracy``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn

# CPU threads every protocol runs on (torch and BLAS alike); see ``pinned_threads``.
THREADS = 1


@contextmanager
def pinned_threads() -> Iterator[None]:
    """Run on ``THREADS`` CPU threads: one, because the protocols' kernels are small, so more
    threads mostly synchronise, and where the cores are busy they spin: the job's driver
    holds no Ray CPUs, so admitted training gangs may share its cores (see
    benchmarks/bench_evaluate.py). One thread also gives the job's driver and
    ``selfsup eval`` the very same numbers on the same machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with threadpool_limits(limits=THREADS):
            yield
    finally:
        torch.set_num_threads(previous)


@pinned_threads()
@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Frozen features, in eval mode, batch by batch: (N, C, H, W) -> (N, D)."""
    encoder.eval()
    chunks = [
        encoder(images[start : start + batch_size]) for start in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks).cpu().numpy()


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores (k = 1: plain accuracy).
    Ties go to the lower class index, as with ``argmax``."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (n, k)
    return float((top == labels[:, None]).any(axis=1).mean())


@pinned_threads()
def linear_probe_scores(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    num_classes: int,
) -> np.ndarray:
    """Class probabilities of a multinomial logistic regression on standardised frozen
    features (L-BFGS, deterministic), one column per class even for classes it never saw."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=1.0))
    probe.fit(train_features, train_labels)
    scores = np.zeros((len(test_features), num_classes))
    scores[:, probe.classes_] = probe.predict_proba(test_features)
    return scores


@pinned_threads()
def knn_scores(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Temperature-weighted kNN votes on cosine similarity (Wu et al. 2018): each of a test
    point's k most similar training points votes for its class with weight exp(s / T),
    where s is the cosine similarity of the L2-normalised features.

    Test points go ``chunk_size`` at a time, so memory is O(chunk_size * n_train), not
    O(n_test * n_train); every test row's votes depend on that row alone.
    """
    bank = F.normalize(torch.as_tensor(train_features, dtype=torch.float64), dim=1)  # (n, D)
    bank_labels = torch.as_tensor(train_labels, dtype=torch.int64)
    queries = F.normalize(torch.as_tensor(test_features, dtype=torch.float64), dim=1)
    k = min(k, len(bank))
    votes = []
    for chunk in queries.split(chunk_size):
        similarity, neighbours = (chunk @ bank.T).topk(k, dim=1)  # (c, k) each
        weights = (similarity / temperature).exp()
        chunk_votes = torch.zeros(len(chunk), num_classes, dtype=torch.float64)
        votes.append(chunk_votes.scatter_add_(1, bank_labels[neighbours], weights))
    return torch.cat(votes).numpy()


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Positions (into ``labels``) of a stratified random ``fraction`` of the examples: from
    each class round(fraction * count), at least one. The same seed gives the same subset."""
    generator = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = max(1, round(fraction * len(members)))
        chosen.append(generator.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen))


@pinned_threads()
def finetune_scores(
    encoder: nn.Module,
    train_images: torch.Tensor,
    train_labels: np.ndarray,
    test_images: torch.Tensor,
    num_classes: int,
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 64,
) -> np.ndarray:
    """Softmax scores on the test images after fine-tuning a copy of the whole encoder with
    a new linear head on the (few) labelled images: Adam, cross entropy, ``steps`` batches
    drawn epoch by epoch. A budget in steps, not epochs, because 1% of the labels can be a
    dozen images: a few epochs of them would be a few steps. ``encoder`` is left untouched."""
    if len(train_labels) < 2:
        raise ValueError("fine-tuning needs at least 2 labelled images")
    torch.manual_seed(seed)
    network = copy.deepcopy(encoder)
    with torch.no_grad():
        feature_dim = network.eval()(train_images[:1]).shape[1]
    model = nn.Sequential(network, nn.Linear(feature_dim, num_classes)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    targets = torch.as_tensor(train_labels, dtype=torch.int64)
    order_generator = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    for _ in range(steps):
        if not batches:
            order = torch.randperm(len(targets), generator=order_generator)
            # BatchNorm cannot normalise a batch of one in training mode: drop such a tail.
            batches = [batch for batch in order.split(batch_size) if len(batch) > 1]
        batch = batches.pop(0)
        loss = F.cross_entropy(model(train_images[batch]), targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return F.softmax(torch.from_numpy(extract_features(model, test_images)), dim=1).numpy()
