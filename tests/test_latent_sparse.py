"""The sparse-coding math against independent references: ISTA and FISTA against
scikit-learn's sparse_encode (lam = 2 * alpha, see workers/sparse.py), power iteration against
an eigendecomposition, convolutional FISTA against dense FISTA on the convolution's matrix,
LISTA's ISTA (FISTA) initialisation against ISTA (FISTA), and unit atoms after every dictionary
step."""

from __future__ import annotations

import pytest
import torch
from sklearn.decomposition import sparse_encode

from pipelines.params import ConvSparseCodingParams, SparseCodingParams
from workers import sparse
from workers.augment import build_augment
from workers.data import load_dataset
from workers.encoders import build_encoder
from workers.methods import Batch, MethodContext
from workers.methods.conv_sparse_coding import ConvSparseCoding
from workers.methods.sparse_coding import SparseCoding

LAM = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def patches() -> torch.Tensor:
    """120 natural 8x8 patches, each centred, float64: (120, 64)."""
    data = load_dataset("builtin:patches", {"size": 8, "count": 120, "seed": 3}).samples
    flat = data.flatten(1).double()
    return (flat - flat.mean(1, keepdim=True)) * 10


@pytest.fixture(scope="module")
def dictionary(patches: torch.Tensor) -> torch.Tensor:
    """128 unit-norm atoms (64, 128), half of them patches, half noise: overcomplete and
    realistic, so the lasso has a non-trivial solution."""
    generator = torch.Generator().manual_seed(0)
    atoms = torch.cat(
        [patches[:64].T, torch.randn(64, 64, generator=generator, dtype=torch.float64)], 1
    )
    sparse.normalize_columns_(atoms, dim=1)
    return atoms


TOL = 1e-5  # relative change of a code that stops its iterations


@pytest.fixture(scope="module")
def solutions(patches: torch.Tensor, dictionary: torch.Tensor) -> dict[str, sparse.Solution]:
    """ISTA's and FISTA's codes for the patches outside the dictionary, at the same tolerance."""
    forward, adjoint = sparse.dense_operators(dictionary)
    return {
        name: sparse.solve(patches[64:], forward, adjoint, (1, 128), LAM, TOL, 50_000, accelerated)
        for name, accelerated in (("ista", False), ("fista", True))
    }


@pytest.mark.parametrize("algorithm", ["lasso_lars", "lasso_cd"])
def test_ista_and_fista_reach_scikit_learns_objective(
    patches: torch.Tensor,
    dictionary: torch.Tensor,
    solutions: dict[str, sparse.Solution],
    algorithm: str,
) -> None:
    y = patches[64:]
    forward, _ = sparse.dense_operators(dictionary)
    reference_codes = sparse_encode(
        y.numpy(), dictionary.T.numpy(), algorithm=algorithm, alpha=LAM / 2, max_iter=10_000
    )
    reference = sparse.energy(y, torch.from_numpy(reference_codes), forward, LAM)
    for solution in solutions.values():
        ours = sparse.energy(y, solution.codes, forward, LAM)
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=0)  # every sample


def test_fista_needs_fewer_iterations_than_ista_for_the_same_tolerance(
    solutions: dict[str, sparse.Solution],
) -> None:
    ista, fista = solutions["ista"].iterations, solutions["fista"].iterations
    assert fista < ista / 2, (fista, ista)


def test_power_iteration_finds_the_largest_eigenvalue(dictionary: torch.Tensor) -> None:
    forward, adjoint = sparse.dense_operators(dictionary)
    lipschitz = sparse.lipschitz_constant(forward, adjoint, (1, 128), dictionary)
    exact = 2 * torch.linalg.eigvalsh(dictionary.T @ dictionary).max().item()
    assert lipschitz == pytest.approx(exact, rel=1e-6)


