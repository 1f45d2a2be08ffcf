"""A job's driver, run by Ray Jobs on the head node: pretrain -> evaluate -> register; or,
for an evaluation job, a registered encoder evaluated as `selfsup eval` does.

Usage: SELFSUP_JOB='{...}' python -m pipelines.driver   (the controller sets SELFSUP_JOB in
the Ray Job's environment, so the driver needs no file shared with the controller.)
It reports back only through MLflow (metrics, tags, run status) and its exit code, so it
never depends on the controller that started it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import mlflow
import ray
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray.exceptions import (
    NodeDiedError,
    ObjectLostError,
    OutOfMemoryError,
    RayActorError,
    RaySystemError,
    WorkerCrashedError,
)
from ray.train import ControllerError
from torch import nn

from pipelines import tags
from pipelines.eval_run import evaluate_as_run, open_encoder
from pipelines.evaluate import Evaluation, evaluate_encoder, log_evaluation
from pipelines.evaluation_job import KIND, EvaluationJobSpec
from pipelines.pretrain import TRAIN_RUNTIME_ENV, pretrain
from pipelines.registry import code_version, register_encoder
from pipelines.spec import JobSpec, parse_spec
from pipelines.user_data import UserData, check_bad_samples, evaluation_set, prepare_user_data
from service.tracking import Tracking
from workers.data import SampleDataset, Split, load_data_section, split_dataset
from workers.export import load_encoder_dir
from workers.train_loop import ENCODER_DIR


def _concise(error: BaseException) -> str:
    """The innermost message a user can act on, not a page of Ray traceback."""
    cause: BaseException = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:2000]


JOB_ENV = "SELFSUP_JOB"
# A process, node or connection gone: the same job can succeed if run again.
_INFRA_ERRORS = (
    RayActorError,
    RaySystemError,
    WorkerCrashedError,
    NodeDiedError,
    ObjectLostError,
    OutOfMemoryError,
    ConnectionError,
    TimeoutError,
)


def error_kind(error: BaseException) -> str:
    """Whether retrying could help: "infra" when only processes, nodes or connections failed;
    "user" for anything the job itself raised (spec, data, code, a diverging loss)."""
    if isinstance(error, ControllerError):
        return tags.INFRA_ERROR
    failures = getattr(error, "worker_failures", None)  # Ray Train's WorkerGroupError
    if failures:
        infra = all(isinstance(failure, _INFRA_ERRORS) for failure in failures.values())
        return tags.INFRA_ERROR if infra else tags.USER_ERROR
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, _INFRA_ERRORS):
            return tags.INFRA_ERROR
        cause = cause.__cause__
    return tags.USER_ERROR


def _evaluation_data(
    spec: JobSpec, user_data: UserData | None
) -> tuple[SampleDataset, Split, str] | None:
    """Labelled images, their split and their source; None where there are no labels."""
    if user_data is not None:
        return evaluation_set(spec, user_data)
    dataset = load_data_section(spec.data.model_dump(mode="json"))
    if dataset.labels is None:
        return None
    split = split_dataset(dataset, spec.data.test_fraction, spec.data.split_seed)
    return dataset, split, spec.data.source


def _evaluate(
    spec: JobSpec,
    encoder: nn.Module,
    user_data: UserData | None,
    client: MlflowClient,
    run_id: str,
) -> Evaluation | None:
    """Every protocol the spec asks for, logged to the job's run; None (and a tag saying
    why) for data without labels, which no downstream classifier can be scored on."""
    labelled = _evaluation_data(spec, user_data)
    if labelled is None:
        where = spec.evaluate.data or spec.data.source
        why = " (its images are not all in class folders)" if user_data is not None else ""
        client.set_tag(
            run_id,
            tags.EVAL_SKIPPED,
            f"{where} has no labels{why}: linear, kNN and semi-supervised evaluation need "
            "labels and were skipped",
        )
        return None
    dataset, split, source = labelled
    evaluation = evaluate_encoder(
        encoder,
        dataset,
        split,
        spec.evaluate,
        spec.train.seed,
        source,
        spec.data.test_fraction,
        spec.data.split_seed,
    )
    log_evaluation(client, run_id, evaluation)
    return evaluation


def _description(spec: JobSpec, job_id: str) -> str:
    """How the version was trained, in one paragraph."""
    method = spec.method.model_dump(mode="json")
    options = ", ".join(f"{key}={value}" for key, value in method.items() if key != "name")
    train = spec.train
    return (
        f"{spec.method.name} ({options}) on {spec.data.source}, encoder {spec.encoder.arch} "
        f"with {spec.encoder.out_dim} features; {train.epochs} epochs, global batch "
        f"{train.batch_size} over {spec.resources.workers} workers, {train.optimizer} at lr "
        f"{train.lr:g}, augment preset {spec.augment.preset}, seed {train.seed}; job {job_id}."
    )


def _version_tags(spec: JobSpec, job_id: str, evaluation: Evaluation | None) -> dict[str, str]:
    """Where the version came from, and its headline metrics (means, not spreads)."""
    version_tags = {
        tags.JOB_ID: job_id,
        "selfsup.method": spec.method.name,
        "selfsup.dataset": spec.data.source,
        "selfsup.config_hash": spec.config_hash(),
        tags.CODE_VERSION: code_version(),
        tags.INPUT_SHAPE: _input_shape(spec),
        tags.TRAIN_SEED: str(spec.train.seed),
    }
    if evaluation is None:
        version_tags[tags.EVAL_SKIPPED] = f"{spec.evaluate.data or spec.data.source} has no labels"
        return version_tags
    version_tags |= {
        tags.SPLIT_TEST_FRACTION: str(evaluation.split["test_fraction"]),
        tags.SPLIT_SEED: str(evaluation.split["split_seed"]),
        tags.SPLIT_DIGEST: evaluation.split["digest"],
    }
    return version_tags | {
        key: f"{value:.6f}"
        for key, value in evaluation.metrics.items()
        if key.startswith("eval.") and not key.endswith(".std")
    }


def _input_shape(spec: JobSpec) -> str:
    """C x H x W of the images, or D for vectors (spiral), as the encoder takes them."""
    if spec.data.side == 1:
        return str(spec.data.depth)
    return f"{spec.data.depth}x{spec.data.side}x{spec.data.side}"


def _registered_before(client: MlflowClient, run_id: str, model: str) -> str | None:
    """The version an earlier attempt of this job registered (it was stopped, preempted or
    lost after registering, before ending), so that a new attempt registers no second one."""
    run_tags = client.get_run(run_id).data.tags
    return run_tags.get(tags.MODEL_VERSION) if run_tags.get(tags.MODEL_NAME) == model else None


def run_job(job: dict) -> dict[str, float | str]:
    spec: JobSpec = parse_spec(job["spec"])
    client = MlflowClient(tracking_uri=job["tracking_uri"], registry_uri=job["tracking_uri"])
    run_id, job_id = job["run_id"], job["job_id"]

    user_data = prepare_user_data(spec) if spec.data.is_user_data else None
    checkpoint = pretrain(
        spec,
        job_id,
        run_id,
        job["tracking_uri"],
        job["storage_path"],
        user_data,
        worker_resource=job.get("worker_resource"),
    )
    if user_data is not None:
        check_bad_samples(user_data)
    if checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(checkpoint.to_directory(str(Path(scratch) / "final")))
        encoder_dir = local / ENCODER_DIR
        encoder = load_encoder_dir(encoder_dir)
        evaluation = _evaluate(spec, encoder, user_data, client, run_id)
        summary: dict[str, float | str] = dict(evaluation.metrics) if evaluation else {}
        if spec.registration:
            version = _registered_before(client, run_id, spec.registration.model) or (
                register_encoder(
                    job["tracking_uri"],
                    run_id,
                    encoder_dir,
                    spec.registration.model,
                    spec.registration.alias,
                    _version_tags(spec, job_id, evaluation),
                    _description(spec, job_id),
                )
            )
            for key, value in (
                (tags.MODEL_NAME, spec.registration.model),
                (tags.MODEL_VERSION, version),
                (tags.MODEL_ALIAS, spec.registration.alias),
            ):
                client.set_tag(run_id, key, value)
            summary["model"] = (
                f"{spec.registration.model}@{spec.registration.alias} (version {version})"
            )
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED))
    return summary


def run_evaluation(job: dict) -> dict[str, float | str]:
    """An evaluation job (pipelines/evaluation_job.py) into the job's own run."""
    spec = EvaluationJobSpec.model_validate(job["spec"])
    source = open_encoder(spec.encoder, job["tracking_uri"])
    _, evaluation = evaluate_as_run(
        source,
        Tracking(job["tracking_uri"]),
        list(spec.protocols),
        data=spec.data,
        test_fraction=spec.test_fraction,
        split_seed=spec.split_seed,
        baselines=spec.baselines,
        run_id=job["run_id"],
    )
    return {"encoder": source.label, **evaluation.metrics}


