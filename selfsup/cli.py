"""The `selfsup` command line: noun-verb commands over the embedded stack's state folder.

Exit codes: 0 success, 1 the job failed, 2 usage or validation error (or no stack),
3 not found, 4 refused (an encoder promotion that would make the alias worse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines.spec import SpecError
from service.config import StatePaths

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_REFUSED = 0, 1, 2, 3, 4
WAIT_POLL_S = 2.0


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ---- output ---------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return value


def _print_rows(rows: list[dict[str, Any]], output: str, columns: Sequence[str]) -> None:
    if output == "json":
        print(json.dumps([{k: _jsonable(v) for k, v in row.items()} for row in rows], indent=2))
        return
    if not rows:
        print("(none)")
        return
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [
        max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)
    ]
    print(
        "  ".join(
            column.upper().ljust(width) for column, width in zip(columns, widths, strict=True)
        )
    )
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _job_row(job: Any) -> dict[str, Any]:
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "owner": job.owner,
        "priority": job.priority,
        "workers": job.spec["resources"]["workers"],
        "attempts": job.attempts,
        "created": job.created_at,
        "started": job.started_at,
        "finished": job.finished_at,
        "message": job.message,
        "mlflow_run_id": job.mlflow_run_id,
        "result": job.result or {},
    }


# ---- commands -------------------------------------------------------------------------------


def _controller(args: argparse.Namespace) -> Any:
    from service.controller import Controller

    return Controller(StatePaths.discover(args.home))


def cmd_up(args: argparse.Namespace) -> int:
    from service import stack

    paths = StatePaths.discover(args.home)
    info = stack.up(paths, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    print(f"selfsup stack up in {paths.root}")
    print(f"  Ray head:   {info.ray_address} ({info.num_cpus:g} CPUs, {info.num_gpus:g} GPUs)")
    print(f"  Ray dashboard / Jobs API: {info.dashboard_url}")
    print(f"  MLflow:     {paths.tracking_uri}")
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    from service import stack

    paths = StatePaths.discover(args.home)
    print("stopped" if stack.down(paths) else f"no stack was running for {paths.root}")
    return EXIT_OK


def cmd_job_submit(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"no such spec file: {path}", EXIT_USAGE)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"cannot read {path}: {error}", EXIT_USAGE) from None
    controller = _controller(args)
    try:
        job = controller.submit(text)
    except SpecError as error:
        raise CliError(f"invalid job spec {path}:\n" + _indent(str(error)), EXIT_USAGE) from None
    controller.tick()
    job = controller.get(job.id)
    if args.output == "json" and not args.wait:
        print(json.dumps({k: _jsonable(v) for k, v in _job_row(job).items()}, indent=2))
        return EXIT_OK
    print(f"submitted {job.id} ({job.name}): {job.state}")
    print(
        f"  MLflow run: {job.mlflow_run_id}  (`selfsup ui`, then "
        f"{controller.tracking.run_url_hint(job.mlflow_run_id)})"
    )
    return _wait(controller, job.id, args.output) if args.wait else EXIT_OK


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def _wait(controller: Any, job_id: str, output: str) -> int:
    """Follow a job to its end, printing progress; exit 0 if it succeeded, else 1."""
    total_epochs = controller.get(job_id).spec["train"]["epochs"]
    last_line = ""
    while True:
        controller.tick()
        job = controller.get(job_id)
        if job.mlflow_run_id and job.state == "RUNNING":
            progress = controller.tracking.progress(job.mlflow_run_id)
            if progress.step is not None:
                epoch = "-" if progress.epoch is None else f"{progress.epoch + 1}/{total_epochs}"
                rate = (
                    f"  {progress.samples_per_sec:.0f} samples/s"
                    if progress.samples_per_sec
                    else ""
                )
                line = f"  epoch {epoch}  step {progress.step}  loss {progress.loss:.4f}{rate}"
                if line != last_line:
                    print(line, flush=True)
                    last_line = line
        if job.state in ("SUCCEEDED", "FAILED", "CANCELLED"):
            break
        time.sleep(WAIT_POLL_S)
    _print_status(job, output)
    return EXIT_OK if job.state == "SUCCEEDED" else EXIT_JOB_FAILED


def _print_status(job: Any, output: str) -> None:
    row = _job_row(job)
    if output == "json":
        print(json.dumps({k: _jsonable(v) for k, v in row.items()}, indent=2))
        return
    for key in (
        "id",
        "name",
        "state",
        "owner",
        "priority",
        "workers",
        "attempts",
        "created",
        "started",
        "finished",
        "message",
        "mlflow_run_id",
    ):
        print(f"{key + ':':15}{_cell(row[key])}")
    if row["result"]:
        _print_result(row["result"])


def _print_result(result: dict[str, Any]) -> None:
    """Evaluation metrics as one compact table; anything else (the model) as lines."""
    from service.results import results_table

    table = results_table(result)
    print("result:")
    for key, value in sorted(result.items()):
        if not (table and key.startswith(("eval.", "baseline."))):
            print(f"  {key + ':':15}{_cell(value)}")
    if table:
        print("\n".join(table))


def cmd_job_list(args: argparse.Namespace) -> int:
    controller = _controller(args)
    controller.tick()
    rows = [_job_row(job) for job in controller.store.list()]
    _print_rows(
        rows, args.output, ["id", "name", "state", "workers", "attempts", "created", "message"]
    )
    return EXIT_OK


def cmd_job_status(args: argparse.Namespace) -> int:
    controller = _controller(args)
    controller.tick()
    _print_status(controller.get(args.job_id), args.output)
    return EXIT_OK


def cmd_job_cancel(args: argparse.Namespace) -> int:
    job = _controller(args).cancel(args.job_id)
    print(f"{job.id}: {job.state}")
    return EXIT_OK


def cmd_job_retry(args: argparse.Namespace) -> int:
    controller = _controller(args)
    job = controller.retry(args.job_id)
    controller.tick()
    print(f"{job.id}: requeued (resumes from its latest checkpoint)")
    return _wait(controller, job.id, args.output) if args.wait else EXIT_OK


def cmd_job_logs(args: argparse.Namespace) -> int:
    controller = _controller(args)
    controller.tick()
    sys.stdout.write(controller.logs(args.job_id))
    return EXIT_OK


def _tracking_uri(args: argparse.Namespace) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or StatePaths.discover(args.home).tracking_uri


def cmd_encoder_list(args: argparse.Namespace) -> int:
    from service.registry import Registry, metric_value
    from service.results import cell, column_title, protocols_in

    views = Registry(_tracking_uri(args)).versions(args.name)
    rows = [
        {
            "name": view.name,
            "version": view.version,
            "aliases": ",".join(view.aliases),
            "method": view.tags.get("selfsup.method"),
            "dataset": view.tags.get("selfsup.dataset"),
            "job_id": view.tags.get("selfsup.job_id"),
            "created": datetime.fromtimestamp(view.created_at_ms / 1000).astimezone(),
            "run_id": view.run_id,
            "model_id": view.model_id,
            "description": view.description,
            "metrics": {k: metric_value(view, k) for k in view.tags if k.startswith("eval.")},
            "tags": view.tags,
        }
        for view in views
    ]
    if args.output == "json":
        _print_rows(rows, "json", [])
        return EXIT_OK
    protocols = protocols_in(key for view in views for key in view.tags)
    for row, view in zip(rows, views, strict=True):
        row.update({column_title(p): cell(view.tags, "eval", p) for p in protocols})
        row["aliases"] = row["aliases"] or "-"
    columns = ["name", "version", "aliases", "method", "dataset", *map(column_title, protocols)]
    _print_rows(rows, "table", [*columns, "job_id", "created"])
    return EXIT_OK


def cmd_encoder_get(args: argparse.Namespace) -> int:
    from pipelines.registry import EXAMPLE_FILE, write_encoder_folder
    from service.registry import Registry, parse_reference
    from workers.export import EncoderLoadError

    tracking = _tracking_uri(args)
    reference = parse_reference(args.reference)
    view = Registry(tracking).resolve(reference)
    destination = Path(args.output_dir)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise CliError(f"{destination} exists and is not empty: choose a new folder", EXIT_USAGE)
    if destination.exists():
        destination.rmdir()
    try:
        write_encoder_folder(reference, view, tracking, destination)
    except EncoderLoadError as error:
        raise CliError(f"cannot get {reference}: {error}", EXIT_USAGE) from None
    print(f"wrote {reference} (version {view.version}) to {destination}")
    print(f"  load it: selfsup.load_encoder({str(destination)!r}); example: {EXAMPLE_FILE}")
    return EXIT_OK


def cmd_encoder_promote(args: argparse.Namespace) -> int:
    from service.registry import Registry

    promotion = Registry(_tracking_uri(args)).promote(
        args.name, args.version, args.alias, args.metric, force=args.force
    )

    def described(version: str | None, value: float | None) -> str:
        if version is None:
            return "nothing"
        return f"version {version} ({promotion.metric} " + (
            "not recorded)" if value is None else f"{value:.4f})"
        )

    print(
        f"{promotion.name}@{promotion.alias} -> "
        f"{described(promotion.version, promotion.value)}, was "
        f"{described(promotion.previous_version, promotion.previous_value)}"
        + (" [forced]" if promotion.forced else "")
    )
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from service.registry import Registry, parse_reference

    tracking_uri = _tracking_uri(args)
    if not Path(args.encoder).expanduser().is_dir():
        # An unknown name, version or alias fails here, before torch and friends load.
        Registry(tracking_uri).resolve(parse_reference(args.encoder))
    from pipelines.eval_run import EvaluationRequestError, evaluate_as_run, open_encoder
    from service.results import results_table
    from service.tracking import Tracking
    from workers.export import EncoderLoadError

    artifacts = (
        None if os.environ.get("MLFLOW_TRACKING_URI") else StatePaths.discover(args.home).artifacts
    )
    protocols = list(dict.fromkeys(args.protocol or ["linear"]))
    try:
        source = open_encoder(args.encoder, tracking_uri)
        run_id, evaluation = evaluate_as_run(
            source,
            Tracking(tracking_uri, artifacts),
            protocols,
            data=args.data,
            test_fraction=args.test_fraction,
            split_seed=args.split_seed,
            baselines=not args.no_baselines,
        )
    except (EncoderLoadError, EvaluationRequestError) as error:
        raise CliError(str(error), EXIT_USAGE) from None
    split = {
        key: evaluation.split[key] for key in ("source", "test_fraction", "split_seed", "digest")
    }
    split |= {
        "train_size": len(evaluation.split["train"]),
        "test_size": len(evaluation.split["test"]),
    }
    if args.output == "json":
        document = {
            "run_id": run_id,
            "encoder": source.label,
            "model_name": source.name,
            "model_version": source.version,
            "protocols": protocols,
            "split": split,
            "metrics": evaluation.metrics,
        }
        print(json.dumps(document, indent=2))
        return EXIT_OK
    print(f"evaluated {source.label} on {split['source']}: MLflow run {run_id}")
    print(
        f"  split: test_fraction {split['test_fraction']}, seed {split['split_seed']}, "
        f"{split['train_size']} train / {split['test_size']} test, digest {split['digest']}"
    )
    print("\n".join(results_table(evaluation.metrics)))
    return EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    paths = StatePaths.discover(args.home)
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "ui",
        "--backend-store-uri",
        paths.tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
    ]
    print("running:", " ".join(command), flush=True)
    os.execv(command[0], command)
    return EXIT_OK  # not reached


# ---- parser ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfsup", description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="state folder (default: $SELFSUP_HOME or ./.selfsup)")
    nouns = parser.add_subparsers(dest="noun", required=True)

    def add(
        sub: Any, name: str, handler: Callable[[argparse.Namespace], int], help_text: str
    ) -> Any:
        command = sub.add_parser(name, help=help_text)
        command.set_defaults(handler=handler)
        return command

    def output(command: Any) -> None:
        command.add_argument("-o", "--output", choices=["table", "json"], default="table")

    up = add(nouns, "up", cmd_up, "start the embedded stack (local Ray head)")
    up.add_argument("--num-cpus", type=float, default=None)
    up.add_argument("--num-gpus", type=float, default=0)
    add(nouns, "down", cmd_down, "stop the embedded stack")
    ui = add(nouns, "ui", cmd_ui, "open the MLflow UI on this state folder's runs")
    ui.add_argument("--port", type=int, default=5000)

    job = nouns.add_parser("job", help="submit and follow pretraining jobs")
    verbs = job.add_subparsers(dest="verb", required=True)
    submit = add(verbs, "submit", cmd_job_submit, "validate and queue a YAML job spec")
    submit.add_argument("file")
    submit.add_argument("--wait", action="store_true", help="follow the job to its end")
    output(submit)
    output(add(verbs, "list", cmd_job_list, "list jobs"))
    for name, handler, text in (
        ("status", cmd_job_status, "show one job"),
        ("cancel", cmd_job_cancel, "cancel a queued or running job"),
        ("retry", cmd_job_retry, "requeue a failed or cancelled job; it resumes"),
        ("logs", cmd_job_logs, "print a job's driver and worker logs"),
    ):
        command = add(verbs, name, handler, text)
        command.add_argument("job_id")
        if name in ("status", "retry"):
            output(command)
        if name == "retry":
            command.add_argument("--wait", action="store_true")

    encoder = nouns.add_parser("encoder", help="registered encoders")
    verbs = encoder.add_subparsers(dest="verb", required=True)
    listing = add(verbs, "list", cmd_encoder_list, "list registered encoder versions")
    listing.add_argument("name", nargs="?")
    output(listing)
    get = add(verbs, "get", cmd_encoder_get, "write an encoder to a self-contained folder")
    get.add_argument("reference", help="NAME@ALIAS or NAME/VERSION")
    get.add_argument("-o", "--output-dir", required=True)
    promote = add(
        verbs, "promote", cmd_encoder_promote, "point an alias at a version if it is not worse"
    )
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--alias", default="champion")
    promote.add_argument(
        "--metric", default="eval.linear.top1", help="compared with the alias's current version"
    )
    promote.add_argument("--force", action="store_true", help="promote even if it is worse")

    evaluate = add(
        nouns, "eval", cmd_eval, "evaluate a registered encoder (or a folder) as its own run"
    )
    evaluate.add_argument("encoder", help="NAME@ALIAS, NAME/VERSION, models:/... or a folder")
    evaluate.add_argument("--data", help="labelled data source (default: the encoder's own)")
    evaluate.add_argument(
        "--protocol",
        action="append",
        choices=["linear", "knn", "semi"],
        help="repeat for several (default: linear)",
    )
    evaluate.add_argument(
        "--test-fraction", type=float, help="default: the split recorded with the encoder"
    )
    evaluate.add_argument("--split-seed", type=int, help="default: as recorded with the encoder")
    evaluate.add_argument("--no-baselines", action="store_true", help="skip raw/random baselines")
    output(evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from service.stack import use_stack_auth

    use_stack_auth(StatePaths.discover(args.home))
    from service.controller import JobConflict, JobNotFound, StackNotRunning
    from service.registry import PromotionRefused, RegistryError, RegistryNotFound
    from service.stack import StackError
    from service.tracking import TrackingError

    try:
        return args.handler(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.code
    except (JobNotFound, RegistryNotFound) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except PromotionRefused as error:
        print(f"refused: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except RegistryError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (StackNotRunning, JobConflict, StackError, TrackingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
