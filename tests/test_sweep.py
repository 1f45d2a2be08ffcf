"""Sweeps without Ray: the `sweep:` section expands into validated trials (grid, seeded random
draws, every refusal named), and the controller stores a sweep with its trials, holds those
beyond max_parallel, ranks them by the metric, ends the sweep once they all have ended, and
cancels it with its unfinished trials. Real SQLite stores and MLflow; the queue paused."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.spec import SpecError, load_spec_text
from pipelines.sweep import MAX_TRIALS, load_sweep_text
from service.auth import USER, Principal
from service.errors import JobConflict, JobNotFound
from service.store import JobState
from tests.test_submit_path import paused_controller

TINY = (Path(__file__).parent / "specs" / "tiny-pca.yaml").read_text()
ALICE = Principal("alice", USER)


def sweep_text(section: dict, base: str = TINY) -> str:
    return base + yaml.safe_dump({"sweep": section})


def test_a_grid_gives_every_combination_as_a_named_valid_trial() -> None:
    sweep = load_sweep_text(
        sweep_text(
            {
                "grid": {"method.components": [4, 8], "train.lr": [1e-3, 1e-2]},
                "metric": "train.loss",
                "mode": "min",
            }
        )
    )
    assert [trial.spec.name for trial in sweep.trials] == [f"tiny-pca-t{i}" for i in range(4)]
    assert [(t.spec.method.components, t.spec.train.lr) for t in sweep.trials] == list(
        itertools.product([4, 8], [1e-3, 1e-2])
    )
    assert sweep.trials[3].values == {"method.components": 8, "train.lr": 1e-2}
    # The trial's text is a plain spec: submitted as it is, it parses to the same spec.
    assert load_spec_text(sweep.trials[3].spec_text) == sweep.trials[3].spec
    assert sweep.sweep.max_parallel == 2 and sweep.sweep.better(0.1, than=0.2)


def test_random_draws_are_seeded_bounded_and_per_grid_point() -> None:
    section = {
        "grid": {"method.components": [4, 8]},
        "random": {
            "train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
            "train.epochs": {"low": 1, "high": 3, "integer": True},
            "augment.preset": {"choice": ["none", "digits"]},
        },
        "samples": 3,
        "seed": 7,
        "metric": "train.loss",
    }
    first = load_sweep_text(sweep_text(section))
    assert [t.values for t in first.trials] == [
        t.values for t in load_sweep_text(sweep_text(section)).trials
    ]
    assert len(first.trials) == 6
    assert [t.spec.method.components for t in first.trials] == [4, 4, 4, 8, 8, 8]
    for trial in first.trials:
        assert 1e-4 <= trial.spec.train.lr <= 1e-2 and trial.spec.train.epochs in (1, 2, 3)
        assert trial.spec.augment.preset in ("none", "digits")
    other = load_sweep_text(sweep_text({**section, "seed": 8}))
    assert [t.values for t in other.trials] != [t.values for t in first.trials]


@pytest.mark.parametrize(
    ("section", "field", "says"),
    [
        ({"grid": {"train.lr": [1e-3]}}, "sweep.metric", "Field required"),
        ({"grid": {"name": ["a", "b"]}, "metric": "m"}, "sweep.grid.name", "may not vary"),
        ({"metric": "m"}, "sweep", "nothing to vary"),
        ({"random": {"train.lr": {"low": 1, "high": 2}}, "metric": "m"}, "sweep.samples", "draws"),
        (
            {
                "random": {"train.lr": {"low": 0, "high": 1, "log": True}},
                "samples": 2,
                "metric": "m",
            },
            "sweep.random.train.lr",
            "low > 0",
        ),
        (
            {"grid": {"train.seed": list(range(300))}, "metric": "m"},
            "sweep",
            f"at most {MAX_TRIALS}",
        ),
        (
            {"grid": {"train.seed": [0]}, "metric": "m", "promote": "best"},
            "sweep.promote",
            "registers no",
        ),
        ({"grid": {"train.seed": [0]}, "metric": "eval.knn.top1"}, "sweep.metric", "evaluate.knn"),
        ({"grid": {"train.seed": [0]}, "metric": "m", "typo": 1}, "sweep.typo", "Extra inputs"),
        (
            {"grid": {"train.lr": [1e-3, 100]}, "metric": "m"},
            "sweep trial 1 (train.lr=100): train.lr",
            "less than",
        ),
        ({"grid": {"train.epochs.x": [1]}, "metric": "m"}, "sweep", "train.epochs is a value"),
    ],
)
def test_a_bad_sweep_is_refused_naming_the_field(section: dict, field: str, says: str) -> None:
    with pytest.raises(SpecError) as raised:
        load_sweep_text(sweep_text(section))
    assert any(where == field and says in why for where, why in raised.value.problems), (
        raised.value.problems
    )


def test_a_sweep_file_given_as_a_job_says_how_to_submit_it() -> None:
    with pytest.raises(SpecError, match="selfsup sweep submit"):
        load_spec_text(sweep_text({"grid": {"train.seed": [0, 1]}, "metric": "m"}))


@settings(max_examples=60, deadline=None)
@given(
    grid=st.dictionaries(
        st.sampled_from(["train.lr", "train.seed", "train.epochs", "method.components"]),
        st.integers(1, 3),
        min_size=1,
    ),
    samples=st.integers(1, 3),
)
def test_trials_are_the_product_of_the_grid_and_each_sets_its_values(
    grid: dict[str, int], samples: int
) -> None:
    choices = {
        "train.lr": [1e-4, 1e-3, 1e-2],
        "train.seed": [0, 1, 2],
        "train.epochs": [1, 2, 3],
        "method.components": [2, 4, 8],
    }
    section = {
        "grid": {path: choices[path][:count] for path, count in grid.items()},
        "random": {"train.weight_decay": {"low": 1e-6, "high": 1e-3, "log": True}},
        "samples": samples,
        "metric": "train.loss",
    }
    sweep = load_sweep_text(sweep_text(section))
    assert len(sweep.trials) == math.prod(grid.values()) * samples
    combinations = {tuple(t.values[path] for path in grid) for t in sweep.trials}
    assert len(combinations) == math.prod(grid.values())
    for trial in sweep.trials:
        document = trial.spec.model_dump(mode="json")
        for path, value in trial.values.items():
            section_name, field = path.split(".")
            assert document[section_name][field] == value


def test_the_controller_stores_holds_ranks_and_ends_a_sweep(tmp_path: Path) -> None:
    controller = paused_controller(tmp_path)
    text = sweep_text(
        {
            "grid": {"method.components": [2, 4, 8]},
            "max_parallel": 1,
            "metric": "train.loss",
            "mode": "min",
        }
    )
    sweep = controller.sweeps.submit(ALICE, text)
    stored, views = controller.sweeps.get(ALICE, sweep.id)
    ids = [entry["job_id"] for entry in stored.trials]
    assert [view.job.id for view in views] == ids and stored.state == JobState.RUNNING
    assert all(controller.store.get(i).sweep_id == sweep.id for i in ids)
    # One slot: the first trial may go; the others wait for it, saying so.
    held = controller.sweeps.tick()
    assert set(held) == set(ids[1:]) and "at most 1 trials at once (0 running)" in held[ids[2]]
    controller.store.transition(ids[0], [JobState.QUEUED], JobState.RUNNING, "test")
    assert set(controller.sweeps.tick()) == set(ids[1:])
    # The trials end; the sweep ranks them by the metric (lowest first: mode min).
    for job_id, loss, state in zip(
        ids, [0.5, 0.2, None], ["SUCCEEDED", "SUCCEEDED", "FAILED"], strict=True
    ):
        result = {"train.loss": loss} if loss is not None else None
        controller.store.transition(job_id, list(JobState), JobState(state), "test", result=result)
    assert controller.sweeps.tick() == {}
    ended, views = controller.sweeps.get(ALICE, sweep.id)
    assert ended.state == JobState.SUCCEEDED and ended.result["best_job"] == ids[1]
    assert [view.value for view in views] == [0.2, 0.5, None]
    assert ended.message == f"best: {ids[1]}, train.loss = 0.2000"
    with pytest.raises(JobNotFound):
        controller.sweeps.get(Principal("bob", USER), sweep.id)


def test_cancelling_a_sweep_cancels_its_unfinished_trials_once(tmp_path: Path) -> None:
    controller = paused_controller(tmp_path)
    sweep = controller.sweeps.submit(
        ALICE, sweep_text({"grid": {"train.seed": [0, 1]}, "metric": "m"})
    )
    first = sweep.trials[0]["job_id"]
    controller.store.transition(first, [JobState.QUEUED], JobState.SUCCEEDED, "test")
    cancelled = controller.sweeps.cancel(ALICE, sweep.id)
    assert cancelled.state == JobState.CANCELLED and cancelled.message == "cancelled by alice"
    states = [controller.store.get(entry["job_id"]).state for entry in sweep.trials]
    assert states == [JobState.SUCCEEDED, JobState.CANCELLED]
    with pytest.raises(JobConflict, match="already CANCELLED"):
        controller.sweeps.cancel(ALICE, sweep.id)


def test_a_sweep_with_one_bad_trial_stores_nothing(tmp_path: Path) -> None:
    controller = paused_controller(tmp_path)
    too_wide = sweep_text({"grid": {"resources.cpus_per_worker": [1, 64]}, "metric": "m"})
    with pytest.raises(SpecError, match="sweep trial 1: resources"):
        controller.sweeps.submit(ALICE, too_wide)
    assert controller.store.count() == 0 and controller.sweeps.list(ALICE) == []
