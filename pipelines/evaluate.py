"""Downstream evaluation of a frozen encoder: a linear probe, next to the raw-pixel and the
randomly initialised encoder baselines on the very same split."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from workers.data import ImageDataset, Split
from workers.encoders import EncoderConfig, build_encoder


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Frozen features, in eval mode, batch by batch: (N, C, H, W) -> (N, D)."""
    encoder.eval()
    chunks = [
        encoder(images[start : start + batch_size]) for start in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks).cpu().numpy()


def linear_probe_top1(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
) -> float:
    """Top-1 accuracy of a logistic regression on standardised frozen features."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=1.0))
    probe.fit(train_features, train_labels)
    return float((probe.predict(test_features) == test_labels).mean())


def _probe(features: np.ndarray, labels: np.ndarray, split: Split) -> float:
    return linear_probe_top1(
        features[split.train], labels[split.train], features[split.test], labels[split.test]
    )


def evaluate_linear(
    encoder: nn.Module,
    encoder_config: EncoderConfig,
    dataset: ImageDataset,
    split: Split,
    seed: int,
) -> dict[str, float]:
    """The encoder's linear-probe top-1 and both baselines', keyed as MLflow metrics."""
    labels = dataset.labels.numpy()
    torch.manual_seed(seed)
    random_encoder = build_encoder(encoder_config)
    return {
        "eval.linear.top1": _probe(extract_features(encoder, dataset.images), labels, split),
        "baseline.raw.linear.top1": _probe(dataset.images.flatten(1).numpy(), labels, split),
        "baseline.random.linear.top1": _probe(
            extract_features(random_encoder, dataset.images), labels, split
        ),
    }
