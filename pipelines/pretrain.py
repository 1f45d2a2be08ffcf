"""Pretraining as a Ray Train TorchTrainer: one gang of DDP workers (gloo on CPU, NCCL on GPU).

The run name is the job id and the storage path is fixed per stack: a retried job builds a
trainer with the same two, and Ray Train V2 restores the run's checkpoint manager from
storage, so ``ray.train.get_checkpoint()`` in the workers returns the latest checkpoint.
"""

from __future__ import annotations

from ray.data import ExecutionOptions, ExecutionResources
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig, TorchTrainer

from pipelines.spec import JobSpec, TrainSpec
from pipelines.user_data import UserData
from workers.train_loop import train_loop_per_worker

# Worker crashes inside one run that Ray Train absorbs by restarting the gang from the
# latest checkpoint; failures beyond that end the run and are the controller's to retry.
MAX_WORKER_FAILURES = 2
# Ray Train V2 hands each ray.train.report to its controller through a one-slot queue that
# the controller drains on its health-check poll (2 s by default): with short epochs every
# report would wait for the next poll. Set on the driver's runtime env, so the controller
# actor sees it.
# How often Ray Train looks whether an elastic gang running below the size the controller
# admitted it at can grow back to it: a gang that restarts while the cluster still releases
# the previous attempt's workers, or after a lost node came back, starts smaller (60 s by
# default: a whole short job's time).
ELASTIC_RESIZE_CHECK_S = 10.0
TRAIN_RUNTIME_ENV = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}}


def checkpoint_config(train: TrainSpec) -> CheckpointConfig:
    """Ray Train keeps ``keep_checkpoints`` of them, the latest or the lowest epoch losses
    (the "loss" each epoch reports), and always the latest besides."""
    if train.keep_by == "lowest_loss":
        return CheckpointConfig(
            num_to_keep=train.keep_checkpoints,
            checkpoint_score_attribute="loss",
            checkpoint_score_order="min",
        )
    return CheckpointConfig(num_to_keep=train.keep_checkpoints)


def pretrain(
    spec: JobSpec,
    job_id: str,
    run_id: str,
    tracking_uri: str,
    storage_path: str,
    user_data: UserData | None = None,
    worker_resource: str | None = None,
) -> Checkpoint | None:
    """The latest checkpoint. On a user's images the workers stop early, without one for
    that epoch, past the unreadable-image limit: the driver checks the count first."""
    resources = spec.resources
    config = {"spec": spec, "run_id": run_id, "tracking_uri": tracking_uri}
    data_options: dict = {}
    if user_data is not None:
        config["images"] = user_data.images
        # Ray Train splits "train" into one equal shard per worker (streaming_split), and
        # its decode tasks use at most the CPUs the job reserved for them.
        limits = ExecutionResources(cpu=resources.data_cpus)
        data_options = {
            "datasets": {"train": user_data.stream},
            "dataset_config": DataConfig(
                execution_options=ExecutionOptions(resource_limits=limits)
            ),
        }
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    if worker_resource:  # the deployment's training nodes offer it: the workers go there
        per_worker[worker_resource] = resources.cpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=(resources.sizes[0], resources.workers)
            if resources.min_workers
            else resources.workers,
            use_gpu=use_gpu,
            resources_per_worker=per_worker,
            elastic_resize_monitor_interval_s=ELASTIC_RESIZE_CHECK_S,
        ),
        run_config=RunConfig(
            name=job_id,
            storage_path=storage_path,  # a folder, or a URI such as s3://bucket/prefix
            checkpoint_config=checkpoint_config(spec.train),
            failure_config=FailureConfig(max_failures=MAX_WORKER_FAILURES),
        ),
        **data_options,
    )
    return trainer.fit().checkpoint
