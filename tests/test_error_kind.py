"""Whose fault a failed run was decides whether the controller retries it: real Ray and Ray
Train exception objects, classified as the driver classifies them."""

from __future__ import annotations

from ray.exceptions import ActorDiedError, NodeDiedError
from ray.train import ControllerError
from ray.train.v2.api.exceptions import WorkerGroupError

from pipelines import tags
from pipelines.driver import error_kind


def test_dead_workers_nodes_and_controllers_are_infrastructure() -> None:
    assert error_kind(WorkerGroupError("rank 1 died", {1: ActorDiedError()})) == tags.INFRA_ERROR
    assert error_kind(ControllerError(RuntimeError("controller lost"))) == tags.INFRA_ERROR
    wrapped = RuntimeError("fit failed")
    wrapped.__cause__ = NodeDiedError("node gone")
    assert error_kind(wrapped) == tags.INFRA_ERROR
    assert error_kind(ConnectionError("MLflow unreachable")) == tags.INFRA_ERROR


def test_errors_the_job_raised_are_the_users() -> None:
    diverged = FloatingPointError("loss is nan at step 7: diverged")
    assert error_kind(WorkerGroupError("rank 0 raised", {0: diverged})) == tags.USER_ERROR
    mixed = {0: ValueError("bad data"), 1: ActorDiedError()}
    assert error_kind(WorkerGroupError("two ranks", mixed)) == tags.USER_ERROR
    assert error_kind(ValueError("no images in folder")) == tags.USER_ERROR
