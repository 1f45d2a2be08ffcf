"""The `selfsup` command line: noun-verb commands. Job commands go to the controller's HTTP API
with a bearer token; encoder commands read MLflow's Model Registry.

Exit codes: 0 success, 1 the job failed, 2 usage or validation error (or no controller),
3 not found or forbidden (a missing, wrong or other user's token too), 4 refused (an encoder
promotion that would make the alias worse).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from service.client import ApiClient, ApiError
from service.config import StatePaths

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_REFUSED = 0, 1, 2, 3, 4
WAIT_POLL_S = 1.0
LOG_POLL_S = 1.0
CONTROLLER_RESTART_GRACE_S = 120.0
BAR_WIDTH = 20
FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")
OUTPUTS = ("table", "json", "yaml")
STATE_NOTES = {"STARTING": "handed to Ray", "RUNNING": "waiting for the first training step"}


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ---- output ---------------------------------------------------------------------------------


def _print_document(document: Any, output: str) -> None:
    if output == "yaml":
        print(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), end="")
    else:
        print(json.dumps(document, indent=2, default=str))


def _print_rows(rows: list[dict[str, Any]], output: str, columns: Sequence[str]) -> None:
    if output != "table":
        _print_document([{k: _jsonable(v) for k, v in row.items()} for row in rows], output)
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str) and _ISO_TIME.fullmatch(value):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


_ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d)?")
JOB_FIELDS = (
    "id",
    "name",
    "state",
    "owner",
    "priority",
    "workers",
    "attempts",
    "retries",
    "created",
    "started",
    "finished",
    "waiting",
    "estimated_start",
    "message",
    "mlflow_run_id",
    "run_url",
)


# ---- the controller's API -------------------------------------------------------------------


def _api(args: argparse.Namespace) -> ApiClient:
    return ApiClient.discover(StatePaths.discover(args.home))


def cmd_up(args: argparse.Namespace) -> int:
    from service import stack

    paths = StatePaths.discover(args.home)
    if args.production:
        from service.production import up_production

        info = up_production(paths, args.worker_nodes, args.cpus_per_node)
    else:
        info = stack.up(paths, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    kind = "production stack" if args.production else "stack"
    nodes = f", {len(info.services) - 2} worker nodes" if args.production else ""
    print(f"selfsup {kind} up in {paths.root}")
    print(
        f"  Ray:        {info.ray_address} ({info.num_cpus:g} CPUs, {info.num_gpus:g} GPUs{nodes})"
    )
    print(f"  Ray dashboard / Jobs API: {info.dashboard_url}")
    print(f"  controller: {info.api_url}  (API docs: {info.api_url}/docs)")
    print(f"  your token: {paths.api_token_file} (admin)")
    if args.production:
        from service.settings import load_settings

        settings = load_settings(paths.server_config, env={})
        print(f"  MLflow:     {settings.tracking_uri}  (sign in: `selfsup token create USER`")
        print("              makes USER's account; the token is the password)")
    else:
        print(f"  MLflow:     {paths.tracking_uri}  (`selfsup ui` serves it)")
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    from service import stack

    paths = StatePaths.discover(args.home)
    print("stopped" if stack.down(paths) else f"no stack was running for {paths.root}")
    return EXIT_OK


def cmd_server(args: argparse.Namespace) -> int:
    from service.server import serve

    return serve(args.config)


def _stack_setting(paths: StatePaths, name: str, default: str) -> str:
    """A setting of the state folder's controller (server.yaml, written by `selfsup up`)."""
    if paths.server_config.is_file():
        return (yaml.safe_load(paths.server_config.read_text()) or {}).get(name, default)
    return default


def _store_url(args: argparse.Namespace) -> str:
    paths = StatePaths.discover(args.home)
    explicit = args.store_url or os.environ.get("SELFSUP_STORE_URL")
    return explicit or _stack_setting(paths, "store_url", paths.store_url)


