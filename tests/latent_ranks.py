"""One Ray Train run (2 gloo ranks) shared by the latent family's test modules.

Starting a Ray Train run costs ~20-40 s on 2 cores, so tests/test_latent_distributed.py
(2 ranks against one process) and tests/test_latent_jobs.py (the train loop of several
methods) do their distributed work in the same run. Each module registers its part when
pytest imports it; the first test that needs a result runs every registered part, and later
ones read from the cache. Running one module alone runs only its part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.distributed import run_on_workers

# part name -> (what each rank runs: module-level fn(args), how to make args in a folder)
_PARTS: dict[str, tuple[Callable[[Any], Any], Callable[[Path], Any]]] = {}
_RESULTS: dict[str, list[Any]] = {}


@dataclass(frozen=True)
class WithDatasets:
    """What ``make_args`` returns for a part whose ranks read Ray Data shards: its ranks'
    argument, and datasets for the shared run's trainer (named apart from other parts')."""

    args: Any
    datasets: dict[str, Any]


def _no_arguments(folder: Path) -> None:
    return None


def register_part(
    name: str,
    on_each_rank: Callable[[Any], Any],
    make_args: Callable[[Path], Any] = _no_arguments,
) -> None:
    """``on_each_rank(make_args(folder))`` runs on every rank of the shared run."""
    _PARTS[name] = (on_each_rank, make_args)


def _run_parts(parts: dict[str, tuple[Callable[[Any], Any], Any]]) -> dict[str, Any]:
    return {name: on_each_rank(args) for name, (on_each_rank, args) in parts.items()}


def part_results(name: str, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """Each rank's result of part ``name`` (needs the ``ray_local`` fixture active)."""
    if name not in _RESULTS:
        root = tmp_path_factory.mktemp("latent-ranks")
        parts, datasets = {}, {}
        for part, (on_each_rank, make_args) in _PARTS.items():
            if part in _RESULTS:
                continue
            args = make_args(root / part)
            if isinstance(args, WithDatasets):
                assert not datasets.keys() & args.datasets.keys(), "dataset names must differ"
                datasets |= args.datasets
                args = args.args
            parts[part] = (on_each_rank, args)
        ranks = run_on_workers(_run_parts, parts, root, datasets=datasets)
        for part in parts:
            _RESULTS[part] = [rank[part] for rank in ranks]
    return _RESULTS[name]
