"""Each evaluation protocol on tiny synthetic problems whose answer is known, the evaluation
stage's metric names and pictures, the split record, the result table and the spec section."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.evaluate import evaluate_encoder, label_fraction_curves, split_record
from pipelines.protocols import (
    finetune_scores,
    knn_scores,
    label_subset,
    linear_probe_scores,
    top_k_accuracy,
)
from pipelines.spec import EncoderSpec, EvaluateSpec, SpecError, parse_spec
from service.results import results_table
from workers.data import ImageDataset, Split, split_indices
from workers.encoders import build_encoder


def blobs(num_classes: int, per_class: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tight clusters around far-apart centres: linearly separable, and each point's nearest
    neighbours share its class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 10
    labels = np.repeat(np.arange(num_classes), per_class)
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def quadrant_images(per_class: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """1x8x8 images whose class (0-3) is the quadrant that is lit, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(4), per_class)
    images = 0.2 * torch.rand(len(labels), 1, 8, 8, generator=generator)
    for index, label in enumerate(labels):
        row, column = divmod(int(label), 2)
        images[index, 0, 4 * row : 4 * row + 4, 4 * column : 4 * column + 4] += 0.8
    return images, labels


def small_convnet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_encoder(EncoderSpec(out_dim=16).config(in_channels=1, image_size=8))


def test_top_k_accuracy_counts_a_hit_anywhere_in_the_top_k() -> None:
    scores = np.array([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1], [0.2, 0.3, 0.5]])
    labels = np.array([2, 0, 0])
    assert top_k_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, labels, 3) == 1.0


def test_linear_probe_separable_features_score_one() -> None:
    features, labels = blobs(num_classes=6, per_class=40, dim=16, seed=0)
    train, test = np.arange(len(labels)) % 2 == 0, np.arange(len(labels)) % 2 == 1
    scores = linear_probe_scores(features[train], labels[train], features[test], 6)
    assert scores.shape == (test.sum(), 6)
    assert top_k_accuracy(scores, labels[test], 1) == 1.0


def test_linear_probe_and_knn_on_shuffled_labels_are_at_chance() -> None:
    features, labels = blobs(num_classes=10, per_class=300, dim=16, seed=1)
    shuffled = np.random.default_rng(2).permutation(labels)
    train, test = np.arange(3000) % 3 == 0, np.arange(3000) % 3 != 0  # 2000 test points
    for targets, expected in ((shuffled, 0.1), (labels, 1.0)):  # chance is 0.1 +- 0.007
        linear = linear_probe_scores(features[train], targets[train], features[test], 10)
        knn = knn_scores(features[train], targets[train], features[test], 10, 20, 0.1)
        for scores in (linear, knn):
            assert abs(top_k_accuracy(scores, targets[test], 1) - expected) < 0.035


def test_knn_votes_are_temperature_weighted_cosine_similarities() -> None:
    # Training points at angles 0, 60 and 180 degrees (lengths do not matter: cosine).
    train = np.array([[2.0, 0.0], [0.5, 0.5 * np.sqrt(3)], [-3.0, 0.0]])
    labels = np.array([0, 1, 1])
    query = np.array([[1.0, 0.0]])  # similarities 1, 0.5, -1
    votes = knn_scores(train, labels, query, num_classes=2, k=2, temperature=0.5)
    np.testing.assert_allclose(votes, [[np.exp(1 / 0.5), np.exp(0.5 / 0.5)]])
    # With all three neighbours, class 1 gains exp(-1 / 0.5) more.
    votes = knn_scores(train, labels, query, num_classes=2, k=3, temperature=0.5)
    np.testing.assert_allclose(votes, [[np.exp(2.0), np.exp(1.0) + np.exp(-2.0)]])


def test_knn_in_chunks_equals_the_unchunked_computation() -> None:
    rng = np.random.default_rng(3)
    train, test = rng.normal(size=(500, 24)), rng.normal(size=(203, 24))
    labels = rng.integers(0, 7, 500)
    whole = knn_scores(train, labels, test, 7, k=15, temperature=0.07, chunk_size=len(test))
    for chunk_size in (1, 10, 64):
        chunked = knn_scores(train, labels, test, 7, k=15, temperature=0.07, chunk_size=chunk_size)
        np.testing.assert_array_equal(chunked.argmax(axis=1), whole.argmax(axis=1))
        np.testing.assert_allclose(chunked, whole, rtol=1e-12)


def test_label_subset_is_stratified_seeded_and_keeps_every_class() -> None:
    labels = np.array([0] * 500 + [1] * 300 + [2] * 20 + [3] * 3)
    subset = label_subset(labels, 0.01, seed=0)
    counts = np.bincount(labels[subset], minlength=4)
    np.testing.assert_array_equal(counts, [5, 3, 1, 1])  # round(1% of each), at least one
    assert len(np.unique(subset)) == len(subset)
    np.testing.assert_array_equal(subset, label_subset(labels, 0.01, seed=0))
    assert not np.array_equal(subset, label_subset(labels, 0.01, seed=1))
    tenth = np.bincount(labels[label_subset(labels, 0.1, seed=0)], minlength=4)
    np.testing.assert_array_equal(tenth, [50, 30, 2, 1])


