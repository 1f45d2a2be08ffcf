"""The encoder's on-disk form: ``encoder.json`` (config) + ``weights.safetensors`` (tensors).

Loading needs neither pickle nor the training code: build the architecture from the config,
load the tensors, switch to eval mode. The same folder is the data of the MLflow model, whose
``loader_module`` is this module, so ``mlflow.pyfunc.load_model`` works on it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from workers.encoders import build_encoder

CONFIG_FILE = "encoder.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1


class EncoderLoadError(Exception):
    """The folder does not hold a loadable encoder; the message says what is wrong."""


def save_encoder(directory: Path, encoder: nn.Module) -> None:
    """Write ``encoder`` (built by ``build_encoder``, so it carries ``.config``)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: tensor.detach().cpu().contiguous() for name, tensor in encoder.state_dict().items()
    }
    save_file(tensors, str(directory / WEIGHTS_FILE))
    document = {"format_version": FORMAT_VERSION, **encoder.config}
    (directory / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")


def find_encoder_dir(root: Path) -> Path:
    """The folder under ``root`` (itself included) that holds ``encoder.json``."""
    if (root / CONFIG_FILE).is_file():
        return root
    matches = sorted(root.rglob(CONFIG_FILE))
    if not matches:
        raise EncoderLoadError(f"no {CONFIG_FILE} under {root}: not a selfsup encoder")
    return matches[0].parent


def load_encoder_dir(root: Path) -> nn.Module:
    """Rebuild the encoder stored under ``root``, in eval mode, on the CPU."""
    directory = find_encoder_dir(Path(root))
    try:
        document = json.loads((directory / CONFIG_FILE).read_text())
        version = document.pop("format_version")
        if version != FORMAT_VERSION:
            raise EncoderLoadError(
                f"{directory / CONFIG_FILE}: format_version {version}, this selfsup reads "
                f"{FORMAT_VERSION}"
            )
        encoder = build_encoder(document)
        encoder.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    except EncoderLoadError:
        raise
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as error:
        raise EncoderLoadError(f"cannot load the encoder in {directory}: {error}") from None
    return encoder.eval()


class _PyfuncEncoder:
    """What ``mlflow.pyfunc.load_model`` returns: images (N, C, H, W) -> features (N, D)."""

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder

    def predict(self, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        with torch.no_grad():
            images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            return self.encoder(images).numpy()


def _load_pyfunc(data_path: str) -> _PyfuncEncoder:
    return _PyfuncEncoder(load_encoder_dir(Path(data_path)))
