"""The latent-variable and energy-based methods one process at a time: RBM and Langevin EBM
energies after short training, the EBM's divergence guard, k-means and PCA against their
closed forms, corruption, and the spec and data sources they need."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA as ReferencePCA

from pipelines.params import KMeansParams, LangevinEBMParams, PCAParams, RBMParams
from pipelines.spec import SpecError, parse_spec
from workers.augment import build_augment
from workers.data import load_data_section, load_dataset, split_dataset
from workers.encoders import build_encoder
from workers.methods import Batch, Method, MethodContext
from workers.methods.dae import corrupt
from workers.methods.ebm_langevin import LangevinEBM
from workers.methods.kmeans import KMeans
from workers.methods.pca import PCA
from workers.methods.rbm import RBM
from workers.step import Training

AUGMENT = build_augment("none", 8, 0, 0)


pytestmark = pytest.mark.usefixtures("one_thread")


def context(
    arch: str, in_channels: int, image_size: int, num_samples: int, out_dim: int = 32
) -> MethodContext:
    """A method's context around a fresh backbone ``arch``, ``out_dim`` features wide."""
    config = {"in_channels": in_channels, "image_size": image_size, "out_dim": out_dim}
    return MethodContext(build_encoder({"arch": arch, **config}), out_dim, num_samples)


def ebm_params(
    langevin_steps: int,
    step_size: float,
    noise_std: float,
    buffer_size: int,
    energy_penalty: float,
    energy_limit: float,
) -> LangevinEBMParams:
    return LangevinEBMParams(
        name="ebm_langevin",
        langevin_steps=langevin_steps,
        step_size=step_size,
        noise_std=noise_std,
        buffer_size=buffer_size,
        reinit_fraction=0.05,
        energy_penalty=energy_penalty,
        energy_limit=energy_limit,
    )


def train(method: Method, data: torch.Tensor, steps: int, batch: int, lr: float) -> None:
    training = Training.of(method, torch.optim.Adam(method.parameters(), lr=lr), AUGMENT)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        rows = torch.randint(0, len(data), (batch,), generator=generator)
        training.train_step(data[rows], rows)


@pytest.mark.parametrize("persistent", [False, True])
def test_rbm_gives_data_lower_free_energy_than_noise(persistent: bool) -> None:
    torch.manual_seed(0)
    digits = load_dataset("builtin:digits").images
    params = RBMParams(name="rbm", hidden=64, cd_steps=1, persistent=persistent, chains=32)
    rbm = RBM(params, context("mlp", 1, 8, len(digits)))
    noise = torch.rand(256, 1, 8, 8)
    # Untrained (W ~ 0.01, zero biases) the two are within a fraction of a unit.
    assert rbm.energy(digits[:256]).mean() - rbm.energy(noise).mean() > -2
    train(rbm, digits, steps=150, batch=64, lr=0.01)
    with torch.no_grad():
        data_energy, noise_energy = rbm.energy(digits[:256]).mean(), rbm.energy(noise).mean()
    assert data_energy < noise_energy - 10, (data_energy, noise_energy)


def test_langevin_ebm_gives_the_spiral_lower_energy_than_noise() -> None:
    torch.manual_seed(0)
    spiral = load_dataset("builtin:spiral").samples
    ebm = LangevinEBM(ebm_params(10, 0.01, 0.1, 512, 0.1, 1e4), context("mlp", 2, 1, len(spiral)))
    noise = 2 * torch.rand(1024, 2) - 1

    def gap() -> float:
        with torch.no_grad():
            return (ebm.energy(noise).mean() - ebm.energy(spiral).mean()).item()

    assert abs(gap()) < 0.1  # untrained, F is nearly flat
    train(ebm, spiral, steps=200, batch=128, lr=3e-3)
    assert gap() > 0.2


def test_langevin_ebm_fails_with_a_clear_message_when_it_diverges() -> None:
    torch.manual_seed(0)
    spiral = load_dataset("builtin:spiral").samples
    ebm = LangevinEBM(ebm_params(30, 1e6, 0.01, 64, 0.0, 100.0), context("mlp", 2, 1, len(spiral)))
    with pytest.raises(FloatingPointError, match=r"ebm_langevin diverged at step 0: .*step_size"):
        train(ebm, spiral, steps=3, batch=32, lr=1e-3)


