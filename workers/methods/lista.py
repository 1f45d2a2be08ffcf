"""LISTA (Gregor & LeCun 2010): a T-layer network unrolling ISTA with learned matrices and
thresholds, trained to do sparse coding's inference fast. The encoder is the LISTA network."""

from __future__ import annotations

import torch
from torch import nn

from pipelines.params import LISTAParams, SparseCodingParams
from workers import sparse
from workers.encoders import build_encoder
from workers.latent_encoders import flat_dim
from workers.methods.base import Batch, MethodContext, register_method
from workers.methods.sparse_coding import SparseCoding


def code_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_y ||f(y) - z*||^2: LISTA's codes against the optimal (FISTA) codes. (n, k) -> ()."""
    return (predicted - target).pow(2).sum(1).mean()


@register_method(LISTAParams)
class LISTAMethod(SparseCoding):
    """The dictionary W is learned exactly as in sparse coding (FISTA codes z*, gradient step,
    unit columns), and at the same time LISTA f, started as ``layers`` ISTA steps on the
    initial W (FISTA steps with ``momentum``: a learned FISTA), learns to follow it. ``loss``
    says what f is trained on:

    - "code":   ||f(y) - z*||^2, predicting the FISTA codes of the current dictionary;
    - "energy": E(y, f(y)) = ||y - W f(y)||^2 + lam |f(y)|_1 with W held fixed, minimising the
      energy directly.

    The job's loss is the sum of the dictionary's and LISTA's terms; they touch disjoint
    parameters, so each gets exactly its own gradient.
    """

    def __init__(self, params: LISTAParams, context: MethodContext) -> None:
        # W and its FISTA codes are learned exactly as sparse coding learns them.
        dictionary = SparseCodingParams(
            name="sparse_coding",
            atoms=params.atoms,
            lam=params.lam,
            tol=params.tol,
            max_iter=params.max_iter,
            solver="fista",
        )
        super().__init__(dictionary, context)
        self.loss = params.loss
        self.network = build_encoder(
            {
                "arch": "lista",
                "input_dim": flat_dim(context.backbone.config),
                "atoms": params.atoms,
                "layers": params.layers,
                "tied": params.tied,
                "lam": params.lam,
                "momentum": params.momentum,
            }
        )
        self.network.start_from_ista(self.coder.dictionary.detach(), params.lam)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        y = batch.images.flatten(1)
        outputs, optimal = self.dictionary_step(y)
        predicted = self.network(y)
        if self.loss == "code":
            lista_term = code_loss(predicted, optimal)
        else:
            dictionary = self.coder.dictionary.detach()
            lista_term = sparse.energy(y, predicted, lambda z: z @ dictionary.T, self.lam).mean()
        with torch.no_grad():
            forward = lambda z: z @ self.coder.dictionary.T  # noqa: E731
            lista_energy = sparse.energy(y, predicted, forward, self.lam).mean()
        return {
            **outputs,
            "loss": outputs["loss"] + lista_term,
            "dictionary_energy": outputs["loss"].detach(),
            "lista_energy": lista_energy,
            "lista_code_error": code_loss(predicted.detach(), optimal),
        }

    def encoder(self) -> nn.Module:
        return self.network
