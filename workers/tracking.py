"""Rank-0 metric logging into the job's MLflow run (created by the controller)."""

from __future__ import annotations

import time

import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient


class RunLogger:
    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """An HxWx3 uint8 picture as a PNG artifact of the run."""
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)
