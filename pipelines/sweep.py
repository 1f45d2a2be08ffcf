"""A sweep: one spec with a ``sweep:`` section, expanded into ordinary jobs (trials).

    sweep:
      grid:   {train.lr: [1e-3, 3e-3], train.batch_size: [128, 256]}   # every combination
      random: {train.weight_decay: {low: 1e-6, high: 1e-3, log: true}} # drawn per trial
      samples: 2          # random draws for each grid point (random: required)
      seed: 0             # of the draws: the same file gives the same trials
      max_parallel: 2     # trials running at once
      metric: eval.knn.top1
      mode: max           # or min
      promote: best       # optional: the alias the best trial's registered version gets

Trials = grid combinations x samples, at most ``MAX_TRIALS``. Each trial is the spec with
its values set at their dotted fields, named ``<name>-t<index>``, and validated as any
submitted spec. Torch-free: the controller expands sweeps.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError

from pipelines.spec import (
    JobSpec,
    Section,
    SpecError,
    parse_spec,
    read_spec_document,
    set_field,
    validation_problems,
)

MAX_TRIALS = 256
# Fields a trial may not vary: its identity, and what ties it to other jobs.
FIXED_FIELDS = ("name", "depends_on", "register")
# Metrics of the evaluation protocols, and the switch in `evaluate:` that makes each.
PROTOCOL_METRICS = {"eval.knn.top1": "knn", "eval.linear.top1": "linear"}


class RandomRange(Section):
    low: float
    high: float
    log: bool = False  # uniform in log space: learning rates, weight decays
    integer: bool = False  # rounded to the nearest integer


class RandomChoice(Section):
    choice: Annotated[list[Any], Field(min_length=1)]


class SweepSpec(Section):
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = {}
    random: dict[str, RandomRange | RandomChoice] = {}
    samples: Annotated[int, Field(ge=1, le=MAX_TRIALS)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0
    max_parallel: Annotated[int, Field(ge=1, le=256)] = 2
    metric: Annotated[str, Field(min_length=1, max_length=128)]
    mode: Literal["max", "min"] = "max"
    promote: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")] | None = None

    def better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "max" else value < than


@dataclass(frozen=True)
class Trial:
    index: int
    values: dict[str, Any]  # dotted field -> the trial's value
    spec_text: str
    spec: JobSpec


@dataclass(frozen=True)
class Sweep:
    name: str
    sweep: SweepSpec
    trials: list[Trial]


def _problems(sweep: SweepSpec, base: dict) -> list[tuple[str, str]]:
    problems = []
    for section in ("grid", "random"):
        for path in getattr(sweep, section):
            if path.split(".")[0] in FIXED_FIELDS or path.startswith("sweep"):
                problems.append((f"sweep.{section}.{path}", "a trial may not vary this field"))
    for path, spread in sweep.random.items():
        if isinstance(spread, RandomRange) and not spread.low < spread.high:
            problems.append((f"sweep.random.{path}", "low must be below high"))
        if isinstance(spread, RandomRange) and spread.log and spread.low <= 0:
            problems.append((f"sweep.random.{path}", "a log range needs low > 0"))
    if both := set(sweep.grid) & set(sweep.random):
        problems.append(("sweep", f"{', '.join(sorted(both))}: in both grid and random"))
    if not sweep.grid and not sweep.random:
        problems.append(("sweep", "nothing to vary: give grid or random fields"))
    if sweep.random and sweep.samples is None:
        problems.append(("sweep.samples", "random fields need the number of draws"))
    if sweep.promote and "register" not in base:
        problems.append(("sweep.promote", "the spec registers no encoder (register: model)"))
    if (switch := PROTOCOL_METRICS.get(sweep.metric)) and not base.get("evaluate", {}).get(
        switch, True
    ):
        problems.append(("sweep.metric", f"{sweep.metric} needs evaluate.{switch}: true"))
    count = math.prod(len(values) for values in sweep.grid.values()) * (sweep.samples or 1)
    if count > MAX_TRIALS:
        problems.append(("sweep", f"{count} trials; a sweep has at most {MAX_TRIALS}"))
    return problems


def _draw(spread: RandomRange | RandomChoice, rng: random.Random) -> Any:
    if isinstance(spread, RandomChoice):
        return rng.choice(spread.choice)
    if spread.log:
        value = math.exp(rng.uniform(math.log(spread.low), math.log(spread.high)))
    else:
        value = rng.uniform(spread.low, spread.high)
    return round(value) if spread.integer else float(f"{value:.6g}")


def _trial_values(sweep: SweepSpec) -> list[dict[str, Any]]:
    rng = random.Random(sweep.seed)
    combinations = itertools.product(*sweep.grid.values()) if sweep.grid else [()]
    trials = []
    for combination in combinations:
        for _ in range(sweep.samples or 1):
            values = dict(zip(sweep.grid, combination, strict=True))
            values |= {path: _draw(spread, rng) for path, spread in sweep.random.items()}
            trials.append(values)
    return trials


def load_sweep_text(text: str) -> Sweep:
    """The sweep in a spec's text, expanded and every trial validated; a SpecError naming
    what is wrong (a trial's problems with the values that caused them)."""
    document = read_spec_document(text)
    if not isinstance(document, dict) or not isinstance(document.get("sweep"), dict):
        raise SpecError([("sweep", "a sweep file is a job spec with a `sweep:` section")])
    base = {key: value for key, value in document.items() if key != "sweep"}
    try:
        sweep = SweepSpec.model_validate(document["sweep"])
    except ValidationError as error:
        raise SpecError(validation_problems(error, "sweep.")) from None
    if problems := _problems(sweep, base):
        raise SpecError(problems)
    name = parse_spec(base).name  # the base alone must be a valid spec
    trials = []
    for index, values in enumerate(_trial_values(sweep)):
        child = yaml.safe_load(yaml.safe_dump(base))  # a deep copy, as plain YAML values
        child["name"] = f"{name[:58]}-t{index}"
        for path, value in values.items():
            set_field(child, path, value, "sweep", f"trial {index}")
        child_text = yaml.safe_dump(child, sort_keys=False)
        try:
            spec = parse_spec(child)
        except SpecError as error:
            shown = ", ".join(f"{path}={value}" for path, value in values.items())
            raise SpecError(
                [(f"sweep trial {index} ({shown}): {field}", why) for field, why in error.problems]
            ) from None
        trials.append(Trial(index, values, child_text, spec))
    return Sweep(name, sweep, trials)