# Set once Ray Jobs stops this attempt: what fails after it is the stop, not the job's fault,
# and the controller that stopped it records why.
_stopped = threading.Event()


def _abort_training_on_sigterm() -> None:
    """Ray Jobs stops an attempt (a cancel, a preemption, a resize) with SIGTERM, then
    SIGKILL a few seconds later. Ray Train aborts a run cleanly only on SIGINT: it then
    withdraws the gang's resource request, which otherwise outlives the attempt by minutes,
    so that an elastic gang started next sees those CPUs as taken and starts smaller."""

    def abort(_signum: int, _frame: object) -> None:
        _stopped.set()
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, abort)


def main() -> int:
    if JOB_ENV not in os.environ:
        print(f"usage: {JOB_ENV}='<job JSON>' python -m pipelines.driver", file=sys.stderr)
        return 2
    job = json.loads(os.environ[JOB_ENV])
    mlflow.set_tracking_uri(job["tracking_uri"])
    ray.init(runtime_env=TRAIN_RUNTIME_ENV)  # joins the cluster that runs this Ray Job
    _abort_training_on_sigterm()  # after ray.init, which installs a SIGTERM handler of its own
    try:
        summary = run_evaluation(job) if job.get("kind") == KIND else run_job(job)
    except Exception as error:  # noqa: BLE001 - the job fails, with its reason recorded
        traceback.print_exc()
        if _stopped.is_set():
            return 1
        client = MlflowClient(tracking_uri=job["tracking_uri"])
        client.set_tag(job["run_id"], tags.ERROR, _concise(error))
        client.set_tag(job["run_id"], tags.ERROR_KIND, error_kind(error))
        client.set_terminated(job["run_id"], status=RunStatus.to_string(RunStatus.FAILED))
        return 1
    print(json.dumps({"job_id": job["job_id"], **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
