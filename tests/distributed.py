"""Run a function on a real gang of Ray Train workers (gloo DDP on CPU) and collect what each
rank returns. For tests whose point is distribution: gathers, queues, banks, all-reduces."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.data
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer


def _run_and_save(config: dict[str, Any]) -> None:
    rank = ray.train.get_context().get_world_rank()
    result = config["fn"](config["args"])
    # The test process reads what each rank produced from a folder on this machine.
    with (Path(config["out"]) / f"rank{rank}.pkl").open("wb") as handle:
        pickle.dump(result, handle)


def run_on_workers(
    fn: Callable[[Any], Any],
    args: Any,
    tmp_path: Path,
    num_workers: int = 2,
    datasets: dict[str, ray.data.Dataset] | None = None,
) -> list[Any]:
    """Run ``fn(args)`` on ``num_workers`` DDP ranks; return the ranks' results in order.

    ``fn`` must be a module-level function (it is shipped to the workers) and should return
    CPU tensors or plain values. Each of ``datasets`` reaches the ranks as equal shards
    (``ray.train.get_dataset_shard(name)``); its decode tasks then take the CPU the ranks
    leave free, as in a job (half a CPU each).
    """
    out = tmp_path / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _run_and_save,
        train_loop_config={"fn": fn, "args": args, "out": str(out)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=False,
            resources_per_worker={"CPU": 0.5} if datasets else None,
        ),
        run_config=RunConfig(storage_path=str(tmp_path / "storage"), name="dist-test"),
        datasets=datasets,
    )
    trainer.fit()
    results = []
    for rank in range(num_workers):
        with (out / f"rank{rank}.pkl").open("rb") as handle:
            results.append(pickle.load(handle))  # noqa: S301 - files this test just wrote
    return results