def cmd_token_create(args: argparse.Namespace) -> int:
    from service.auth import ADMIN, USER, check_user, create_token, new_token
    from service.production import use_admin_credentials
    from service.store import JobStore
    from service.tracking import Accounts, TrackingError

    paths = StatePaths.discover(args.home)
    role = ADMIN if args.admin else USER
    try:
        check_user(args.user, role)
    except ValueError as error:
        raise CliError(str(error), EXIT_USAGE) from None
    token = new_token()
    # Where MLflow has accounts (the production stack, a deployment's controller container),
    # the user's account is made first, the token its password; then the token is stored.
    tracking_uri = os.environ.get("SELFSUP_TRACKING_URI") or _stack_setting(
        paths, "tracking_uri", ""
    )
    use_admin_credentials(paths)
    if Accounts.on(tracking_uri):
        try:
            Accounts(tracking_uri).set_password(args.user, token, admin=args.admin)
        except TrackingError as error:
            raise CliError(f"{error}; no token was made", EXIT_REFUSED) from None
    create_token(JobStore(_store_url(args)), args.user, role, token)
    # The token itself is shown once; the store keeps only its hash.
    print(token)
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from service.store import JobStore

    print(f"revoked {JobStore(_store_url(args)).revoke_tokens(args.user)} token(s) of {args.user}")
    return EXIT_OK


def _spec_text(args: argparse.Namespace) -> str:
    """The spec file's text with the command line's ``--set`` assignments over it."""
    from pipelines.spec import SpecError, apply_overrides

    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"no such spec file: {path}", EXIT_USAGE)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"cannot read {path}: {error}", EXIT_USAGE) from None
    try:
        return apply_overrides(text, args.set or [])
    except SpecError as error:
        raise CliError(f"invalid job spec {path}:\n" + _indent(str(error)), EXIT_USAGE) from None