def test_kmeans_prototypes_are_running_means_of_their_members() -> None:
    torch.manual_seed(0)
    digits = load_dataset("builtin:digits").images.flatten(1)
    kmeans = KMeans(KMeansParams(name="kmeans", clusters=5), context("mlp", 64, 1, len(digits)))
    first, second = digits[:40], digits[40:100]
    kmeans(Batch(first, torch.arange(40), 0, AUGMENT))
    start = first[:5]  # the first batch's first K samples
    owner = torch.cdist(first, start).argmin(1)
    expected = torch.stack([first[owner == k].mean(0) for k in range(5)])
    torch.testing.assert_close(kmeans.coder.prototypes, expected)
    members = [first[owner == k] for k in range(5)]

    kmeans(Batch(second, torch.arange(60), 1, AUGMENT))
    owner = torch.cdist(second, expected).argmin(1)
    members = [torch.cat([members[k], second[owner == k]]) for k in range(5)]
    expected = torch.stack([group.mean(0) for group in members])
    torch.testing.assert_close(kmeans.coder.prototypes, expected)
    torch.testing.assert_close(kmeans.counts, torch.tensor([float(len(g)) for g in members]))


def test_streaming_pca_matches_scikit_learn_on_all_batches_together() -> None:
    digits = load_dataset("builtin:digits").images
    pca = PCA(PCAParams(name="pca", components=6), context("mlp", 1, 8, len(digits)))
    for step, start in enumerate(range(0, 600, 150)):
        pca(Batch(digits[start : start + 150], torch.arange(150), step, AUGMENT))
    reference = ReferencePCA(n_components=6).fit(digits[:600].flatten(1).double().numpy())
    torch.testing.assert_close(pca.coder.mean.double(), torch.from_numpy(reference.mean_))
    alignment = pca.coder.components.double() @ torch.from_numpy(reference.components_).T
    torch.testing.assert_close(
        alignment.abs(), torch.eye(6, dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_masking_hides_whole_patches_at_the_asked_ratio() -> None:
    torch.manual_seed(0)
    images = torch.rand(64, 1, 8, 8) + 0.5  # no pixel is 0 before masking
    hidden = corrupt(images, torch.Generator().manual_seed(0), "mask", 0.0, 0.25, 4) == 0
    blocks = hidden.view(64, 1, 2, 4, 2, 4).permute(0, 1, 2, 4, 3, 5).flatten(4)
    assert (blocks.all(4) | ~blocks.any(4)).all()  # a 4x4 patch is hidden whole or not at all
    assert 0.15 < hidden.float().mean() < 0.35


def test_unlabelled_sources_load_with_their_options_and_split_unstratified() -> None:
    spec = parse_spec(
        {
            "name": "p",
            "method": {"name": "sparse_coding"},
            "data": {
                "source": "builtin:patches",
                "patches": {"size": 6, "count": 400, "whiten": True},
            },
        }
    )
    patches = load_data_section(spec.model_dump(mode="json")["data"])
    assert patches.labels is None and patches.samples.shape == (400, 1, 6, 6)
    flat = patches.samples.flatten(1).double()
    assert abs(flat.std().item() - 1) < 1e-4
    assert flat.mean(1).abs().max() < 1e-4  # every whitened patch is centred
    split = split_dataset(patches, 0.25, 0)
    assert (len(split.train), len(split.test)) == (300, 100)
    assert not np.intersect1d(split.train, split.test).size

    spiral = load_dataset("builtin:spiral", {"count": 300, "noise": 0.0, "seed": 1})
    assert spiral.samples.shape == (300, 2) and spiral.labels is None
    assert (spiral.in_channels, spiral.image_size) == (2, 1)
    assert spiral.samples.abs().max() <= 1.0


@pytest.mark.parametrize(
    ("method", "data", "field"),
    [
        ({"name": "conv_sparse_coding", "kernel_size": 4}, {}, "method.kernel_size"),
        ({"name": "kmeans", "clusters": 300}, {}, "method.clusters"),
        ({"name": "pca", "components": 65}, {}, "method.components"),
        ({"name": "sparse_coding", "solver": "lars"}, {}, "method.solver"),
        ({"name": "lista", "loss": "l2"}, {}, "method.loss"),
        (
            {"name": "rbm"},
            {"source": "builtin:patches", "patches": {"whiten": True}},
            "data.source",
        ),
        ({"name": "ebm_langevin"}, {"source": "builtin:spiral"}, "encoder.arch"),
        ({"name": "vae"}, {"source": "builtin:digits", "patches": {"size": 8}}, "data"),
        (
            {"name": "dae"},
            {"source": "builtin:spiral", "spiral": {"count": 5}},
            "data.spiral.count",
        ),
    ],
)
def test_spec_rejects_what_the_family_cannot_run(method: dict, data: dict, field: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec({"name": "x", "method": method, "data": data, "train": {"batch_size": 256}})
    assert field in dict(caught.value.problems), caught.value.problems
