"""Self-supervised methods, one file each, registered by the name a spec uses."""

from workers.methods import simclr  # noqa: F401  (registers itself)
from workers.methods.base import METHODS, Batch, Method, build_method

__all__ = ["METHODS", "Batch", "Method", "build_method"]
