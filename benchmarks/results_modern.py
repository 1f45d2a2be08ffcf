"""Regenerate docs/results-modern.md: BYOL, SimSiam, Barlow Twins, VICReg, DINO and MAE against
SimCLR, each trained for the same CPU budget, then linearly probed.

Two settings: builtin:digits with each method's example spec (examples/<method>-digits.yaml;
small convnet, MAE its vit-tiny on 2x2 patches), and colour 32x32 patches of the bundled
photographs labelled by photograph (builtin:patches, the simclr augmentations, ResNet-18 with
the CIFAR stem; MAE on vit-tiny with 4x4 patches since it needs a ViT). Each method trains in
one process (``benchmarks.contrastive_inprocess``, the train loop's own step) until it has
spent its budget of this process's CPU seconds (``time.process_time()``); its schedules (the
learning rate's cosine, the EMA momentum's) span the epochs that budget was estimated to buy
from a few timed steps. Then the linear probe of ``benchmarks.results_contrastive`` at 1%, 10%
and 100% of the training labels, against raw pixels and randomly initialised encoders of the
same architectures on the same label subsets. Last, the step cost of each method against
SimCLR's, the methods taking turns step by step (``bench_contrastive.interleaved_step_times``).

    .venv/bin/python -m benchmarks.results_modern --budget 150 --budget-resnet 120
    .venv/bin/python -m benchmarks.results_modern --budget 5 --budget-resnet 10 --no-write
    .venv/bin/python -m benchmarks.results_modern --methods dino --parts patches --merge
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Threads that wait for work yield the core instead of spinning: on a shared machine a spinning
# torch thread burns CPU time while its partner is descheduled, which inflated a ResNet step's
# process CPU time 2x under load here. Set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from benchmarks.bench_contrastive import interleaved_step_times, ready_step
from benchmarks.contrastive_inprocess import example_spec, in_process
from benchmarks.results_contrastive import (
    FRACTIONS,
    Row,
    baselines,
    probe,
    random_encoder_row,
    table,
)
from pipelines.protocols import extract_features, label_subset
from pipelines.spec import JobSpec, parse_spec
from workers.data import load_data_section, split_dataset

REFERENCE = "simclr"
METHODS = (REFERENCE, "byol", "simsiam", "barlow_twins", "vicreg", "dino", "mae")
PARTS = ("digits", "patches", "speed")
THREADS = 2
PATCHES = {"size": 32, "count": 2000, "seed": 0, "channels": 3, "labelled": True}
PATCH_BATCH = 64
ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "results-modern.md"
STATE = Path("/tmp/results_modern.json")
COMMAND = ".venv/bin/python -m benchmarks.results_modern"
TRAIN_FIELDS = {"epochs", "warmup_epochs", "batch_size", "optimizer", "lr", "weight_decay"}


def digits_spec(method: str) -> JobSpec:
    return example_spec(method)


def patches_spec(method: str, count: int = PATCHES["count"]) -> JobSpec:
    """The method's digits example moved to colour 32x32 patches: its method parameters,
    optimizer and learning rate; batch 64, the simclr augmentations, ResNet-18 (auto stem:
    CIFAR's at 32x32) or, for MAE, vit-tiny on 4x4 patches. DINO's local crops: half the side
    (the digits example's 4 pixels would be an eighth of a patch)."""
    document = example_spec(method).model_dump(mode="json", exclude_none=True)
    document["data"] = {
        "source": "builtin:patches",
        "test_fraction": 0.25,
        "split_seed": 0,
        "patches": {**PATCHES, "count": count},
    }
    document["augment"] = {"preset": "simclr"}
    vit = method == "mae"
    document["encoder"] = {"arch": "vit-tiny", "patch_size": 4} if vit else {"arch": "resnet18"}
    document["train"]["batch_size"] = PATCH_BATCH
    if method == "dino":
        document["method"]["local_crop_size"] = 0
    return parse_spec(document)


def _with_train(spec: JobSpec, **fields: object) -> JobSpec:
    return spec.model_copy(update={"train": spec.train.model_copy(update=fields)})


def cpu_per_step(step: Callable[[], object], steps: int) -> float:
    """Median CPU seconds of this process per call of ``step``, after one warm-up call."""
    step()
    costs = []
    for _ in range(steps):
        start = time.process_time()
        step()
        costs.append(time.process_time() - start)
    return statistics.median(costs)


def train_within(spec: JobSpec, budget: float, calibration_steps: int) -> tuple[Row, dict]:
    """Train ``spec``'s method until it has spent ``budget`` CPU seconds of this process, then
    probe its frozen encoder. The schedules span the epochs the budget buys at the CPU cost
    of ``calibration_steps`` steps timed first (on a throwaway copy, outside the budget),
    rounded up, so the budget, not the schedule, ends the training (and the learning rate is
    near the end of its cosine); the warm-up keeps the example's fraction of the epochs."""
    probe_run, step = ready_step(spec)
    steps_per_epoch = len(probe_run.loader)
    per_step = cpu_per_step(step, calibration_steps)
    del probe_run, step
    epochs = max(1, math.ceil(budget / per_step / steps_per_epoch))
    warmup = spec.train.warmup_epochs * epochs // spec.train.epochs
    planned = _with_train(spec, epochs=epochs, warmup_epochs=warmup)
    run = in_process(planned)
    horizon = epochs * steps_per_epoch
    wall, cpu = time.perf_counter(), time.process_time()

    def spent() -> bool:
        return time.process_time() - cpu >= budget

    losses, epoch, failure = [], 0, ""
    try:
        while run.training.step < horizon and not spent():
            losses.append(run.train_epoch(epoch, stop=spent))
            epoch += 1
    except FloatingPointError as error:  # diverged: probe the weights of the last good step
        failure = f"; {error}"
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    features = extract_features(run.training.method.encoder(), run.dataset.images)
    steps = run.training.step
    loss = f"loss {losses[0]:.2f} -> {losses[-1]:.2f}" if losses else "no epoch finished"
    budget_text = (
        f"{steps} steps of {spec.train.batch_size} = {steps / steps_per_epoch:.1f} epochs "
        f"(schedule over {epochs}): {cpu:.0f} s CPU, {wall:.0f} s wall; {loss}{failure}"
    )
    stats = {
        "steps": steps,
        "epochs": steps / steps_per_epoch,
        "planned_epochs": epochs,
        "cpu_s": cpu,
        "wall_s": wall,
        "calibrated_cpu_per_step": per_step,
        "spec": {
            "encoder": planned.encoder.model_dump(mode="json", exclude_none=True),
            "method": planned.method.model_dump(mode="json"),
            "train": planned.train.model_dump(mode="json", include=TRAIN_FIELDS),
        },
    }
    return Row(spec.method.name, probe(features, run.dataset, run.split), budget_text), stats


def setting_rows(
    specs: list[JobSpec],
    budget: float,
    calibration_steps: int,
    state: dict,
    fresh: bool,
    saved: Callable[[], None],
) -> None:
    """Baselines (unless already in ``state`` and not ``fresh``) and each spec trained within
    ``budget`` and probed, into ``state`` (rows by name), printed and ``saved`` as they
    come."""
    data = specs[0].data
    dataset = load_data_section(data.model_dump(mode="json"))
    split = split_dataset(dataset, data.test_fraction, data.split_seed)
    rows = state.setdefault("rows", {})
    state["data"] = {
        "train": len(split.train),
        "test": len(split.test),
        "classes": int(dataset.labels.max()) + 1,
        **{
            name: len(label_subset(dataset.labels.numpy()[split.train], fraction, 0))
            for name, fraction in (("one", 0.01), ("ten", 0.1))
        },
    }
    if fresh or "raw pixels" not in rows:
        for row in baselines(specs[0], dataset, split):
            rows[row.encoder] = {"accuracies": row.accuracies, "budget": row.budget}
    for spec in specs:
        name = f"random {spec.encoder.arch}"
        if fresh or name not in rows:
            row = random_encoder_row(spec, dataset, split)
            rows[row.encoder] = {"accuracies": row.accuracies, "budget": row.budget}
    for spec in specs:
        row, stats = train_within(spec, budget, calibration_steps)
        rows[row.encoder] = {"accuracies": row.accuracies, "budget": row.budget, **stats}
        print(row, flush=True)
        saved()


def step_costs(specs: dict[str, JobSpec], steps: int, warmup: int) -> str:
    """Markdown: each spec's median step (wall and CPU seconds) against the reference's, the
    methods taking turns step by step."""
    load_before = os.getloadavg()[0]
    steppers = {name: ready_step(_with_train(spec, epochs=1000))[1] for name, spec in specs.items()}
    times = interleaved_step_times(steppers, steps, warmup)
    reference = times[REFERENCE]
    lines = [
        "| method | encoder | batch | CPU s / step | vs SimCLR (CPU) | wall s / step "
        "| vs SimCLR (wall) | images / CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, spec in specs.items():
        cpu, wall = times[name]["cpu"], times[name]["wall"]
        lines.append(
            f"| {name} | {_arch(spec)} | {spec.train.batch_size} | {cpu:.3f} "
            f"| {cpu / reference['cpu']:.2f}x | {wall:.3f} | {wall / reference['wall']:.2f}x "
            f"| {spec.train.batch_size / cpu:.0f} |"
        )
    lines += [
        "",
        f"Medians of {steps} steps per method after {warmup} warm-up steps; load average "
        f"(1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.",
    ]
    return "\n".join(lines)


def _arch(spec: JobSpec) -> str:
    config = spec.encoder.config(spec.data.depth, spec.data.side)
    extra = f", patch {config['patch_size']}" if "patch_size" in config else ""
    extra += f", {config['stem']} stem" if "stem" in config else ""
    return f"{spec.encoder.arch}{extra}"


def save(state: dict) -> None:
    """The results of every run so far, so that a method re-run alone merges into the rest."""
    STATE.write_text(json.dumps(state, indent=1))


def load_state() -> dict:
    if not STATE.exists():
        return {}
    state = json.loads(STATE.read_text())
    for setting in ("digits", "patches"):
        for row in state.get(setting, {}).get("rows", {}).values():
            row["accuracies"] = {float(k): v for k, v in row["accuracies"].items()}
    return state


def ordered_rows(setting: dict) -> list[Row]:
    """Raw pixels, the random encoders, then the methods in METHODS order."""
    rows = setting["rows"]
    names = ["raw pixels", *sorted(name for name in rows if name.startswith("random "))]
    names += [name for name in METHODS if name in rows]
    return [Row(name, rows[name]["accuracies"], rows[name]["budget"]) for name in names]


def _paired(row: Row, other: Row, fraction: float) -> tuple[float, str]:
    differences = [
        a - b for a, b in zip(row.accuracies[fraction], other.accuracies[fraction], strict=True)
    ]
    mean = 100 * statistics.fmean(differences)
    if len(differences) == 1:
        return mean, f"{mean:+.1f}"
    return mean, f"{mean:+.1f} ± {100 * statistics.stdev(differences):.1f}"


def losses_to_baselines(setting: dict) -> str:
    """Plain statements: where a method's mean accuracy is not above raw pixels, not above a
    random encoder of its own architecture, or (new methods) below SimCLR's."""
    rows = {row.encoder: row for row in ordered_rows(setting)}
    stats = setting["rows"]
    lines = []
    for name in METHODS:
        if name not in rows:
            continue
        row, arch = rows[name], stats[name]["spec"]["encoder"]["arch"]
        comparisons = [
            ("raw pixels", rows["raw pixels"]),
            (f"random {arch}", rows[f"random {arch}"]),
        ]
        if name != REFERENCE and REFERENCE in rows:
            comparisons.append(("SimCLR", rows[REFERENCE]))
        for label, other in comparisons:
            behind = []
            for fraction in FRACTIONS:
                mean, text = _paired(row, other, fraction)
                if mean <= 0:
                    behind.append(f"{100 * fraction:g}% ({text})")
            if behind:
                lines.append(f"- {name} is not above {label} at " + ", ".join(behind) + ".")
    if not lines:
        return "Every trained encoder beats raw pixels, its random encoder and SimCLR."
    return "\n".join(lines)


def spec_lines(setting: dict) -> str:
    lines = []
    for name in METHODS:
        if name in setting["rows"]:
            spec = setting["rows"][name]["spec"]
            encoder = spec["encoder"]
            if not encoder["arch"].startswith("resnet"):
                encoder = {key: value for key, value in encoder.items() if key != "stem"}
            lines.append(
                f"- {name}: `{json.dumps(spec['method'], separators=(',', ':'))}`, "
                f"`{json.dumps(spec['train'], separators=(',', ':'))}`, encoder "
                f"`{json.dumps(encoder, separators=(',', ':'))}`"
            )
    return "\n".join(lines)


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" dirty" if git("status", "--porcelain") else "")


def render(state: dict) -> str:
    runs = "\n".join(
        f"- `{run['command']}`: {run['wall_min']:.0f} min wall, {run['cpu_min']:.0f} min CPU of "
        f"this process; load average (1 min) {run['load_before']:.1f} before, "
        f"{run['load_after']:.1f} after; commit {run['commit']}; ended {run['ended']}"
        for run in state["runs"]
    )
    sections = []
    for setting, title in (
        ("digits", "builtin:digits, small convnet"),
        ("patches", "Colour 32x32 patches, ResNet-18"),
    ):
        if setting not in state:
            continue
        part = state[setting]
        rows = ordered_rows(part)
        sections.append(
            SETTING.format(
                title=title,
                about=ABOUT[setting].format(**part["data"], budget=part["budget"]),
                table=table(rows),
                specs=spec_lines(part),
                losses=losses_to_baselines(part),
                budget=part["budget"],
                **part["data"],
            )
            + NOTES[setting]
        )
    speed = "\n\n".join(
        f"{SPEED_TITLES[name]}\n\n{state['speed'][name]}"
        for name in SPEED_TITLES
        if name in state.get("speed", {})
    )
    return TEMPLATE.format(
        runs=runs,
        command=COMMAND,
        state=STATE,
        threads=THREADS,
        torch=torch.__version__,
        sections="\n".join(sections),
        speed=speed or "(not measured)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--budget", type=float, default=150, help="CPU s per method, digits")
    parser.add_argument(
        "--budget-resnet", type=float, default=120, help="CPU s per method, patches"
    )
    parser.add_argument("--count", type=int, default=PATCHES["count"], help="patches")
    parser.add_argument("--speed-steps", type=int, default=10, help="digits step-cost steps")
    parser.add_argument("--speed-steps-resnet", type=int, default=3)
    parser.add_argument("--merge", action="store_true", help=f"keep other rows of {STATE}")
    parser.add_argument("--no-write", action="store_true", help="print, leave the doc alone")
    parser.add_argument("--render", action="store_true", help=f"only write the doc from {STATE}")
    args = parser.parse_args()
    if args.render:
        DOC.write_text(render(load_state()))
        return

    torch.set_num_threads(THREADS)
    start, start_cpu, load_before = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    code = commit()  # the code this process loaded; HEAD may move while it runs
    state = load_state() if args.merge else {}
    fresh = not args.merge
    for part, budget, make, calibration in (
        ("digits", args.budget, digits_spec, 3),
        ("patches", args.budget_resnet, lambda m: patches_spec(m, args.count), 2),
    ):
        if part in args.parts:
            setting = state.setdefault(part, {})
            setting["budget"] = budget
            specs = [make(method) for method in args.methods]
            setting_rows(
                specs,
                budget,
                calibration,
                setting,
                fresh,
                (lambda: None) if args.no_write else (lambda: save(state)),
            )
            print(table(ordered_rows(setting)), flush=True)
    if "speed" in args.parts:
        speed = state.setdefault("speed", {})
        names = [REFERENCE, *(m for m in args.methods if m != REFERENCE)]
        speed["digits"] = step_costs(
            {m: _with_train(digits_spec(m), batch_size=256) for m in names},
            args.speed_steps,
            warmup=2,
        )
        print(speed["digits"], flush=True)
        speed["patches"] = step_costs(
            {m: patches_spec(m, args.count) for m in names}, args.speed_steps_resnet, warmup=1
        )
        print(speed["patches"], flush=True)
        if not args.no_write:
            save(state)
    command = " ".join(["python -m benchmarks.results_modern", *sys.argv[1:]])
    state.setdefault("runs", []).append(
        {
            "command": command.replace("python", ".venv/bin/python", 1),
            "wall_min": (time.perf_counter() - start) / 60,
            "cpu_min": (time.process_time() - start_cpu) / 60,
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
            "commit": code if commit() == code else f"{code} (HEAD {commit()} at the end)",
            "ended": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    )
    print(state["runs"][-1], flush=True)
    if args.no_write:
        return
    save(state)
    DOC.write_text(render(state))
    print(f"wrote {DOC}")


SPEED_TITLES = {
    "digits": "### builtin:digits, global batch 256 for every method",
    "patches": f"### Colour 32x32 patches, batch {PATCH_BATCH}",
}

ABOUT = {
    "digits": (
        "scikit-learn's 8x8 digits, the spec's fixed stratified split (test_fraction 0.25, "
        "split_seed 0): {train} training images, {test} held out, {classes} classes; 1% = "
        "{one} labels, 10% = {ten}. Each method's example spec (examples/<method>-digits.yaml) "
        "as it is: its method parameters, global batch, optimizer, learning rate and "
        "augmentations (the digits preset), the small convnet (MAE: vit-tiny on 2x2 patches, "
        "a 4x4 grid per digit); only the epochs are set by the budget of **{budget:g} CPU "
        "seconds** per method."
    ),
    "patches": (
        "`builtin:patches` with `size: 32, channels: 3, labelled: true`: colour 32x32 crops of "
        "the seven photographs bundled with scikit-image and scikit-learn, each patch labelled "
        "with its photograph ({classes} classes, chance 1/{classes}), the stratified split "
        "(test_fraction 0.25, split_seed 0): {train} training patches, {test} held out; 1% = "
        "{one} labels, 10% = {ten}. Each method's digits example moved there: its method "
        "parameters, optimizer and learning rate, batch 64, the `simclr` augmentation preset "
        "(random resized crop, flip, colour jitter, random grey, blur), ResNet-18 with the "
        "auto stem (CIFAR's at 32x32: 3x3 convolution, no max-pool), DINO's local crops half "
        "the side (16 pixels). MAE needs a ViT, so it trains vit-tiny on 4x4 patches (an 8x8 "
        "grid) instead: compare it with the random vit-tiny row. Budget: **{budget:g} CPU "
        "seconds** per method."
    ),
}

NOTES = {
    "digits": "",
    "patches": """
How undertrained: at batch 64 a ResNet-18 step at 32x32 costs seconds of CPU here (the step
cost table below), so the budget buys the few dozen steps the table lists, about one pass
over the patches, against the hundreds of epochs these methods are trained for in their
papers. These rows say which method learns anything usable in the first few dozen steps, not
which is best; the random ResNet-18 and raw pixels are the rows to beat. The task is easy from
colour alone in part: `camera` is the only grey photograph (its patches repeat one grey over
the three channels), so that class needs no learned feature at all, and the other
photographs differ in their colour statistics too.
""",
}

SETTING = """## {title}

{about}

Linear probe (`pipelines.protocols.linear_probe_scores`: logistic regression on standardised
frozen features) fitted on stratified label subsets of the training split
(`pipelines.protocols.label_subset`, seeds 0-4; the 100% set is one), top-1 accuracy (%) on
the {test} held-out samples; mean ± std over the 5 subsets, every row on the very same subsets.

{table}

Each method trained **in one process** from the spec below (the spec's global batch on one
worker) for **{budget:g} s of this process's CPU time** (`time.process_time()`), the last
step ending past it. The epochs below are the schedules' span (learning-rate cosine, EMA
momentum), estimated from a few timed steps; the steps actually taken are in the table.

{specs}

Where a method loses (mean of the paired differences over the same label subsets ± their
std, in accuracy points; a difference within about one std is noise):

{losses}
"""

TEMPLATE = """# Six newer methods against SimCLR at equal CPU budgets

Regenerated by `{command}` (runs below) on the 2-core development machine without a GPU,
torch {torch} on {threads} threads, one process. Nothing below is edited by hand except
this file's template in `benchmarks/results_modern.py`.

The budget is **process CPU seconds** (`time.process_time()`, both torch threads counted),
not wall time: other processes (tests, other benchmarks) shared the 2 cores, which stretches
wall time but hardly the CPU time a step takes, so every method gets about the same amount of
computation whatever the load. Hardly, because the script sets `OMP_WAIT_POLICY=PASSIVE`
before torch loads: with OpenMP's default a torch thread that waits for its descheduled
partner spins, and spinning counts as CPU time. Measured before the choice, under load: a
ResNet-18 SimCLR step at batch 64 took 5.3-11.9 CPU s spinning, 5.6-5.9 CPU s passive (wall
5.6-18 s); a digits MAE step 1.0-3.4 against 0.5. Wall times below are upper bounds.

Commands (each run is listed below with its wall and CPU time, the machine's load and the
commit of the code it ran):

```sh
{command} --budget 60 --budget-resnet 120   # everything: both settings, then the step costs
{command} --methods dino --parts patches --merge   # re-run one method, keep the other rows
{command} --render                                 # rewrite this file from {state}
{command} --budget 5 --budget-resnet 10 --no-write # a smoke test
```

Runs behind the figures below:

{runs}

{sections}
## Step cost against SimCLR

All methods in one process, taking turns step by step in a rotating order
(`benchmarks.bench_contrastive.interleaved_step_times`), each on one fixed batch of its spec,
the train loop's step (forward, backward, optimizer, EMA and centre updates); a burst of
other work slows them alike.

{speed}

## Reading (written by hand after the run that ended 2026-12-02 15:45 UTC; not regenerated)

The code of that run is commit d1a068c plus the uncommitted changes of the time; the commits
up to fab3b6b that landed while it ran changed `workers/` only in ways that leave fp32 numbers
as they were (a shared transformer initialisation helper, the losses' float32 promotion under
autocast). Re-read these lines against the tables if the run above is newer.

- Digits, 60 CPU s each: VICReg is best at every label fraction (83.4 / 97.9 / 99.8 against
  SimCLR's 77.3 / 96.5 / 99.6) and Barlow Twins is level with SimCLR. BYOL, SimSiam and DINO
  are above both baselines but below SimCLR at 1% of the labels (BYOL within noise; SimSiam
  by 10 points; DINO by 13: its step costs 2.3x SimCLR's, six views, so it took 179 steps to
  SimCLR's 431). The budget is generous for the small convnet: it bought SimCLR 86 epochs,
  against the 30 of its example.
- MAE loses to every trained method and to raw pixels on digits at every fraction, and is
  not above its own random vit-tiny at 1% or 10%. Its architecture is the first handicap: a
  random vit-tiny on a 4x4 grid of 2x2 patches is 22 points below raw pixels at 1%, where a
  random small convnet is 3 above; its step costs 6.6x SimCLR's at batch 256, so it took 100
  steps (10 epochs). It learns to reconstruct (loss 0.80 -> 0.08) without making the digits
  linearly separable, consistent with the MAE paper's finding that its features need
  fine-tuning more than contrastive ones do.
- Colour patches, ResNet-18, 120 CPU s each: badly undertrained, 13-27 steps of 64 (0.6-1.2
  epochs; the losses are epoch means, so under one epoch first and last are the same number,
  and a second epoch of 1-4 steps is a noisy mean). Raw pixels are a weak baseline here
  (43 / 54 / 57), a random ResNet-18 a much stronger one (53 / 74 / 88). At 10% and 100% of
  the labels every ResNet method beats the random ResNet-18, by 3-9 points (BYOL least,
  VICReg most: 82.8 / 95.0); at 1% none is clearly above it (SimCLR +2.1, VICReg +1.8,
  Barlow Twins +0.6, all within noise) and BYOL, SimSiam and DINO are below it. DINO's step
  costs 2x SimCLR's, so it took 13 steps. None of these figures ranks the methods at
  convergence; they say what a couple of dozen steps do.
- MAE on patches (vit-tiny, 4x4 patches, 138 steps: its step is a sixth of a ResNet-18
  step) is the best row at 1% (57.8) but is not above its random vit-tiny at 1% beyond noise
  and is below it at 10% and 100% (75.0 / 83.8 against 79.0 / 89.2): training made the ViT's
  features worse for a linear probe.
- Part of the patches task is colour alone: `camera` is the only grey photograph, so one of
  the seven classes can be told by colour alone (its three channels are equal), with no
  feature of texture; the others differ in colour statistics as well as texture.
- Step cost against SimCLR: SimSiam costs the same, Barlow Twins and VICReg 1.0-1.25x (their
  512-wide 3-layer projectors; on the ResNet the backbone dominates), BYOL 1.3-1.4x (the
  target network's forward passes), DINO 2-2.3x (two global and four local crops). MAE
  costs 6.6x on digits (12 transformer blocks against a small convnet) and 0.16x of a
  ResNet-18 step on the 32x32 patches.
"""


if __name__ == "__main__":
    main()