def test_finetune_learns_a_separable_image_task_and_leaves_the_encoder_alone() -> None:
    images, labels = quadrant_images(per_class=40, seed=0)
    train, test = np.arange(len(labels)) % 4 != 0, np.arange(len(labels)) % 4 == 0
    encoder = small_convnet(seed=0)
    before = {name: tensor.clone() for name, tensor in encoder.state_dict().items()}
    scores = finetune_scores(
        encoder, images[train], labels[train], images[test], 4, steps=30, lr=3e-3, seed=0
    )
    assert top_k_accuracy(scores, labels[test], 1) == 1.0
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    # Labels shuffled within the training set: nothing to learn, test accuracy near 1/4.
    shuffled = np.random.default_rng(0).permutation(labels[train])
    scores = finetune_scores(
        encoder, images[train], shuffled, images[test], 4, steps=30, lr=3e-3, seed=0
    )
    assert top_k_accuracy(scores, labels[test], 1) < 0.5


def _png_size(figure: object) -> tuple[int, int]:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return Image.open(io.BytesIO(buffer.getvalue())).size


def test_evaluate_encoder_names_every_metric_and_draws_the_pictures() -> None:
    images, labels = quadrant_images(per_class=50, seed=1)
    dataset = ImageDataset(images, torch.from_numpy(labels))
    split = split_indices(dataset.labels, 0.25, seed=0)
    spec = EvaluateSpec(label_fractions=[0.1], seeds=[0, 1], finetune_steps=5, knn_k=5)
    evaluation = evaluate_encoder(small_convnet(0), dataset, split, spec, 0, "synthetic", 0.25, 0)

    semi = [
        f"semi.0.1.{kind}.top1.{stat}"
        for kind in ("linear", "finetune")
        for stat in ("mean", "std")
    ]
    expected = {f"eval.{name}" for name in ("linear.top1", "knn.top1", *semi)}
    expected |= {f"baseline.raw.{name}" for name in ("linear.top1", "knn.top1", *semi[:2])}
    expected |= {f"baseline.random.{name}" for name in ("linear.top1", "knn.top1", *semi)}
    assert set(evaluation.metrics) == expected  # 4 classes: no top-5
    assert all(0 <= value <= 1 for value in evaluation.metrics.values())
    assert evaluation.metrics["baseline.raw.linear.top1"] == 1.0  # quadrants: separable pixels
    assert evaluation.metrics["baseline.raw.knn.top1"] == 1.0

    assert set(evaluation.figures) == {
        "features_pca.png",
        "knn_confusion.png",
        "accuracy_vs_labels.png",
    }
    for figure in evaluation.figures.values():
        width, height = _png_size(figure)
        assert width > 300 and height > 300
    curves = label_fraction_curves(evaluation.metrics)
    assert curves["encoder", "linear"][-1] == (1.0, evaluation.metrics["eval.linear.top1"], 0.0)
    assert ("raw pixels", "finetune") not in curves


def test_evaluation_refuses_data_without_labels() -> None:
    dataset = ImageDataset(torch.rand(20, 1, 8, 8), None)
    split = Split(train=np.arange(15), test=np.arange(15, 20))
    with pytest.raises(ValueError, match="no labels"):
        evaluate_encoder(small_convnet(0), dataset, split, EvaluateSpec(), 0, "unlabelled", 0.25, 0)


def test_split_record_digest_identifies_the_split() -> None:
    labels = torch.from_numpy(np.repeat(np.arange(5), 20))
    first = split_record("x", split_indices(labels, 0.25, 0), 0.25, 0)
    assert first == split_record("x", split_indices(labels, 0.25, 0), 0.25, 0)
    assert first["digest"] != split_record("x", split_indices(labels, 0.25, 1), 0.25, 1)["digest"]
    assert len(first["test"]) == 25 and not set(first["train"]) & set(first["test"])


def test_results_table_has_one_row_per_network_and_one_column_per_protocol() -> None:
    metrics = {
        "eval.linear.top1": 0.96,
        "eval.linear.top5": 0.999,
        "eval.knn.top1": 0.95,
        "eval.semi.0.1.linear.top1.mean": 0.9,
        "eval.semi.0.1.linear.top1.std": 0.01,
        "eval.semi.0.01.finetune.top1.mean": 0.7,
        "eval.semi.0.01.finetune.top1.std": 0.05,
        "baseline.raw.linear.top1": 0.97,
        "baseline.raw.semi.0.1.linear.top1.mean": 0.89,
        "baseline.raw.semi.0.1.linear.top1.std": 0.02,
    }
    header, encoder, raw, legend = results_table(metrics, indent="")
    assert header.split() == ["linear", "knn", "1%", "ft", "10%", "lin"]
    assert encoder.split() == ["encoder", "0.960", "0.950", "0.700±0.050", "0.900±0.010"]
    assert raw.split() == ["raw", "pixels", "0.970", "-", "-", "0.890±0.020"]
    assert legend.startswith("(top-1")
    assert results_table({"model_version": "3"}) == []


def test_spec_evaluate_section() -> None:
    base = {"name": "x", "method": {"name": "simclr"}}
    assert parse_spec({**base, "evaluate": {"linear": True}}).evaluate == EvaluateSpec()
    custom = parse_spec({**base, "evaluate": {"knn": False, "label_fractions": [], "seeds": [7]}})
    assert not custom.evaluate.knn and custom.evaluate.label_fractions == []
    for section, field in (
        ({"label_fractions": [0.1, 0.1]}, "evaluate.label_fractions"),
        ({"label_fractions": [1.0]}, "evaluate.label_fractions.0"),
        ({"seeds": []}, "evaluate.seeds"),
        ({"knn_k": 0}, "evaluate.knn_k"),
        ({"finetune_epochs": 3}, "evaluate.finetune_epochs"),
    ):
        with pytest.raises(SpecError) as error:
            parse_spec({**base, "evaluate": section})
        assert [path for path, _ in error.value.problems] == [field]
