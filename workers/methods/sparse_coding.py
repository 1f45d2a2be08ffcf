"""Sparse coding (Olshausen & Field 1997): E(y, z) = ||y - W z||^2 + lam * |z|_1 with a unit-norm
dictionary W (D, atoms); workers/sparse.py writes the convention down. The encoder is the
inference procedure itself (FISTA or ISTA with the learned W)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipelines.params import SparseCodingParams
from workers import sparse
from workers.encoders import build_encoder
from workers.figures import energy_landscape, is_plane, tile_grid
from workers.latent_encoders import flat_dim
from workers.methods.base import Batch, Method, MethodContext, register_method


@register_method(SparseCodingParams)
class SparseCoding(Method):
    """Dictionary learning by alternation, one global batch at a time:

    1. inference: z* = argmin_z E(y, z) by batched FISTA (or ISTA) on the training device,
       each sample stopping at relative tolerance ``tol`` or after ``max_iter`` iterations;
    2. learning: loss = mean_y E(y, z*) with z* fixed, so its gradient reaches W only; DDP
       averages it over ranks (one process on the concatenated batch), the optimizer steps;
    3. every column of W is renormalised to unit norm (else W grows and z shrinks).
    """

    def __init__(self, params: SparseCodingParams, context: MethodContext) -> None:
        super().__init__()
        self.lam = params.lam
        self.coder = build_encoder(
            {
                "arch": "sparse-coder",
                "input_dim": flat_dim(context.backbone.config),
                "atoms": params.atoms,
                "lam": params.lam,
                "tol": params.tol,
                "max_iter": params.max_iter,
                "accelerated": params.solver == "fista",
            }
        )

    def dictionary_step(self, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Steps 1 and 2 for flattened samples y (n, D): the outputs and the codes z*."""
        solution = self.coder.infer(y)
        dictionary = self.coder.dictionary
        energy = sparse.energy(y, solution.codes, lambda codes: codes @ dictionary.T, self.lam)
        outputs = {
            "loss": energy.mean(),
            "iterations": torch.tensor(float(solution.iterations)),
            "active_fraction": (solution.codes != 0).float().mean(),
        }
        return outputs, solution.codes

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.dictionary_step(batch.images.flatten(1))[0]

    def after_optimizer_step(self) -> None:
        sparse.normalize_columns_(self.coder.dictionary, dim=1)

    def encoder(self) -> nn.Module:
        return self.coder

    def figures(self, data: torch.Tensor) -> dict[str, np.ndarray]:
        dictionary = self.coder.dictionary.detach()  # (D, atoms)
        if is_plane(data):

            def energy(points: torch.Tensor) -> torch.Tensor:
                codes = self.coder.infer(points).codes
                return sparse.energy(points, codes, lambda z: z @ dictionary.T, self.lam)

            title = f"sparse coding energy min_z E, {dictionary.shape[1]} atoms, lam={self.lam:g}"
            return {"energy_landscape.png": energy_landscape(energy, data, title, dictionary.T)}
        return {"dictionary.png": tile_grid(dictionary.T.reshape(-1, *data.shape[1:]))}
