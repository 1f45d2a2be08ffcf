"""A user's images for one job, assembled on the driver: the source listed once (every image's
global index), the held-out split fixed by seed, the training part as a Ray Data stream for
the TorchTrainer, and the few images decoded here that the workers and evaluation need.

Evaluation decodes its labelled images in the driver's memory, at most EVAL_MAX_IMAGES of them
(a seeded, label-stratified subset beyond that): a linear probe and kNN on that many held-out
features already measure an encoder to a fraction of a percent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.sources import Catalog, ImageSource
from pipelines.spec import JobSpec, check_listed
from workers.data import SampleDataset, Split, split_samples
from workers.feeds import FIGURE_SAMPLES, REFERENCE_IMAGES, BadSampleCount
from workers.images import BadSamples, StreamedImages, image_stream, load_images

EVAL_MAX_IMAGES = 20_000


@dataclass(frozen=True)
class UserData:
    catalog: Catalog
    split: Split  # global indices into catalog
    stream: ray.data.Dataset  # the training split, decoded by Ray Data tasks
    images: StreamedImages  # what the workers take beside their shard


def prepare_user_data(spec: JobSpec) -> UserData:
    """List, check and split the source; the stream is lazy and runs inside training."""
    data = spec.data
    catalog = Catalog.list(ImageSource.parse(data.source), data.image_column, data.label_column)
    check_listed(spec, len(catalog.keys))
    split = split_samples(
        len(catalog.keys), catalog_labels(catalog), data.test_fraction, data.split_seed
    )
    # On the driver's node: the count must outlive any worker node (losing the driver's node
    # ends the job anyway), or decode tasks that report to it fail after a node loss.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    bad = BadSamples.options(scheduling_strategy=here).remote()
    stream = image_stream(
        catalog, split.train, data.side, data.depth, bad, spec.train.seed, spec.resources.data_cpus
    )
    # A few more held-out images than needed, in case some do not decode.
    reference, _ = load_images(catalog, split.test[: 2 * REFERENCE_IMAGES], data.side, data.depth)
    sample, _ = load_images(catalog, split.train[:FIGURE_SAMPLES], data.side, data.depth)
    images = StreamedImages(
        train_count=len(split.train),
        channels=data.depth,
        side=data.side,
        reference=reference[:REFERENCE_IMAGES],
        sample=sample,
        bad=bad,
        max_bad=math.floor(data.max_bad_fraction * len(split.train)),
    )
    return UserData(catalog, split, stream, images)


class TooManyBadSamples(ValueError):
    """The job's data, not its infrastructure, failed it: a user error."""


def check_bad_samples(user_data: UserData) -> None:
    """Raise when the unreadable training images are more than the spec allows (the rule
    the workers stop by: ``BadSampleCount.exceeded``)."""
    images = user_data.images
    bad = BadSampleCount(*ray.get(images.bad.summary.remote()), allowed=images.max_bad)
    if bad.exceeded:
        raise TooManyBadSamples(
            f"{bad.count} of {images.train_count} training images of "
            f"{user_data.catalog.source.uri} could not be decoded, more than data.max_bad_fraction "
            f"allows ({bad.allowed}); e.g. {', '.join(bad.examples)}"
        )


def catalog_labels(catalog: Catalog) -> torch.Tensor | None:
    return torch.tensor(catalog.labels, dtype=torch.int64) if catalog.labels else None


def evaluation_set(spec: JobSpec, user_data: UserData) -> tuple[SampleDataset, Split, str] | None:
    """The labelled images to evaluate on, the split to use and where they came from: the
    spec's ``evaluate.data`` split by the data section's recipe, or else the source's own
    class folders with the pretraining split. None when neither has labels."""
    data = spec.data
    if spec.evaluate.data is not None:
        labelled = labelled_images(
            spec.evaluate.data,
            data.side,
            data.depth,
            data.test_fraction,
            data.split_seed,
            data.image_column,
            data.label_column,
        )
        return None if labelled is None else (*labelled, spec.evaluate.data)
    catalog = user_data.catalog
    if catalog.labels is None:
        return None
    every = np.concatenate([user_data.split.train, user_data.split.test])
    chosen = np.sort(_subset(every, catalog.labels, data.split_seed))
    dataset, kept = _decoded(catalog, chosen, data.side, data.depth)
    in_test = np.isin(kept, user_data.split.test)
    split = Split(train=np.flatnonzero(~in_test), test=np.flatnonzero(in_test))
    return dataset, split, data.source


def labelled_images(
    uri: str,
    side: int,
    depth: int,
    test_fraction: float,
    split_seed: int,
    image_column: str | None = None,
    label_column: str | None = None,
) -> tuple[SampleDataset, Split] | None:
    """A labelled source (class folders, or a shard set's labels) decoded for evaluation,
    at most EVAL_MAX_IMAGES of it, split by the recipe over what decoded; None when it has
    no labels."""
    catalog = Catalog.list(ImageSource.parse(uri), image_column, label_column)
    if catalog.labels is None:
        return None
    chosen = _subset(np.arange(len(catalog.keys)), catalog.labels, split_seed)
    dataset, kept = _decoded(catalog, chosen, side, depth)
    return dataset, split_samples(len(kept), dataset.labels, test_fraction, split_seed)


def _subset(indices: np.ndarray, labels: list[int], seed: int) -> np.ndarray:
    """At most EVAL_MAX_IMAGES of ``indices``, the same share of every class."""
    if len(indices) <= EVAL_MAX_IMAGES:
        return indices
    rng = np.random.default_rng(seed)
    by_class = np.asarray(labels)[indices]
    share = EVAL_MAX_IMAGES / len(indices)
    picked = [
        rng.choice(members, max(1, round(share * len(members))), replace=False)
        for members in (indices[by_class == label] for label in np.unique(by_class))
    ]
    return np.sort(np.concatenate(picked))


def _decoded(
    catalog: Catalog, indices: np.ndarray, side: int, depth: int
) -> tuple[SampleDataset, np.ndarray]:
    """The labelled images ``indices`` that decode, as floats in [0, 1], and their indices."""
    images, kept = load_images(catalog, indices, side, depth)
    labels = torch.tensor([catalog.labels[i] for i in kept], dtype=torch.int64)
    samples = torch.from_numpy(images).float().div_(255.0)
    return SampleDataset(samples=samples, labels=labels), kept
