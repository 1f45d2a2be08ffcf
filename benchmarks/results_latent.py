"""The rows of docs/results-latent.md that are not benchmarks of speed.

.venv/bin/python -m benchmarks.results_latent dictionary [--budget 60]
    Sparse coding's dictionary learning (this project's method, one process) against
    scikit-learn's MiniBatchDictionaryLearning at the same lam (alpha = lam / 2) and the
    same wall-clock budget on whitened 8x8 patches; both dictionaries are scored by the
    same solver (FISTA, float64, tolerance 1e-7) on the same held-out patches.
.venv/bin/python -m benchmarks.results_latent rbm [--epochs 20]
    RBM features + logistic regression on the digits (the fixed split of every job):
    this project's RBM (CD-1 and persistent CD) against scikit-learn's BernoulliRBM in
    the same scikit-learn pipeline, next to logistic regression on raw pixels.
.venv/bin/python -m benchmarks.results_latent probes --tracking-uri URI
    The evaluation metrics of the latest finished job of each examples/*-digits.yaml in
    a stack's MLflow (run those jobs first; see docs/results-latent.md).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import BernoulliRBM
from sklearn.pipeline import make_pipeline

from benchmarks.latent_common import fista, objective, patches
from pipelines.params import RBMParams, SparseCodingParams
from workers.augment import build_augment
from workers.data import load_dataset, split_indices
from workers.encoders import build_encoder
from workers.methods import MethodContext
from workers.methods.rbm import RBM
from workers.methods.sparse_coding import SparseCoding
from workers.step import Training

LAM = 2.0
AUGMENT = build_augment("none", 1, 0, 0)
PROBE_METHODS = (
    "kmeans",
    "pca",
    "sparse_coding",
    "lista",
    "conv_sparse_coding",
    "vae",
    "dae",
    "rbm",
    "ebm_langevin",
)


def held_out_objective(held_out: torch.Tensor, dictionary: torch.Tensor) -> float:
    """Mean over held-out patches of min_z E(y, z), by the same solver for every dictionary."""
    y, atoms = held_out.double(), dictionary.double()
    return objective(y, fista(y, atoms, LAM, 1e-7, 50_000).codes, atoms, LAM) / len(y)


def dictionary_row(budget: float) -> None:
    data = patches(8, 22_000, seed=2)
    train, held_out = data[:20_000], data[20_000:]
    generator = torch.Generator().manual_seed(0)

    torch.manual_seed(0)
    backbone = build_encoder({"arch": "mlp", "in_channels": 64, "image_size": 1, "out_dim": 1})
    params = SparseCodingParams(
        name="sparse_coding", atoms=128, lam=LAM, solver="fista", tol=1e-4, max_iter=300
    )
    method = SparseCoding(params, MethodContext(backbone, feature_dim=1, num_samples=len(train)))
    training = Training.of(method, torch.optim.Adam(method.parameters(), lr=3e-3), AUGMENT)
    start = time.perf_counter()
    while time.perf_counter() - start < budget:
        rows = torch.randint(0, len(train), (256,), generator=generator)
        training.train_step(train[rows], rows)
    steps = training.step
    ours = method.coder.dictionary.detach()

    reference = MiniBatchDictionaryLearning(
        n_components=128, alpha=LAM / 2, batch_size=256, random_state=0, fit_algorithm="cd"
    )
    batches, start = 0, time.perf_counter()
    numpy_train = train.double().numpy()
    while time.perf_counter() - start < budget:
        rows = torch.randint(0, len(train), (256,), generator=generator).numpy()
        reference.partial_fit(numpy_train[rows])
        batches += 1
    theirs = torch.from_numpy(reference.components_.T.copy())

    print(
        f"\nDictionary learning, whitened 8x8 patches, 128 atoms, lam {LAM}, {budget:g} s each:\n"
    )
    print("| learner | steps of 256 patches | held-out mean min_z E(y, z) |")
    print("|---|---|---|")
    ours_value, theirs_value = (
        held_out_objective(held_out, ours),
        held_out_objective(held_out, theirs),
    )
    print(f"| selfsup sparse_coding (FISTA + Adam, lr 3e-3) | {steps} | {ours_value:.4f} |")
    print(f"| sklearn MiniBatchDictionaryLearning | {batches} | {theirs_value:.4f} |")
    zero = held_out.pow(2).sum(1).mean().item()
    print(f"| (no dictionary: z = 0) | - | {zero:.4f} |")


class SelfsupRBM(BaseEstimator, TransformerMixin):
    """This project's RBM as a scikit-learn transformer: fit trains the method on the rows
    (SGD, one shuffled pass per epoch), transform gives p(z = 1 | y)."""

    def __init__(
        self, hidden: int = 100, persistent: bool = False, epochs: int = 20, lr: float = 0.05
    ) -> None:
        self.hidden, self.persistent, self.epochs, self.lr = hidden, persistent, epochs, lr

    def fit(self, rows: np.ndarray, labels: np.ndarray | None = None) -> SelfsupRBM:
        torch.manual_seed(0)
        data = torch.from_numpy(rows.astype(np.float32))
        config = {"arch": "mlp", "in_channels": data.shape[1], "image_size": 1, "out_dim": 1}
        params = RBMParams(
            name="rbm", hidden=self.hidden, cd_steps=1, persistent=self.persistent, chains=10
        )
        context = MethodContext(build_encoder(config), feature_dim=1, num_samples=len(data))
        method = RBM(params, context)
        training = Training.of(method, torch.optim.SGD(method.parameters(), lr=self.lr), AUGMENT)
        for _ in range(self.epochs):
            for rows_index in torch.randperm(len(data)).split(10):
                training.train_step(data[rows_index], rows_index)
        self.encoder_ = method.encoder().eval()
        return self

    def transform(self, rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.encoder_(torch.from_numpy(rows.astype(np.float32))).numpy()


def rbm_row(epochs: int) -> None:
    digits = load_dataset("builtin:digits")
    split = split_indices(digits.labels, 0.25, 0)
    rows, labels = digits.images.flatten(1).numpy(), digits.labels.numpy()

    def score(features: object) -> float:
        logistic = LogisticRegression(C=100.0, max_iter=5000)
        pipeline = make_pipeline(features, logistic) if features else make_pipeline(logistic)
        pipeline.fit(rows[split.train], labels[split.train])
        return float(pipeline.score(rows[split.test], labels[split.test]))

    reference = BernoulliRBM(
        n_components=100, learning_rate=0.05, batch_size=10, n_iter=epochs, random_state=0
    )
    print(f"\nRBM features + logistic regression (C 100), digits, {epochs} epochs, 100 hidden:\n")
    print("| features | test top-1 |")
    print("|---|---|")
    print(f"| sklearn BernoulliRBM (PCD, lr 0.05, batch 10) | {score(reference):.4f} |")
    for persistent in (False, True):
        name = "persistent CD" if persistent else "CD-1"
        ours = SelfsupRBM(100, persistent, epochs, 0.05)
        print(f"| selfsup rbm ({name}, SGD lr 0.05, batch 10) | {score(ours):.4f} |")
    print(f"| raw pixels | {score(None):.4f} |")


def probes_row(tracking_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    keys = (
        "eval.linear.top1",
        "eval.knn.top1",
        "baseline.raw.linear.top1",
        "baseline.random.linear.top1",
    )
    print("\nLinear probe (and kNN) of each encoder on the digits' held-out quarter:\n")
    print(
        "| method | job | linear top-1 | kNN top-1 | raw pixels (linear) | random init (linear) |"
    )
    print("|---|---|---|---|---|---|")
    for method in PROBE_METHODS:
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"params.`method.name` = '{method}' and "
            "params.`data.source` = 'builtin:digits' and attributes.status = 'FINISHED'",
            order_by=["attributes.end_time DESC"],
            max_results=1,
        )
        if not runs:
            print(f"| {method} | (no finished job) | | | | |")
            continue
        metrics = runs[0].data.metrics
        values = " | ".join(f"{metrics[key]:.4f}" if key in metrics else "-" for key in keys)
        print(f"| {method} | {runs[0].info.run_name} | {values} |")


def latest_finished_runs(tracking_uri: str) -> dict[str, object]:
    """Job name -> its latest finished MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.end_time ASC"],
    )
    return {run.data.params.get("name", run.info.run_name): run for run in runs}


def figures_row(tracking_uri: str, out: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    out.mkdir(parents=True, exist_ok=True)
    for name, run in sorted(latest_finished_runs(tracking_uri).items()):
        with tempfile.TemporaryDirectory() as scratch:
            for artifact in client.list_artifacts(run.info.run_id, "figures"):
                local = client.download_artifacts(run.info.run_id, artifact.path, scratch)
                target = out / f"{name}-{Path(artifact.path).name}"
                shutil.copyfile(local, target)
                print(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["dictionary", "rbm", "probes", "figures"])
    parser.add_argument("--out", type=Path, default=Path("docs/img/latent"))
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per learner")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--tracking-uri", default="sqlite:///.selfsup/mlflow.db")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # scikit-learn's convergence warnings, one per sample
    if args.section == "dictionary":
        dictionary_row(args.budget)
    elif args.section == "rbm":
        rbm_row(args.epochs)
    elif args.section == "probes":
        probes_row(args.tracking_uri)
    else:
        figures_row(args.tracking_uri, args.out)


if __name__ == "__main__":
    main()
