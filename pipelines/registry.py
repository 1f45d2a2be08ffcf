"""The encoder in MLflow: logged as a model of the job's run, registered by name, aliased;
fetched into a self-contained folder; and loaded back, from ``models:/NAME@ALIAS`` or from
such a folder, without pickle.

mlflow is imported inside the functions that talk to it: loading an encoder from a folder
(what a downstream classifier does) then needs torch, safetensors and this project only.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from pipelines.tags import INPUT_SHAPE
from workers.export import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    EncoderLoadError,
    find_encoder_dir,
    load_encoder_dir,
)

if TYPE_CHECKING:
    from service.registry import Reference
    from service.tracking import ModelVersionView

# Loading the model needs only this project (and torch, which it depends on).
_REQUIREMENTS = ["selfsup", "torch==2.13.0", "safetensors"]
PROVENANCE_FILE = "selfsup.json"
EXAMPLE_FILE = "load_example.py"


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def code_version() -> str:
    """The package version, plus the git commit of its source tree when it has one
    (``0.2.0+g1a2b3c4d5e6f``, ``.dirty`` when tracked files differ from that commit)."""
    version = importlib.metadata.version("selfsup")
    root = Path(__file__).resolve().parent.parent
    try:
        commit = _git(root, "rev-parse", "--short=12", "HEAD")
        changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return version  # an installed copy without its git history
    return f"{version}+g{commit}{'.dirty' if changes else ''}"


def register_encoder(
    tracking_uri: str,
    run_id: str,
    encoder_dir: Path,
    model_name: str,
    alias: str,
    version_tags: dict[str, str],
    description: str,
) -> str:
    """Log ``encoder_dir`` as the run's model, register it, point ``alias`` at it."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    # The encoder's own module loads it: an MLflow model with no pickled Python object.
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="encoder",
            loader_module="workers.export",
            data_path=str(encoder_dir),
            pip_requirements=_REQUIREMENTS,
        )
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name)
    version = client.create_model_version(
        model_name,
        source=info.model_uri,
        run_id=run_id,
        tags=version_tags,
        description=description,
        model_id=info.model_id,  # links the version to the logged model evaluations report to
    )
    client.set_registered_model_alias(model_name, alias, version.version)
    return str(version.version)


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the embedded stack's database in the state folder."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = Path(os.environ.get("SELFSUP_HOME", ".selfsup")).expanduser().resolve()
    return f"sqlite:///{home / 'mlflow.db'}"


def download_version(view: ModelVersionView, tracking_uri: str, destination: Path) -> Path:
    """The registered version's encoder files, downloaded under ``destination``; returns
    the folder that holds ``encoder.json``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    uri = f"models:/{view.name}/{view.version}"
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination))
    except (MlflowException, OSError) as error:
        message = getattr(error, "message", str(error))
        raise EncoderLoadError(f"cannot fetch {uri} from {tracking_uri}: {message}") from None
    return find_encoder_dir(Path(local))


def load_encoder(uri: str | os.PathLike[str], tracking_uri: str | None = None) -> nn.Module:
    """An encoder in eval mode, from ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a
    folder written by ``selfsup encoder get``. Raises EncoderLoadError (or, for an unknown
    name, version or alias, service.registry.RegistryNotFound) with the reason."""
    text = str(uri)
    if not text.startswith("models:/"):
        path = Path(text).expanduser()
        if not path.is_dir():
            raise EncoderLoadError(f"{text!r} is neither a models:/ URI nor an existing folder")
        return load_encoder_dir(path)
    from service.registry import Registry, parse_reference

    tracking = tracking_uri or default_tracking_uri()
    view = Registry(tracking).resolve(parse_reference(text))
    with tempfile.TemporaryDirectory() as scratch:
        return load_encoder_dir(download_version(view, tracking, Path(scratch)))


def write_encoder_folder(
    reference: Reference, view: ModelVersionView, tracking_uri: str, destination: Path
) -> None:
    """A self-contained copy of a registered encoder in ``destination`` (which must not
    exist): ``encoder.json`` + ``weights.safetensors`` (checked to load), ``selfsup.json``
    (where it came from: name, version, tags, description), a README and a loader example.
    Written to a sibling folder first, so a failure leaves nothing half-written."""
    staging = destination.with_name(destination.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            source = download_version(view, tracking_uri, Path(scratch))
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                if not (source / name).is_file():
                    raise EncoderLoadError(f"{reference}: the registered artifact has no {name}")
                shutil.copy2(source / name, staging / name)
        load_encoder_dir(staging)  # a broken or incompatible artifact fails here, not later
        provenance = {
            "name": view.name,
            "version": view.version,
            "reference": str(reference),
            "uri": f"models:/{view.name}/{view.version}",
            "tracking_uri": tracking_uri,
            "run_id": view.run_id,
            "description": view.description,
            "input_shape": _input_shape(view),
            "tags": view.tags,
        }
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        (staging / "README.md").write_text(_readme(reference, view))
        (staging / EXAMPLE_FILE).write_text(_LOAD_EXAMPLE)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.rename(destination)


def _input_shape(view: ModelVersionView) -> list[int] | None:
    text = view.tags.get(INPUT_SHAPE)
    return [int(size) for size in text.split("x")] if text else None


def _readme(reference: Reference, view: ModelVersionView) -> str:
    metrics = "\n".join(
        f"| {key} | {value} |"
        for key, value in sorted(view.tags.items())
        if key.startswith("eval.")
    )
    return (
        f"# selfsup encoder {view.name}, version {view.version}\n\n"
        f"Fetched as `{reference}` from the model registry (`models:/{view.name}/"
        f"{view.version}`).\n\n{view.description}\n\n"
        "## Files\n\n"
        f"- `{CONFIG_FILE}`: the architecture (arch name and constructor arguments)\n"
        f"- `{WEIGHTS_FILE}`: the tensors, in safetensors format (no pickle)\n"
        f"- `{PROVENANCE_FILE}`: where it came from: job, method, dataset, code version, split, "
        "metrics\n"
        f"- `{EXAMPLE_FILE}`: loads it and computes features for random inputs\n\n"
        "## Loading\n\n"
        "```python\n"
        "import selfsup\n"
        "encoder = selfsup.load_encoder('PATH/TO/THIS/FOLDER')  # torch nn.Module, eval mode\n"
        "features = encoder(samples)  # samples shaped and scaled like the training data\n"
        "```\n\n"
        "## Evaluation at registration (held-out split)\n\n"
        f"| metric | value |\n|---|---|\n{metrics or '| (none) | |'}\n"
    )


_LOAD_EXAMPLE = '''"""Load this encoder with PyTorch and selfsup (no pickle) and compute features.

Run: python load_example.py
"""

import json
from pathlib import Path

import torch

import selfsup

HERE = Path(__file__).resolve().parent
encoder = selfsup.load_encoder(HERE)  # torch.nn.Module in eval mode, on the CPU
input_shape = json.loads((HERE / "selfsup.json").read_text())["input_shape"]
if input_shape is None:
    raise SystemExit("this version did not record its input shape: pass samples of your own")
samples = torch.rand(4, *input_shape)  # stand-ins for data shaped and scaled like training's
with torch.no_grad():
    features = encoder(samples)
print(f"{type(encoder).__name__}: {tuple(samples.shape)} -> {tuple(features.shape)}")
'''
