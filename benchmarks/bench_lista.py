"""LISTA against FISTA and ISTA: how many iterations from a zero code each needs to match, in
objective on held-out patches, a T-layer LISTA, for T = 1, 3, 5, 10, 16; tied or untied
layers; trained on the code error or on the energy.

Setup: whitened 8x8 natural-image patches (builtin:patches), a 128-atom dictionary learned by
this project's sparse coding at lam 2 (as in bench_fista), FISTA codes at tolerance 1e-6 as
the code targets. Each LISTA starts as T ISTA steps on the dictionary (``start_from_ista``)
and trains for ``--steps`` Adam steps on batches of training patches. Objective: the mean
over held-out patches of E(y, z) = ||y - W z||^2 + lam |z|_1. The issue's target: for every
T <= 5, LISTA beats FISTA run for 3T iterations.

"Matches k iterations" is the smallest k on the grid 1..20, 24, 30, 32, 40, 48, ... at which
the solver's objective is at or below LISTA's; "> 1024" when not even 1024 iterations do.

    .venv/bin/python -m benchmarks.bench_lista [--steps 1500] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from benchmarks.latent_common import fista, learn_dictionary, patches
from workers import sparse
from workers.encoders import build_encoder
from workers.methods.lista import code_loss

LAM = 2.0
LAYERS = (1, 3, 5, 10, 16)
GRID = sorted(set(range(1, 21)) | {24, 30, 32, 40, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024})
COMMAND = ".venv/bin/python -m benchmarks.bench_lista"


def mean_energy(y: torch.Tensor, codes: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    forward, _ = sparse.dense_operators(dictionary)
    return sparse.energy(y, codes, forward, LAM).mean()


def solver_curve(y: torch.Tensor, dictionary: torch.Tensor, accelerated: bool) -> dict[int, float]:
    """Objective after k iterations from zero, for every k on the grid (tolerance 0: a code
    stops early only if an iteration leaves it exactly unchanged)."""
    return {
        k: mean_energy(
            y, fista(y, dictionary, LAM, 0.0, k, accelerated=accelerated).codes, dictionary
        ).item()
        for k in GRID
    }


def matched(curve: dict[int, float], value: float) -> str:
    reached = [k for k, objective in curve.items() if objective <= value]
    return str(min(reached)) if reached else f"> {GRID[-1]}"


def train_lista(
    train: torch.Tensor,
    targets: torch.Tensor,
    dictionary: torch.Tensor,
    layers: int,
    tied: bool,
    loss: str,
    steps: int,
    lr: float,
) -> torch.nn.Module:
    torch.manual_seed(0)
    config = {"arch": "lista", "input_dim": 64, "atoms": 128, "layers": layers, "tied": tied}
    network = build_encoder({**config, "lam": LAM})
    network.start_from_ista(dictionary, LAM)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, len(train), (256,), generator=generator)
        codes = network(train[rows])
        if loss == "code":
            value = code_loss(codes, targets[rows])
        else:
            value = mean_energy(train[rows], codes, dictionary)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    return network.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {COMMAND} " + " ".join(sys.argv[1:]))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")

    data = patches(8, 20_000 + args.held_out, seed=1)
    train, held_out = data[:20_000], data[20_000:]
    dictionary = learn_dictionary(train, 128, LAM, steps=300)
    targets = fista(train, dictionary, LAM, 1e-6, 20_000).codes
    optimum = mean_energy(
        held_out, fista(held_out, dictionary, LAM, 1e-7, 50_000).codes, dictionary
    )
    curves = {
        name: solver_curve(held_out, dictionary, name == "FISTA") for name in ("FISTA", "ISTA")
    }
    print(
        f"\nheld-out objective: optimum (FISTA, tol 1e-7) {optimum:.4f}; at 0 iterations "
        f"{mean_energy(held_out, torch.zeros(len(held_out), 128), dictionary):.4f}\n"
    )
    print(
        "| T | layers | loss | LISTA objective | FISTA(3T) objective | beats FISTA(3T) "
        "| matches FISTA iterations | matches ISTA iterations |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for layers in LAYERS:
        three_t = (
            curves["FISTA"].get(3 * layers)
            or mean_energy(
                held_out, fista(held_out, dictionary, LAM, 0.0, 3 * layers).codes, dictionary
            ).item()
        )
        for tied in (False, True):
            for loss in ("code", "energy"):
                network = train_lista(
                    train, targets, dictionary, layers, tied, loss, args.steps, args.lr
                )
                with torch.no_grad():
                    value = mean_energy(held_out, network(held_out), dictionary).item()
                print(
                    f"| {layers} | {'tied' if tied else 'untied'} | {loss} | {value:.4f} "
                    f"| {three_t:.4f} | {'yes' if value < three_t else 'no'} "
                    f"| {matched(curves['FISTA'], value)} | {matched(curves['ISTA'], value)} |",
                    flush=True,
                )
    print("\nFISTA / ISTA objective after k iterations from zero:\n")
    print("| k | " + " | ".join(str(k) for k in (1, 3, 5, 10, 15, 16, 30, 48, 128, 1024)) + " |")
    print("|---|" + "---|" * 10)
    for name, curve in curves.items():
        values = [curve.get(k) for k in (1, 3, 5, 10, 15, 16, 30, 48, 128, 1024)]
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + " |")


if __name__ == "__main__":
    main()
