"""builtin:patches in grey and colour, labelled by photograph or not: shapes, ranges, labels
spread evenly over the photographs, whitening over all channels, and the grey patches exactly
as the algorithm before colour and labels gave them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import rgb2gray

from pipelines.spec import PatchesOptions
from workers.data import load_dataset, natural_images, split_dataset, zca_whiten

PHOTOGRAPHS = 7


def grey_patches_before_colour(size: int, count: int, seed: int, whiten: bool) -> torch.Tensor:
    """The grey path as it was before colour and labels, photographs loaded anew: the
    reference every grey patch set must match bit for bit."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "camera", "chelsea", "coffee", "rocket")
    pictures = [getattr(skimage.data, name)() for name in names]
    pictures += list(load_sample_images().images)
    pictures = [
        np.asarray(rgb2gray(p) if p.ndim == 3 else p / 255.0, dtype=np.float64) for p in pictures
    ]
    rng = np.random.default_rng(seed)
    per_picture = [
        count // len(pictures) + (i < count % len(pictures)) for i in range(len(pictures))
    ]
    patches = []
    for picture, number in zip(pictures, per_picture, strict=True):
        rows = rng.integers(0, picture.shape[0] - size + 1, number)
        cols = rng.integers(0, picture.shape[1] - size + 1, number)
        patches += [picture[r : r + size, c : c + size] for r, c in zip(rows, cols, strict=True)]
    flat = np.stack(patches).reshape(count, size * size)
    if whiten:
        flat = zca_whiten(flat, epsilon=1.0)
        flat = flat / flat.std()
    return torch.from_numpy(flat.astype(np.float32)).view(count, 1, size, size)


def patches(**options: object) -> torch.Tensor:
    return load_dataset("builtin:patches", options).samples


@pytest.mark.parametrize(
    ("size", "count", "seed", "whiten"), [(8, 700, 0, False), (5, 1003, 7, True)]
)
def test_grey_patches_are_unchanged(size: int, count: int, seed: int, whiten: bool) -> None:
    options = {"size": size, "count": count, "seed": seed, "whiten": whiten}
    dataset = load_dataset("builtin:patches", options)
    assert dataset.labels is None
    assert torch.equal(dataset.samples, grey_patches_before_colour(size, count, seed, whiten))
    assert torch.equal(patches(**options, channels=1, labelled=True), dataset.samples)


def test_colour_patches_are_the_grey_ones_in_colour() -> None:
    grey, colour = patches(size=6, count=350), patches(size=6, count=350, channels=3)
    assert colour.shape == (350, 3, 6, 6) and colour.dtype == torch.float32
    assert colour.min() >= 0.0 and colour.max() <= 1.0
    # Same positions: rgb2gray of each colour patch is its grey patch.
    as_grey = rgb2gray(colour.double().movedim(1, -1).numpy())
    np.testing.assert_allclose(as_grey, grey[:, 0].double().numpy(), atol=1e-6)
    # camera (the second photograph) is grey: its patches repeat it over the channels.
    camera = colour[50:100]
    assert torch.equal(camera[:, 0], camera[:, 1]) and torch.equal(camera[:, 0], camera[:, 2])
    assert torch.equal(camera[:, 0], grey[50:100, 0])
    # The RGB photographs are in colour, not grey copies.
    assert (colour[:50, 0] - colour[:50, 2]).abs().max() > 0.1


def test_natural_images_in_colour_are_rgb_in_the_unit_range() -> None:
    grey, colour = natural_images(), natural_images(colour=True)
    assert len(grey) == len(colour) == PHOTOGRAPHS
    for g, c in zip(grey, colour, strict=True):
        assert c.shape == (*g.shape, 3) and c.dtype == np.float64
        assert c.min() >= 0.0 and c.max() <= 1.0


def test_whitening_covers_every_channel() -> None:
    raw = patches(size=4, count=1400, channels=3)
    white = patches(size=4, count=1400, channels=3, whiten=True)
    assert white.shape == (1400, 3, 4, 4)
    assert white.std().item() == pytest.approx(1.0, abs=1e-5)
    # ZCA of the flattened C*H*W vector: the same as whitening raw.flatten(1) directly (up to
    # the float32 rounding of raw).
    expected = zca_whiten(raw.flatten(1).double().numpy(), epsilon=1.0)
    expected = expected / expected.std()
    np.testing.assert_allclose(white.flatten(1).numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("channels", [1, 3])
def test_labels_name_the_photograph_each_patch_came_from(channels: int) -> None:
    dataset = load_dataset(
        "builtin:patches", {"size": 6, "count": 703, "labelled": True, "channels": channels}
    )
    labels = dataset.labels
    assert labels is not None and labels.dtype == torch.int64 and labels.shape == (703,)
    counts = torch.bincount(labels, minlength=PHOTOGRAPHS)
    assert counts.tolist() == [101, 101, 101, 100, 100, 100, 100]
    # Each label's patches really are crops of its photograph: its first one is found there.
    for index, picture in enumerate(natural_images(colour=channels == 3)):
        first = dataset.samples[labels == index][0].double().numpy()
        crop = first[0] if channels == 1 else np.moveaxis(first, 0, -1)
        # Candidate corners: the pixels equal to the crop's top-left one on every channel.
        distance = np.abs(picture - crop[0, 0]).reshape(*picture.shape[:2], -1).max(-1)
        corners = np.argwhere(distance < 1e-6)
        assert any(
            np.abs(picture[r : r + 6, c : c + 6] - crop).max() < 1e-6
            for r, c in corners
            if r + 6 <= picture.shape[0] and c + 6 <= picture.shape[1]
        )
    # A stratified split holds every photograph out in proportion.
    split = split_dataset(dataset, 0.25, 0)
    held_out = torch.bincount(labels[split.test], minlength=PHOTOGRAPHS)
    assert held_out.min() >= 24 and held_out.max() <= 26


def test_spec_options_reach_the_loader_and_seeds_decide_the_patches() -> None:
    options = PatchesOptions(size=5, count=140, seed=3, channels=3, labelled=True).model_dump()
    first, again = (
        load_dataset("builtin:patches", options),
        load_dataset("builtin:patches", options),
    )
    assert first.samples.shape == (140, 3, 5, 5) and first.labels is not None
    assert first.in_channels == 3 and first.image_size == 5
    assert torch.equal(first.samples, again.samples) and torch.equal(first.labels, again.labels)
    other = load_dataset("builtin:patches", {**options, "seed": 4})
    assert not torch.equal(first.samples, other.samples)
    assert torch.equal(first.labels, other.labels)  # the spread over photographs is fixed


def test_other_channel_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3 \\(RGB\\)"):
        load_dataset("builtin:patches", {"count": 70, "channels": 2})
