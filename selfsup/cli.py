"""The `selfsup` command line: noun-verb commands over the embedded stack's state folder.

Exit codes: 0 success, 1 the job failed, 2 usage or validation error (or no stack),
3 not found.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines.spec import SpecError
from service.config import StatePaths

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3
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
        print("result:")
        for key, value in sorted(row["result"].items()):
            print(f"  {key:32}{_cell(value)}")


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


def cmd_encoder_list(args: argparse.Namespace) -> int:
    from service.tracking import Tracking

    paths = StatePaths.discover(args.home)
    tracking = Tracking(os.environ.get("MLFLOW_TRACKING_URI") or paths.tracking_uri)
    rows = [
        {
            "name": view.name,
            "version": view.version,
            "aliases": ",".join(view.aliases) or "-",
            "job_id": view.tags.get("selfsup.job_id"),
            "method": view.tags.get("selfsup.method"),
            "linear_top1": view.tags.get("eval.linear.top1"),
            "created": datetime.fromtimestamp(view.created_at_ms / 1000).astimezone(),
            "tags": view.tags,
        }
        for view in tracking.model_versions(args.name)
    ]
    if args.name and not rows:
        raise CliError(f"no registered encoder named {args.name!r}", EXIT_NOT_FOUND)
    _print_rows(
        rows,
        args.output,
        ["name", "version", "aliases", "job_id", "method", "linear_top1", "created"],
    )
    return EXIT_OK


def cmd_encoder_get(args: argparse.Namespace) -> int:
    import mlflow

    paths = StatePaths.discover(args.home)
    uri = _model_uri(args.reference)
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or paths.tracking_uri
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    destination = Path(args.output_dir)
    if destination.exists() and any(destination.iterdir()):
        raise CliError(f"{destination} exists and is not empty: choose a new folder", EXIT_USAGE)
    staging = destination.with_name(destination.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging))
    except Exception as error:  # noqa: BLE001 - any registry failure is reported, not raised
        shutil.rmtree(staging, ignore_errors=True)
        message = getattr(error, "message", str(error))
        raise CliError(f"cannot get {args.reference}: {message}", EXIT_NOT_FOUND) from None
    (staging / "README.md").write_text(_encoder_readme(args.reference, uri))
    if destination.exists():
        destination.rmdir()
    staging.rename(destination)
    print(f"wrote {args.reference} to {destination}")
    return EXIT_OK


def _model_uri(reference: str) -> str:
    """NAME@ALIAS or NAME/VERSION (or a models:/ URI) -> models:/ URI."""
    if reference.startswith("models:/"):
        return reference
    if "@" in reference or "/" in reference:
        return f"models:/{reference}"
    raise CliError(f"{reference!r}: give NAME@ALIAS or NAME/VERSION", EXIT_USAGE)


def _encoder_readme(reference: str, uri: str) -> str:
    return (
        f"# selfsup encoder {reference}\n\n"
        f"Fetched from the model registry as `{uri}`. The encoder is `encoder.json` (its\n"
        "architecture) plus `weights.safetensors` (its tensors), under `data/`; loading runs no\n"
        "pickle.\n\n"
        "```python\n"
        "import selfsup\n"
        "encoder = selfsup.load_encoder('PATH/TO/THIS/FOLDER')  # nn.Module in eval mode\n"
        "features = encoder(images)  # images: float tensor (N, C, H, W) in [0, 1]\n"
        "```\n"
    )


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
    get = add(verbs, "get", cmd_encoder_get, "write an encoder to a folder")
    get.add_argument("reference", help="NAME@ALIAS or NAME/VERSION")
    get.add_argument("-o", "--output-dir", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from service.controller import JobConflict, JobNotFound, StackNotRunning
    from service.stack import StackError
    from service.tracking import TrackingError

    try:
        return args.handler(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.code
    except JobNotFound as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (StackNotRunning, JobConflict, StackError, TrackingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
