"""The encoder in MLflow: logged as a model of the job's run, registered by name, aliased;
and loaded back, from ``models:/NAME@ALIAS`` or from a folder, without pickle."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from workers.export import EncoderLoadError, load_encoder_dir

# Loading the model needs only this project (and torch, which it depends on).
_REQUIREMENTS = ["selfsup", "torch==2.13.0", "safetensors"]


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
    )
    client.set_registered_model_alias(model_name, alias, version.version)
    return str(version.version)


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the embedded stack's database in the state folder."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = Path(os.environ.get("SELFSUP_HOME", ".selfsup")).expanduser().resolve()
    return f"sqlite:///{home / 'mlflow.db'}"


def load_encoder(uri: str | os.PathLike[str], tracking_uri: str | None = None) -> nn.Module:
    """An encoder in eval mode, from ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a
    folder written by ``selfsup encoder get``. Raises EncoderLoadError with the reason."""
    text = str(uri)
    if not text.startswith("models:/"):
        path = Path(text).expanduser()
        if not path.is_dir():
            raise EncoderLoadError(f"{text!r} is neither a models:/ URI nor an existing folder")
        return load_encoder_dir(path)
    tracking = tracking_uri or default_tracking_uri()
    mlflow.set_registry_uri(tracking)
    mlflow.set_tracking_uri(tracking)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=scratch)
        except MlflowException as error:
            raise EncoderLoadError(
                f"cannot fetch {text} from {tracking}: {error.message}"
            ) from None
        return load_encoder_dir(Path(local))
