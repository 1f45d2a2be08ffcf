"""selfsup's public face: the CLI's entry point (selfsup.cli) and the Python API.

import selfsup
encoder = selfsup.load_encoder("models:/simclr-digits@candidate")  # nn.Module, eval mode
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = ["load_encoder"]


def load_encoder(uri: str | os.PathLike[str], tracking_uri: str | None = None) -> nn.Module:
    """Load a registered encoder (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``) or a folder
    written by ``selfsup encoder get``. The tracking URI defaults to MLFLOW_TRACKING_URI, else
    the embedded stack's database in ``$SELFSUP_HOME`` (or ``./.selfsup``)."""
    from pipelines.registry import load_encoder as _load

    return _load(uri, tracking_uri)
