"""The evaluation's pictures, drawn with matplotlib's object API (no pyplot, no global
backend state): Agg renders them when MLflow saves them as PNG artifacts."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

CLASS_COLOURS = "tab10"


def pca_2d(features: np.ndarray) -> np.ndarray:
    """The features projected on their two leading principal axes: (N, D) -> (N, 2)."""
    centred = features - features.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    return centred @ axes[:2].T


def projection_figure(panels: list[tuple[str, np.ndarray]], labels: np.ndarray) -> Figure:
    """One PCA scatter per (title, features) panel, points coloured by class."""
    figure = Figure(figsize=(4.2 * len(panels), 4.2), layout="constrained")
    classes = np.unique(labels)
    for position, (title, features) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), position + 1)
        points = pca_2d(features)
        scatter = axes.scatter(
            points[:, 0], points[:, 1], c=labels, cmap=CLASS_COLOURS, s=8, alpha=0.8
        )
        axes.set(title=f"{title}: PCA of test features", xticks=[], yticks=[])
    if len(classes) <= 20:
        figure.legend(
            *scatter.legend_elements(num=len(classes)),
            title="class",
            loc="outside right center",
        )
    return figure


def confusion_figure(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, title: str
) -> Figure:
    """Row-normalised confusion matrix, with the counts written in the cells."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure = Figure(figsize=(5.5, 4.8), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if num_classes <= 20:
        for (row, column), count in np.ndenumerate(counts):
            if count:
                colour = "white" if rates[row, column] > 0.5 else "black"
                axes.text(column, row, str(count), ha="center", va="center", color=colour)
    axes.set(
        title=title,
        xlabel="predicted class",
        ylabel="true class",
        xticks=range(num_classes),
        yticks=range(num_classes),
    )
    figure.colorbar(image, ax=axes, label="fraction of the true class")
    return figure


SUBJECT_COLOURS = {"encoder": "tab:blue", "raw pixels": "tab:gray", "random init": "tab:orange"}
PROTOCOL_STYLES = {"linear": "-", "finetune": "--"}


def label_fraction_figure(
    curves: dict[tuple[str, str], list[tuple[float, float, float]]], title: str
) -> Figure:
    """Top-1 against the fraction of training labels, one line per (subject, protocol):
    ``curves[subject, protocol] = [(fraction, mean, std), ...]``; error bars are the std over
    seeds. Colour says which network, line style which protocol."""
    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    axes = figure.add_subplot()
    fractions_seen: set[float] = set()
    for (subject, protocol), points in curves.items():
        fractions, means, stds = (list(column) for column in zip(*sorted(points), strict=True))
        fractions_seen.update(fractions)
        axes.errorbar(
            fractions,
            means,
            yerr=stds,
            label=f"{subject}, {protocol}",
            color=SUBJECT_COLOURS.get(subject),
            linestyle=PROTOCOL_STYLES.get(protocol, ":"),
            marker="o",
            capsize=3,
        )
    ticks = sorted(fractions_seen)
    axes.set(
        xscale="log",
        xticks=ticks,
        xticklabels=[
            f"{fraction:.0%}" if fraction >= 0.01 else f"{fraction:.1%}" for fraction in ticks
        ],
        xlabel="fraction of training labels",
        ylabel="top-1 accuracy on the test split",
        title=title,
        ylim=(0, 1.02),
    )
    axes.minorticks_off()
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure
