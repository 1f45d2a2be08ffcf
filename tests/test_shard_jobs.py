"""Users' images streamed by Ray Data into 2 gloo ranks, inside the Ray Train run shared with
the other distributed tests (tests/latent_ranks.py):

- SimCLR on Parquet shards and PIRL (whose memory bank needs each sample's index) on
  WebDataset shards, each with corrupt samples among the images, train through the real
  ``train_loop_per_worker``, their data prepared as the driver
  prepares a job's data; each counts the corrupt training samples in ``data.bad_samples`` and
  ends with an encoder that registers, loads and reproduces its checkpoint's features.
- What an epoch of a stream promises, on a folder with corrupt files (README "Resume"):
  every rank takes the same number of batches; no image reaches two ranks or one rank twice;
  what is left out is the unreadable files and less than one batch per rank; the next epoch
  comes in another order. A resumed epoch is such an epoch, from the checkpoint's state.

(Folders and S3 buckets take the full CLI job path in tests/test_user_data_jobs.py.)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from examples.make_image_folder import (
    generate_images,
    shuffled,
    write_parquet_shards,
    write_tar_shards,
)
from pipelines.spec import parse_spec
from pipelines.user_data import UserData, prepare_user_data
from tests.latent_ranks import WithDatasets, part_results, register_part
from tests.train_loop_runs import (
    Runs,
    register_and_assert_loads,
    train_loop_jobs,
    train_loop_runs,
    train_one_after_another,
)
from tests.user_images import BROKEN, CLASSES, job_document, rgba_png
from workers.feeds import StreamFeed

WRITERS = {"parquet": write_parquet_shards, "webdataset": write_tar_shards}
METHODS = {
    "simclr": {"name": "simclr", "temperature": 0.2, "projection_dim": 32, "hidden_dim": 64},
    "pirl": {"name": "pirl", "num_negatives": 64, "projection_dim": 32, "hidden_dim": 64},
}
# Each format with one method: a format is read the same whatever trains on it.
JOBS = {"parquet": "simclr", "webdataset": "pirl"}
PER_RANK = 8  # images per rank and step in the epoch checks
_PREPARED: dict[str, UserData] = {}  # what the test process prepared, for the checks


def _images(seed: int) -> list[tuple[str, bytes]]:
    """20 crops of each class, the corrupt files, a grey and an RGBA image, in a seeded
    order."""
    images = list(generate_images(20, seed=seed, classes=CLASSES))
    return shuffled([*images, *BROKEN.items(), ("grass/rgba.png", rgba_png(seed))], seed)


def _shard_jobs(folder: Path) -> WithDatasets:
    documents = {}
    for kind, method in JOBS.items():
        WRITERS[kind](folder / kind, _images(seed=len(kind)), per_shard=40)
        document = job_document(
            f"shards-{kind}-{method}", METHODS[method], f"file://{folder / kind}"
        )
        document["train"] |= {"epochs": 1, "batch_size": 32}
        document["data"]["max_bad_fraction"] = 0.1
        documents[f"{kind}-{method}"] = document
    return train_loop_jobs(folder / "runs", documents)


def _epochs_on_rank(args: tuple) -> dict:
    spec, images = args
    world = torch.distributed.get_world_size()
    feed = StreamFeed(spec, images, world, torch.device("cpu"))
    epochs = [[positions.tolist() for _, positions in feed.batches(epoch)] for epoch in (0, 1)]
    return {"steps_per_epoch": feed.steps_per_epoch, "epochs": epochs}


def _epoch_args(folder: Path) -> WithDatasets:
    for key, data in [*generate_images(20, seed=9, classes=CLASSES), *BROKEN.items()]:
        path = folder / "images" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    document = job_document("epochs", METHODS["simclr"], f"file://{folder / 'images'}")
    document["train"]["batch_size"] = 2 * PER_RANK
    document["data"]["max_bad_fraction"] = 0.1
    spec = parse_spec(document)
    user_data = prepare_user_data(spec)
    _PREPARED["epochs"] = user_data
    images = replace(user_data.images, dataset="epochs")
    return WithDatasets((spec, images), {"epochs": user_data.stream})


register_part("shard-jobs", train_one_after_another, _shard_jobs)
register_part("stream-epochs", _epochs_on_rank, _epoch_args)


@pytest.fixture(scope="module")
def shard_runs(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return train_loop_runs("shard-jobs", tmp_path_factory)


@pytest.mark.parametrize(("kind", "method"), sorted(JOBS.items()))
def test_trains_on_shards_counts_corrupt_samples_and_registers(
    shard_runs: Runs, kind: str, method: str
) -> None:
    tracking_uri, run_id, _ = shard_runs[f"{kind}-{method}"]
    metrics = MlflowClient(tracking_uri).get_run(run_id).data.metrics
    assert np.isfinite(metrics["train.epoch_loss"])
    # Some corrupt samples fall in the training split (seeded), and each counts once.
    assert 1 <= metrics["data.bad_samples"] <= len(BROKEN)
    register_and_assert_loads(shard_runs, f"{kind}-{method}", f"shards-{kind}-{method}")


def test_an_epoch_gives_each_image_to_one_rank_at_most_once(
    ray_local: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ranks = part_results("stream-epochs", tmp_path_factory)
    user_data = _PREPARED["epochs"]
    catalog, train = user_data.catalog, user_data.split.train
    unreadable = {position for position, index in enumerate(train) if catalog.keys[index] in BROKEN}
    assert unreadable, "the seeded split put no corrupt file in training"
    world = len(ranks)
    orders = []
    for epoch in (0, 1):
        batches = [rank["epochs"][epoch] for rank in ranks]
        assert len({len(rank) for rank in batches}) == 1  # the same step count on every rank
        assert all(len(batch) == PER_RANK for rank in batches for batch in rank)
        seen = [position for rank in batches for batch in rank for position in batch]
        assert len(seen) == len(set(seen))  # no image twice, on one rank or across ranks
        assert not set(seen) & unreadable
        readable = len(train) - len(unreadable)
        assert readable - world * PER_RANK < len(seen) <= readable
        assert len(batches[0]) <= ranks[0]["steps_per_epoch"]
        orders.append(seen)
    assert orders[0] != orders[1]
