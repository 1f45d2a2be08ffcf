"""Batched FISTA against scikit-learn's ``sparse_encode`` (lasso_lars, lasso_cd) on the same
whitened natural-image patches and the same learned dictionary, as time to reach the same
objective, side by side in one run.

For each patch size: learn a dictionary with this project's sparse coding on training
patches; encode held-out patches with each scikit-learn algorithm (alpha = lam / 2: see
workers/sparse.py) and record its time and objective sum_y ||y - W z||^2 + lam |z|_1; then
run FISTA (float32 and float64, on the CPU, and on the GPU when there is one) at tolerances
1e-2, 3e-3, 1e-3, 3e-4, ... and report, against each reference, the loosest tolerance whose
objective is equal to or lower than the reference's ("equal": within 1e-6 relative) and its
time. Times are the best of ``--repeats`` runs; the speed-up is reference time / FISTA time.

What is timed is the same for both sides: what depends on the dictionary alone is computed
once before the clock starts (scikit-learn's Gram matrix W^T W, passed as ``gram``; FISTA's
Lipschitz constant L, by power iteration), and what depends on the patches is inside it
(scikit-learn's W^T y; FISTA's W^T y, and its W^T W too, as ``solve_dense`` forms it per call).

    .venv/bin/python -m benchmarks.bench_fista [--count 2000] [--threads 2] [--sizes 8 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from sklearn.decomposition import sparse_encode

from benchmarks.latent_common import best_time, fista, learn_dictionary, objective, patches
from workers import sparse

ATOMS_PER_PIXEL = 2  # 2x overcomplete dictionaries
LAM = 2.0  # the dictionary's; whitened patches have unit variance per pixel
TOLERANCES = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 1e-7, 1e-8)
EQUAL = 1e-6  # relative objective gap that still counts as "the same objective"
MAX_ITER = 20_000
COMMAND = ".venv/bin/python -m benchmarks.bench_fista"


CUDA = int(torch.cuda.is_available())


def fista_ladder(
    held_out: torch.Tensor,
    dictionary: torch.Tensor,
    lam: float,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    target: float,
) -> list[tuple[float, float, float, int]]:
    """(tolerance, seconds, objective, iterations) of FISTA at each tolerance, tightening
    until the objective reaches ``target`` (or the tolerances run out)."""
    y, atoms = held_out.to(device, dtype), dictionary.to(device, dtype)
    forward, adjoint = sparse.dense_operators(atoms)
    lipschitz = sparse.lipschitz_constant(forward, adjoint, (1, atoms.shape[1]), atoms)
    rows = []
    for tol in TOLERANCES:

        def run(tol: float = tol) -> sparse.Solution:
            solution = fista(y, atoms, lam, tol, MAX_ITER, lipschitz=lipschitz)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return solution

        seconds, solution = best_time(run, repeats)
        value = objective(held_out, solution.codes.cpu(), dictionary, lam)
        rows.append((tol, seconds, value, solution.iterations))
        if value <= target * (1 + EQUAL):
            break
    return rows


def sklearn_references(
    held_out: torch.Tensor, dictionary: torch.Tensor, lam: float, repeats: int, jobs: list[int]
) -> dict[tuple[str, int], tuple[float, float]]:
    """(algorithm, processes) -> (seconds, objective) of scikit-learn's sparse_encode."""
    atoms = dictionary.T.double().numpy()  # scikit-learn's layout: (atoms, D)
    gram = atoms @ atoms.T
    references = {}
    for algorithm in ("lasso_lars", "lasso_cd"):
        for processes in jobs:
            seconds, codes = best_time(
                lambda algorithm=algorithm, processes=processes: sparse_encode(
                    held_out.double().numpy(),
                    atoms,
                    gram=gram,
                    algorithm=algorithm,
                    alpha=lam / 2,
                    n_jobs=processes,
                ),
                repeats,
            )
            value = objective(held_out, torch.from_numpy(codes), dictionary, lam)
            references[(algorithm, processes)] = (seconds, value)
    return references


def bench_size(size: int, count: int, lams: list[float], args: argparse.Namespace) -> list[str]:
    data = patches(size, 20_000 + count, seed=1)
    train, held_out = data[:20_000], data[20_000:]
    torch.set_num_threads(1)
    dictionary = learn_dictionary(train, ATOMS_PER_PIXEL * size * size, LAM, steps=300)
    lines = []
    for lam in lams:
        lines += [
            f"\n### {size}x{size} patches, lam {lam}: {count} held-out patches, "
            f"{dictionary.shape[1]} atoms (learned at lam {LAM})\n",
            "| solver | where | tolerance | iterations | time (s) | objective | speed-up |",
            "|---|---|---|---|---|---|---|",
        ]
        references = sklearn_references(held_out, dictionary, lam, args.repeats, args.sklearn_jobs)
        for (algorithm, processes), (seconds, value) in references.items():
            lines.append(
                f"| sklearn {algorithm} | {processes} process(es), float64 | its default | - "
                f"| {seconds:.3f} | {value:.8g} | 1 |"
            )
        target = min(value for _, value in references.values())
        for device, threads in [("cpu", t) for t in args.threads] + [("cuda", 0)] * CUDA:
            torch.set_num_threads(threads or 1)
            for dtype in (torch.float32, torch.float64):
                ladder = fista_ladder(
                    held_out, dictionary, lam, torch.device(device), dtype, args.repeats, target
                )
                where = f"{device} {threads or ''} {str(dtype)[6:]}".replace("  ", " ")
                for (algorithm, processes), (reference_time, reference_value) in references.items():
                    reached = [row for row in ladder if row[2] <= reference_value * (1 + EQUAL)]
                    if not reached:
                        lines.append(
                            f"| FISTA vs {algorithm} ({processes}) | {where} | not reached "
                            f"| - | - | {min(row[2] for row in ladder):.8g} | - |"
                        )
                        continue
                    tol, seconds, value, iterations = reached[0]
                    lines.append(
                        f"| FISTA vs {algorithm} ({processes}) | {where} | {tol:g} | {iterations} "
                        f"| {seconds:.4f} | {value:.8g} | {reference_time / seconds:.1f}x |"
                    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--lams", type=float, nargs="+", default=[2.0, 0.5])
    parser.add_argument("--count", type=int, default=2000, help="held-out patches to encode")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sklearn-jobs", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    # lasso_cd warns for codes it stops at max_iter; its objective below says what it reached.
    warnings.simplefilter("ignore")
    print(f"# {COMMAND} " + " ".join(sys.argv[1:]))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    for size in args.sizes:
        print("\n".join(bench_size(size, args.count, args.lams, args)), flush=True)


if __name__ == "__main__":
    main()