def _post_spec(
    args: argparse.Namespace, path: str, text: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """POST a spec's text to the controller; its refusal (422) as a usage error naming the
    file and each problem."""
    try:
        return _api(args).request("POST", path, {"spec": text}, headers=headers)
    except ApiError as error:
        if error.status == 422:
            message = f"invalid job spec {args.file}:\n" + _indent(str(error))
            raise CliError(message, EXIT_USAGE) from None
        raise


def cmd_spec_validate(args: argparse.Namespace) -> int:
    checked = _post_spec(args, "/v1/specs/validate", _spec_text(args))
    return _answer(
        checked,
        args.output,
        f"{args.file}: valid ({checked['name']}: {checked['workers']} workers, "
        f"{checked['cpus']:g} CPUs and {checked['gpus']:g} GPUs at once, config hash "
        f"{checked['config_hash']}); nothing was submitted",
    )


def cmd_init(args: argparse.Namespace) -> int:
    from pipelines.spec_template import spec_template

    try:
        text = spec_template(args.method)
    except ValueError as error:
        raise CliError(str(error), EXIT_USAGE) from None
    if args.output_file is None:
        print(text, end="")
        return EXIT_OK
    target = Path(args.output_file)
    try:
        with target.open("x") as handle:  # never over a file the user has
            handle.write(text)
    except FileExistsError:
        raise CliError(f"{target} exists: choose another file name", EXIT_USAGE) from None
    except OSError as error:
        raise CliError(f"cannot write {target}: {error}", EXIT_USAGE) from None
    print(f"wrote {target}: check it with `selfsup spec validate {target}`")
    return EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    from selfsup.completion import bash_script

    print(bash_script(_parser()), end="")
    return EXIT_OK


def cmd_job_submit(args: argparse.Namespace) -> int:
    text = _spec_text(args)
    # One key per invocation unless the user gives theirs: the client's own retries of this
    # POST can then never queue the job twice.
    key = args.idempotency_key or uuid.uuid4().hex
    job = _post_spec(args, "/v1/jobs", text, headers={"Idempotency-Key": key})
    api = _api(args)
    if args.output != "table" and not args.wait:
        _print_document(job, args.output)
        return EXIT_OK
    print(f"submitted {job['id']} ({job['name']}): {job['state']}")
    if args.wait:
        return _wait(api, job["id"], args.output)
    # The controller's loop makes the run within a turn of the submit.
    later = f"see `selfsup job status {job['id']}` in a moment"
    print(f"  MLflow run: {_run_link(job) or later}")
    return EXIT_OK


def _run_link(job: dict[str, Any]) -> str | None:
    return job.get("run_url") or job.get("mlflow_run_id")


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def _progress_line(job: dict[str, Any]) -> str:
    """A bar over the epochs, then epoch, step, loss and throughput."""
    progress, epochs = job.get("progress") or {}, job["epochs"]
    if progress.get("step") is None:
        state = job["state"]
        note = job.get("waiting") or job.get("message") or STATE_NOTES.get(state, "")
        return f"  {state}: {note}"
    epoch = progress["epoch"] + 1 if progress.get("epoch") is not None else 0
    filled = round(BAR_WIDTH * epoch / max(epochs, 1))
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    rate = progress.get("samples_per_sec")
    return (
        f"  [{bar}] epoch {epoch}/{epochs}  step {progress['step']}  "
        f"loss {progress['loss']:.4f}" + (f"  {rate:.0f} samples/s" if rate else "")
    )


def _poll(api: ApiClient, path: str, query: dict[str, Any] | None = None) -> Any:
    """A GET for a follow loop: a controller that restarts meanwhile (same address) is waited
    for instead of ending the loop; jobs keep running in Ray while it is away."""
    deadline = time.monotonic() + CONTROLLER_RESTART_GRACE_S
    while True:
        try:
            return api.request("GET", path, query=query)
        except ApiError as error:
            if error.status != 0 or time.monotonic() > deadline:
                raise
            time.sleep(WAIT_POLL_S)


def _wait(api: ApiClient, job_id: str, output: str) -> int:
    """Follow a job to its end with a live progress line; exit 0 if it succeeded, else 1."""
    live = sys.stdout.isatty()
    last, run_shown = "", False
    while True:
        job = _poll(api, f"/v1/jobs/{job_id}")
        if not run_shown and (run := _run_link(job)):
            print(("\r\033[K" if live else "") + f"  MLflow run: {run}", flush=True)
            run_shown, last = True, ""
        line = _progress_line(job)
        if line != last:
            # On a terminal the bar redraws in place; in a log each change is its own line.
            print(("\r\033[K" + line) if live else line, end="" if live else "\n", flush=True)
            last = line
        if job["state"] in FINAL_STATES:
            break
        time.sleep(WAIT_POLL_S)
    if live:
        print()
    _print_status(job, output)
    return EXIT_OK if job["state"] == "SUCCEEDED" else EXIT_JOB_FAILED


def _print_status(job: dict[str, Any], output: str) -> None:
    if output != "table":
        _print_document(job, output)
        return
    for key in JOB_FIELDS:
        if key in job:
            print(f"{key + ':':15}{_cell(job[key])}")
    if job.get("progress"):
        print(f"{'progress:':15}{_progress_line(job).strip()}")
    if job.get("result"):
        _print_result(job["result"])


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


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def since_time(text: str, now: datetime) -> datetime:
    """`--since`: a duration back from ``now`` (90s, 30m, 6h, 2d, 1w) or an ISO date or time
    (UTC unless it says otherwise)."""
    if match := _DURATION.fullmatch(text.strip()):
        return now - timedelta(seconds=float(match[1]) * _SECONDS[match[2]])
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(
            f"--since {text!r}: give a duration (30m, 6h, 2d) or an ISO date (2026-12-01)",
            EXIT_USAGE,
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def cmd_job_list(args: argparse.Namespace) -> int:
    query: dict[str, Any] = {"all": str(args.all).lower()}
    if args.state:
        query["state"] = args.state
    if args.name:
        query["name"] = args.name
    if args.since:
        query["since"] = since_time(args.since, datetime.now(UTC)).isoformat()
    jobs = _api(args).request("GET", "/v1/jobs", query=query)
    columns = ["id", "name", "state", "owner", "priority", "workers", "attempts", "created"]
    _print_rows(jobs, args.output, [*columns, "message"])
    return EXIT_OK


def cmd_job_status(args: argparse.Namespace) -> int:
    _print_status(_api(args).request("GET", f"/v1/jobs/{args.job_id}"), args.output)
    return EXIT_OK


def _answer(document: dict[str, Any], output: str, line: str) -> int:
    """The document as JSON or YAML, or else one line saying what happened."""
    if output != "table":
        _print_document(document, output)
    else:
        print(line)
    return EXIT_OK


def cmd_job_cancel(args: argparse.Namespace) -> int:
    job = _api(args).request("POST", f"/v1/jobs/{args.job_id}/cancel")
    return _answer(
        job, args.output, f"{job['id']}: {job['state']} (checkpoints and MLflow run kept)"
    )


def cmd_job_retry(args: argparse.Namespace) -> int:
    api = _api(args)
    job = api.request("POST", f"/v1/jobs/{args.job_id}/retry")
    if args.output != "table" and not args.wait:
        _print_document(job, args.output)
        return EXIT_OK
    print(f"{job['id']}: requeued (resumes from its latest checkpoint)")
    return _wait(api, job["id"], args.output) if args.wait else EXIT_OK


def cmd_job_logs(args: argparse.Namespace) -> int:
    """The job's Ray logs; with -f, keep printing what is new until the job has ended."""
    api = _api(args)
    offset = 0
    while True:
        chunk = _poll(api, f"/v1/jobs/{args.job_id}/logs", {"offset": offset})
        sys.stdout.write(chunk["text"])
        sys.stdout.flush()
        offset = chunk["offset"]
        if not args.follow or (chunk["state"] in FINAL_STATES and not chunk["text"]):
            return EXIT_OK
        time.sleep(LOG_POLL_S)


def cmd_sweep_submit(args: argparse.Namespace) -> int:
    sweep = _post_spec(args, "/v1/sweeps", _spec_text(args))
    lines = [
        f"submitted {sweep['id']} ({sweep['name']}): {sweep['trial_count']} trials, at most "
        f"{sweep['max_parallel']} at once, ranked by {sweep['metric']} ({sweep['mode']})",
        *(f"  {trial['job_id']}  {_values(trial['values'])}" for trial in sweep["trials"]),
    ]
    return _answer(sweep, args.output, "\n".join(lines))


def _values(values: dict[str, Any]) -> str:
    return " ".join(f"{path}={_cell(value)}" for path, value in values.items())


def cmd_sweep_status(args: argparse.Namespace) -> int:
    sweep = _api(args).request("GET", f"/v1/sweeps/{args.sweep_id}")
    if args.output != "table":
        _print_document(sweep, args.output)
        return EXIT_OK
    print(
        f"{sweep['id']} ({sweep['name']}): {sweep['state']}, {sweep['trial_count']} trials "
        f"ranked by {sweep['metric']} ({sweep['mode']}), at most {sweep['max_parallel']} at once"
    )
    if sweep["message"]:
        print(f"  {sweep['message']}")
    rows = [
        {
            "rank": rank if trial["value"] is not None else None,
            **trial,
            "values": _values(trial["values"]),
        }
        for rank, trial in enumerate(sweep["trials"], start=1)
    ]
    for row in rows:
        row[sweep["metric"]] = row.pop("value")
    _print_rows(rows, "table", ["rank", "job_id", "state", sweep["metric"], "values"])
    return EXIT_OK


def cmd_sweep_list(args: argparse.Namespace) -> int:
    sweeps = _api(args).request("GET", "/v1/sweeps")
    columns = ["id", "name", "state", "owner", "trial_count", "metric", "created", "message"]
    _print_rows(sweeps, args.output, columns)
    return EXIT_OK


def cmd_sweep_cancel(args: argparse.Namespace) -> int:
    sweep = _api(args).request("POST", f"/v1/sweeps/{args.sweep_id}/cancel")
    line = f"{sweep['id']}: {sweep['state']}, and its unfinished trials cancelled"
    return _answer(sweep, args.output, line)


def cmd_queue(args: argparse.Namespace) -> int:
    api = _api(args)
    if args.action in ("pause", "resume"):
        api.request("POST", f"/v1/queue/{args.action}")
    queue = api.request("GET", "/v1/queue")
    if args.output != "table":
        _print_document(queue, args.output)
        return EXIT_OK
    cluster = queue["cluster"]
    print(
        f"queue {'PAUSED' if queue['paused'] else 'admitting'}: {queue['queued']} queued, "
        f"{queue['active']} starting or running on {cluster['cpus']:g} CPUs, "
        f"{cluster['gpus']:g} GPUs"
    )
    return EXIT_OK


def _tracking_uri(args: argparse.Namespace) -> str:
    """MLFLOW_TRACKING_URI, else the state folder's MLflow. On a production stack's machine
    the local user signs in with the token `selfsup up` made them unless
    MLFLOW_TRACKING_USERNAME says who else."""
    paths = StatePaths.discover(args.home)
    chosen = os.environ.get("MLFLOW_TRACKING_URI")
    if chosen:
        return chosen
    chosen = _stack_setting(paths, "tracking_uri", paths.tracking_uri)
    if chosen.startswith("http") and paths.api_token_file.is_file():
        import getpass

        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", getpass.getuser())
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", paths.api_token_file.read_text().strip())
    return chosen


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
        if handler in (cmd_encoder_list, cmd_encoder_get, cmd_encoder_promote, cmd_eval):
            command.set_defaults(handler=_registry_command, registry_handler=handler)
        else:
            command.set_defaults(handler=handler)
        return command

    def overrides(command: Any) -> None:
        command.add_argument(
            "--set",
            action="append",
            metavar="FIELD=VALUE",
            help="override a spec field, e.g. train.lr=1e-3 (repeat; values read as YAML)",
        )

    def output(command: Any) -> None:
        command.add_argument("-o", "--output", choices=OUTPUTS, default="table")

    def spec_file(command: Any) -> Any:
        """A command that reads a spec file, with --set over it, and answers in -o."""
        command.add_argument("file")
        overrides(command)
        output(command)
        return command

    up = add(nouns, "up", cmd_up, "start the embedded stack: Ray head and controller")
    up.add_argument("--num-cpus", type=float, default=None)
    up.add_argument("--num-gpus", type=float, default=0)
    up.add_argument(
        "--production",
        action="store_true",
        help="the deployed shape on this machine: PostgreSQL, S3, MLflow server with auth, "
        "a Ray head and worker nodes",
    )
    up.add_argument("--worker-nodes", type=int, default=3, help="with --production")
    up.add_argument("--cpus-per-node", type=float, default=1, help="with --production")
    add(nouns, "down", cmd_down, "stop the embedded stack")
    ui = add(nouns, "ui", cmd_ui, "open the MLflow UI on this state folder's runs")
    ui.add_argument("--port", type=int, default=5000)
    server = add(nouns, "server", cmd_server, "run the controller alone (see service/settings.py)")
    server.add_argument("--config", help="settings file (default: $SELFSUP_CONFIG)")

    token = nouns.add_parser("token", help="API tokens (written straight to the job store)")
    verbs = token.add_subparsers(dest="verb", required=True)
    create = add(verbs, "create", cmd_token_create, "make a token for USER; printed once")
    create.add_argument("user")
    create.add_argument("--admin", action="store_true", help="may see and change all jobs")
    revoke = add(verbs, "revoke", cmd_token_revoke, "revoke every token of USER")
    revoke.add_argument("user")
    for command in (create, revoke):
        command.add_argument(
            "--store-url", help="default: $SELFSUP_STORE_URL or the state folder's"
        )

    job = nouns.add_parser("job", help="submit and follow pretraining jobs")
    verbs = job.add_subparsers(dest="verb", required=True)
    submit = spec_file(add(verbs, "submit", cmd_job_submit, "validate and queue a YAML job spec"))
    submit.add_argument("--wait", action="store_true", help="follow the job to its end")
    submit.add_argument(
        "--idempotency-key", help="submitting again with the same key returns the same job"
    )
    listing = add(verbs, "list", cmd_job_list, "list your jobs, newest first")
    listing.add_argument("--all", action="store_true", help="everyone's jobs (admins)")
    listing.add_argument(
        "--state", action="append", type=str.upper, help="only jobs in this state (repeat)"
    )
    listing.add_argument("--name", help="only jobs whose name contains this")
    listing.add_argument(
        "--since", help="only jobs created since: a duration (30m, 6h, 2d) or an ISO date"
    )
    output(listing)

    spec = nouns.add_parser("spec", help="job specs")
    spec_verbs = spec.add_subparsers(dest="verb", required=True)
    spec_file(
        add(spec_verbs, "validate", cmd_spec_validate, "run the submit-time checks; store nothing")
    )
    completion = add(nouns, "completion", cmd_completion, "print a shell completion script")
    completion.add_argument("shell", choices=["bash"])
    init = add(nouns, "init", cmd_init, "write a commented job spec for a method")
    init.add_argument("method")
    init.add_argument("-o", "--output-file", help="write here (default: print it)")
    for name, handler, text in (
        ("status", cmd_job_status, "show one job, and why it waits if it does"),
        ("cancel", cmd_job_cancel, "cancel a queued or running job"),
        ("retry", cmd_job_retry, "requeue a failed or cancelled job; it resumes"),
        ("logs", cmd_job_logs, "print a job's driver and worker logs"),
    ):
        command = add(verbs, name, handler, text)
        command.add_argument("job_id")
        if name == "logs":
            command.add_argument("-f", "--follow", action="store_true", help="until it ends")
        else:
            output(command)
        if name == "retry":
            command.add_argument("--wait", action="store_true")

    sweep = nouns.add_parser("sweep", help="sweeps: one spec, many trials, ranked by a metric")
    sweep_verbs = sweep.add_subparsers(dest="verb", required=True)
    spec_file(
        add(sweep_verbs, "submit", cmd_sweep_submit, "queue the trials of a spec with a sweep:")
    )
    output(add(sweep_verbs, "list", cmd_sweep_list, "list your sweeps, newest first"))
    for name, handler, text in (
        ("status", cmd_sweep_status, "a sweep's trials ranked by its metric"),
        ("cancel", cmd_sweep_cancel, "cancel a sweep and its unfinished trials"),
    ):
        command = add(sweep_verbs, name, handler, text)
        command.add_argument("sweep_id")
        output(command)

    queue = add(nouns, "queue", cmd_queue, "show the queue; pause or resume admission (admins)")
    queue.add_argument("action", nargs="?", choices=["status", "pause", "resume"], default="status")
    output(queue)

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


def _registry_command(args: argparse.Namespace) -> int:
    """Encoder and eval commands: MLflow loads only for them (it takes seconds to import),
    and its registry's errors become exit codes."""
    from service.registry import PromotionRefused, RegistryError, RegistryNotFound
    from service.tracking import TrackingError

    try:
        return args.registry_handler(args)
    except RegistryNotFound as error:
        raise CliError(str(error), EXIT_NOT_FOUND) from None
    except PromotionRefused as error:
        raise CliError(f"refused: {error}", EXIT_REFUSED) from None
    except (RegistryError, TrackingError) as error:
        raise CliError(str(error), EXIT_USAGE) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from service.settings import SettingsError
    from service.stack import StackError

    try:
        return args.handler(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.code
    except ApiError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOT_FOUND if error.status in (401, 403, 404) else EXIT_USAGE
    except (StackError, SettingsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
