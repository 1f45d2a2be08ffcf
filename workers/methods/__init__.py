"""Self-supervised methods, one file each, registered by the name a spec uses."""

from workers.methods import (  # noqa: F401  (each module registers its method)
    conv_sparse_coding,
    dae,
    ebm_langevin,
    kmeans,
    lista,
    moco,
    pca,
    pirl,
    rbm,
    siamese,
    simclr,
    sparse_coding,
    vae,
)
from workers.methods.base import METHODS, Batch, Method, build_method

__all__ = ["METHODS", "Batch", "Method", "build_method"]