def test_convolutional_fista_equals_fista_on_the_convolutions_matrix() -> None:
    """Writes the operator y = sum_k K_k * z_k out as a matrix column by column, then checks
    that the adjoint is its transpose and that both solvers find the same codes."""
    torch.manual_seed(0)
    coder = build_encoder(
        {
            "arch": "conv-sparse-coder",
            "in_channels": 1,
            "kernels": 3,
            "kernel_size": 3,
            "lam": 0.1,
            "tol": 1e-8,
            "max_iter": 20_000,
            "pool": 1,
        }
    ).double()
    images = load_dataset("builtin:digits").images[:4].double()  # (4, 1, 8, 8)
    basis = torch.eye(3 * 64, dtype=torch.float64).view(-1, 3, 8, 8)
    matrix = coder.reconstruct(basis, coder.kernels.detach()).flatten(1).T  # (64, 192)
    adjoint = torch.nn.functional.conv2d(images, coder.kernels.detach(), padding=1).flatten(1)
    torch.testing.assert_close(adjoint, images.flatten(1) @ matrix)

    conv_codes = coder.infer(images).codes.flatten(1)
    forward, dense_adjoint = sparse.dense_operators(matrix)
    dense = sparse.solve(images.flatten(1), forward, dense_adjoint, (1, 192), 0.1, 1e-8, 20_000)
    torch.testing.assert_close(conv_codes, dense.codes, atol=1e-6, rtol=0)


@pytest.mark.parametrize("momentum", [False, True])
def test_lista_starts_as_t_steps_of_ista_or_fista(
    patches: torch.Tensor, dictionary: torch.Tensor, momentum: bool
) -> None:
    """T layers started from W compute T ISTA steps; with momentum, T FISTA steps."""
    y = patches[64:].float()
    atoms = dictionary.float()
    config = {"arch": "lista", "input_dim": 64, "atoms": 128, "layers": 4, "lam": LAM}
    for tied in (True, False):
        lista = build_encoder({**config, "tied": tied, "momentum": momentum})
        lista.start_from_ista(atoms, LAM)
        forward, adjoint = sparse.dense_operators(atoms)
        solver = sparse.solve(y, forward, adjoint, (1, 128), LAM, 1e-30, 4, accelerated=momentum)
        assert solver.iterations == 4
        torch.testing.assert_close(lista(y), solver.codes, atol=1e-5, rtol=1e-4)


def test_atoms_have_unit_norm_after_every_dictionary_step() -> None:
    torch.manual_seed(0)
    images = load_dataset("builtin:digits").images[:64]
    backbone = build_encoder({"arch": "mlp", "in_channels": 1, "image_size": 8, "out_dim": 4})
    context = MethodContext(backbone, feature_dim=4, num_samples=64)
    sparse_coding = SparseCodingParams(
        name="sparse_coding", atoms=32, lam=0.5, solver="fista", tol=1e-3, max_iter=50
    )
    conv_sparse_coding = ConvSparseCodingParams(
        name="conv_sparse_coding", kernels=4, kernel_size=5, lam=0.5, tol=1e-2, max_iter=20, pool=2
    )
    methods = [
        (SparseCoding(sparse_coding, context), 1),
        (ConvSparseCoding(conv_sparse_coding, context), 0),
    ]
    augment = build_augment("none", 8, 0, 0)
    for method, atom_dim in methods:
        atoms = next(method.parameters())
        optimizer = torch.optim.SGD(method.parameters(), lr=0.5)  # large steps: norms drift
        for step in range(4):
            # The step by hand, not Training.train_step: the atoms' norms are checked between
            # the optimizer's step and after_optimizer_step, which puts them back to 1.
            loss = method(
                Batch(images[16 * step : 16 * (step + 1)], torch.arange(16), step, augment)
            )
            optimizer.zero_grad()
            loss["loss"].backward()
            optimizer.step()
            reduce = [axis for axis in range(atoms.dim()) if axis != atom_dim]
            assert not torch.allclose(atoms.pow(2).sum(reduce), torch.ones(1), atol=1e-3)
            method.after_optimizer_step()
            norms = atoms.pow(2).sum(reduce).sqrt()
            torch.testing.assert_close(norms, torch.ones_like(norms))
