"""The evaluation stage: the protocols the spec's ``evaluate:`` section chooses, run on the
encoder and on two baselines (raw pixels; a randomly initialised encoder of the same
architecture) over the one fixed train/test split, then logged to an MLflow run: metrics,
the split itself, and pictures.

Metric names: ``{subject}.{protocol}.top1`` with subject ``eval`` (the encoder),
``baseline.raw`` or ``baseline.random``, and protocol ``linear``, ``knn`` or
``semi.{fraction}.{linear|finetune}`` (then ``.top1.mean`` and ``.top1.std`` over seeds).
The job's driver and ``selfsup eval`` both go through ``evaluate_encoder`` and
``log_evaluation``, so their numbers agree on the same split.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.figure import Figure
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from torch import nn

from pipelines import figures, tags
from pipelines.protocols import (
    extract_features,
    finetune_scores,
    knn_scores,
    label_subset,
    linear_probe_scores,
    top_k_accuracy,
)
from pipelines.spec import EvaluateSpec
from workers.data import ImageDataset, Split
from workers.encoders import build_encoder

ENCODER, RAW, RANDOM = "eval", "baseline.raw", "baseline.random"
SUBJECT_NAMES = {ENCODER: "encoder", RAW: "raw pixels", RANDOM: "random init"}


@dataclass(frozen=True)
class Subject:
    """What is evaluated: features of every sample, and the network behind them when there
    is one to fine-tune (none for raw pixels)."""

    prefix: str
    features: np.ndarray  # (N, D)
    network: nn.Module | None


@dataclass
class Evaluation:
    metrics: dict[str, float]
    split: dict  # how the split was made and its indices: see ``split_record``
    figures: dict[str, Figure] = field(default_factory=dict)


def split_record(source: str, split: Split, test_fraction: float, split_seed: int) -> dict:
    """The split as recorded with every evaluation: its recipe, and a digest of its indices
    so that two runs can be checked to share it."""
    indices = np.concatenate([split.train, [-1], split.test]).astype(np.int64)
    return {
        "source": source,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
        "digest": hashlib.sha256(indices.tobytes()).hexdigest()[:16],
        "train": split.train.tolist(),
        "test": split.test.tolist(),
    }


def _accuracies(name: str, scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    accuracies = {f"{name}.top1": top_k_accuracy(scores, labels, 1)}
    if scores.shape[1] > 5:
        accuracies[f"{name}.top5"] = top_k_accuracy(scores, labels, 5)
    return accuracies


def _mean_and_std(name: str, values: list[float]) -> dict[str, float]:
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {f"{name}.top1.mean": float(np.mean(values)), f"{name}.top1.std": std}


def _semi_metrics(
    subject: Subject,
    images: torch.Tensor,
    labels: np.ndarray,
    split: Split,
    spec: EvaluateSpec,
    num_classes: int,
) -> dict[str, float]:
    """Linear probe (and fine-tuning) on each label fraction, once per seed. A seed picks the
    same labelled subset for every subject, so the baselines see the very same labels."""
    metrics: dict[str, float] = {}
    test_features, test_labels = subject.features[split.test], labels[split.test]
    for fraction in spec.label_fractions:
        results: dict[str, list[float]] = {"linear": [], "finetune": []}
        for seed in spec.seeds:
            subset = split.train[label_subset(labels[split.train], fraction, seed)]
            scores = linear_probe_scores(
                subject.features[subset], labels[subset], test_features, num_classes
            )
            results["linear"].append(top_k_accuracy(scores, test_labels, 1))
            if spec.finetune and subject.network is not None:
                scores = finetune_scores(
                    subject.network,
                    images[subset],
                    labels[subset],
                    images[split.test],
                    num_classes,
                    spec.finetune_steps,
                    spec.finetune_lr,
                    seed,
                )
                results["finetune"].append(top_k_accuracy(scores, test_labels, 1))
        for protocol, values in results.items():
            if values:
                metrics |= _mean_and_std(f"{subject.prefix}.semi.{fraction:g}.{protocol}", values)
    return metrics


def evaluate_encoder(
    encoder: nn.Module,
    dataset: ImageDataset,
    split: Split,
    spec: EvaluateSpec,
    seed: int,
    source: str,
    test_fraction: float,
    split_seed: int,
) -> Evaluation:
    """Run the chosen protocols on ``encoder`` and the baselines; ``seed`` initialises the
    random-encoder baseline (the job passes its training seed, so the baseline is exactly
    the network pretraining started from)."""
    if dataset.labels is None:
        raise ValueError(f"{source} has no labels: there is nothing to evaluate against")
    images, labels = dataset.images, dataset.labels.numpy()
    num_classes = int(labels.max()) + 1
    subjects = [Subject(ENCODER, extract_features(encoder, images), encoder)]
    if spec.baselines:
        torch.manual_seed(seed)
        random_encoder = build_encoder(encoder.config)
        subjects += [
            Subject(RAW, images.flatten(1).numpy(), None),
            Subject(RANDOM, extract_features(random_encoder, images), random_encoder),
        ]
    train_labels, test_labels = labels[split.train], labels[split.test]
    metrics: dict[str, float] = {}
    knn_predictions: np.ndarray | None = None
    for subject in subjects:
        train_features, test_features = subject.features[split.train], subject.features[split.test]
        if spec.linear:
            scores = linear_probe_scores(train_features, train_labels, test_features, num_classes)
            metrics |= _accuracies(f"{subject.prefix}.linear", scores, test_labels)
        if spec.knn:
            scores = knn_scores(
                train_features,
                train_labels,
                test_features,
                num_classes,
                spec.knn_k,
                spec.knn_temperature,
            )
            metrics |= _accuracies(f"{subject.prefix}.knn", scores, test_labels)
            if subject.prefix == ENCODER:
                knn_predictions = scores.argmax(axis=1)
        metrics |= _semi_metrics(subject, images, labels, split, spec, num_classes)

    pictures = {
        "features_pca.png": figures.projection_figure(
            [(SUBJECT_NAMES[s.prefix], s.features[split.test]) for s in subjects], test_labels
        )
    }
    if knn_predictions is not None:
        pictures["knn_confusion.png"] = figures.confusion_figure(
            test_labels,
            knn_predictions,
            num_classes,
            f"kNN (k={spec.knn_k}, T={spec.knn_temperature:g}) on the encoder's features",
        )
    curves = label_fraction_curves(metrics)
    if curves:
        pictures["accuracy_vs_labels.png"] = figures.label_fraction_figure(
            curves, f"{source}: top-1 against labelled fraction"
        )
    record = split_record(source, split, test_fraction, split_seed)
    return Evaluation(metrics=metrics, split=record, figures=pictures)


def label_fraction_curves(
    metrics: dict[str, float],
) -> dict[tuple[str, str], list[tuple[float, float, float]]]:
    """(fraction, mean, std) points per (subject, protocol) line, read back from metric
    names; the full-label linear probe is the point at fraction 1."""
    curves: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for prefix, subject in SUBJECT_NAMES.items():
        for protocol in ("linear", "finetune"):
            points = []
            for key, mean in metrics.items():
                head, _, rest = key.partition(".semi.")
                if head == prefix and rest.endswith(f".{protocol}.top1.mean"):
                    fraction = rest.removesuffix(f".{protocol}.top1.mean")
                    std = metrics[key.removesuffix(".mean") + ".std"]
                    points.append((float(fraction), mean, std))
            if points and protocol == "linear" and f"{prefix}.linear.top1" in metrics:
                points.append((1.0, metrics[f"{prefix}.linear.top1"], 0.0))
            if points:
                curves[subject, protocol] = points
    return curves


def log_evaluation(
    client: MlflowClient, run_id: str, evaluation: Evaluation, model_id: str | None = None
) -> None:
    """Metrics (linked to the logged model ``model_id`` and to the split's digest as the
    dataset), the split's tags and indices, and the pictures, into ``run_id``."""
    now = int(time.time() * 1000)
    split = evaluation.split
    metrics = [
        Metric(
            key,
            value,
            now,
            0,
            model_id=model_id,
            dataset_name=split["source"],
            dataset_digest=split["digest"],
        )
        for key, value in evaluation.metrics.items()
    ]
    split_tags = {
        tags.SPLIT_TEST_FRACTION: str(split["test_fraction"]),
        tags.SPLIT_SEED: str(split["split_seed"]),
        tags.SPLIT_DIGEST: split["digest"],
    }
    client.log_batch(
        run_id, metrics=metrics, tags=[RunTag(key, value) for key, value in split_tags.items()]
    )
    client.log_dict(run_id, split, "eval/split.json")
    for name, picture in evaluation.figures.items():
        client.log_figure(run_id, picture, f"eval/{name}")
