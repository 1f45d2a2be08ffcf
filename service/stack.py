"""`selfsup up` / `selfsup down`: the embedded stack on one machine.

Two detached process groups: a Ray head (its dashboard serves the Ray Jobs API) and the
controller server on loopback (`python -m service.server`). MLflow and the job store are
SQLite files in the state folder and need no process. Every port is chosen free at start, so
two state folders never collide. `up` starts whatever part is not running, so after the
controller was killed it brings the controller back beside the running Ray head and its jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from service.auth import ADMIN, create_token
from service.config import StackInfo, StatePaths
from service.ports import free_port
from service.postgres import PrivateCluster
from service.settings import ServerSettings
from service.store import JobStore

STARTUP_TIMEOUT_S = 90.0
SHUTDOWN_TIMEOUT_S = 30.0


class StackError(Exception):
    pass


def _controller_port(paths: StatePaths) -> int:
    """The port the controller had before, if free: clients following a job (`--wait`,
    `logs -f`) find a restarted controller at the address they know."""
    if paths.server_config.is_file():
        earlier = yaml.safe_load(paths.server_config.read_text()) or {}
        return free_port(int(earlier.get("port", 0)))
    return free_port()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def answers(url: str) -> bool:
    """True once ``url`` answers HTTP at all. With Ray's token authentication on, the
    dashboard answers 401 to this anonymous probe; Ray's own job client sends the token."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def ray_auth_env(paths: StatePaths) -> dict[str, str]:
    """Environment that makes a process use the stack's Ray token. The head, and through it
    every driver and worker, runs with it; so must every client that talks to the head."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(paths.ray_token_file)}


def head_env(paths: StatePaths, dashboard_url: str | None = None) -> dict[str, str]:
    """The environment of the stack's processes; the head's is inherited by every driver,
    actor and worker it starts: the stack's token settings, and no RAY_ADDRESS. A process
    that ran ray.init() (or a shell set up for another cluster) exports RAY_ADDRESS, and a
    driver that inherited it would connect to that other cluster instead of this one.

    ``dashboard_url`` becomes RAY_API_SERVER_ADDRESS: Ray's state API, which Ray Train's
    placement-group cleaner calls from inside the cluster, otherwise looks for the cluster in
    /tmp/ray/ray_current_cluster, which names whichever cluster last started with the default
    temp dir. A stale entry there made each call wait for a dead GCS until its timeout,
    adding ~12 s to the end of every job.

    The head also skips Ray's drain on SIGTERM (made for Serve replicas migrating off a
    Kubernetes pod): one node has nowhere to drain to, and after any job the drain waited
    out its whole 30 s before `selfsup down` could finish."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    if dashboard_url:
        env["RAY_API_SERVER_ADDRESS"] = dashboard_url
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    return {**env, **ray_auth_env(paths)}


def write_secret(path: Path, secret: str) -> None:
    """Create ``path`` readable by its owner only; never overwrite one that exists."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secret)


def _ensure_token(paths: StatePaths) -> None:
    # Token authentication stays on, as Ray recommends: the head also listens on the
    # machine's network address, not only on loopback. One token per state folder.
    if not paths.ray_token_file.is_file():
        write_secret(paths.ray_token_file, secrets.token_hex(32))


def running_stack(paths: StatePaths) -> StackInfo | None:
    """The stack recorded in the state folder, if its Ray head is alive and answering."""
    stack = StackInfo.load(paths.stack_file)
    if stack and _alive(stack.head_pid) and answers(f"{stack.dashboard_url}/api/version"):
        return stack
    return None


def _controller_up(stack: StackInfo) -> bool:
    return bool(
        stack.server_pid
        and stack.api_url
        and _alive(stack.server_pid)
        and answers(f"{stack.api_url}/healthz")
    )


def _ensure_admin_token(paths: StatePaths, store_url: str) -> None:
    """The local user's controller token, an admin's: made once, kept in the state folder."""
    if paths.api_token_file.is_file():
        return
    write_secret(paths.api_token_file, create_token(JobStore(store_url), getpass.getuser(), ADMIN))


def up(paths: StatePaths, num_cpus: float | None = None, num_gpus: float = 0) -> StackInfo:
    """Start what is not running of the stack for ``paths``: the Ray head, the controller."""
    stack = running_stack(paths)
    if stack is not None and stack.postgres_port is not None:
        raise StackError(f"the stack in {paths.root} is a production one: `selfsup down` first")
    for folder in (paths.root, paths.logs, paths.runs, paths.artifacts):
        folder.mkdir(parents=True, exist_ok=True)
    if stack is None:
        cpus = num_cpus if num_cpus is not None else float(os.cpu_count() or 1)
        stack = start_ray_head(paths, cpus, num_gpus)
    settings = ServerSettings(
        port=_controller_port(paths),
        store_url=paths.store_url,
        tracking_uri=paths.tracking_uri,
        artifact_root=str(paths.artifacts),
        mlflow_ui_url="http://127.0.0.1:5000",  # where `selfsup ui` serves
        ray_dashboard_url=stack.dashboard_url,
        ray_token_file=str(paths.ray_token_file),
        storage_path=str(paths.runs),
    )
    return start_controller(paths, stack, settings, head_env(paths))


def start_controller(
    paths: StatePaths, stack: StackInfo, settings: ServerSettings, env: dict[str, str]
) -> StackInfo:
    """The controller server beside ``stack``, unless it runs; its settings are saved to the
    state folder's server.yaml and read from there, as a deployment's are."""
    if _controller_up(stack):
        return stack
    settings = settings.model_copy(update={"port": _controller_port(paths)})
    settings.save(paths.server_config)
    _ensure_admin_token(paths, settings.store_url)
    api_url = f"http://127.0.0.1:{settings.port}"
    server = start_detached(
        [sys.executable, "-m", "service.server", "--config", str(paths.server_config)],
        paths,
        "controller",
        f"{api_url}/healthz",
        env,
    )
    stack = dataclasses.replace(stack, api_url=api_url, server_pid=server.pid)
    stack.save(paths.stack_file)
    return stack


def start_detached(
    command: list[str], paths: StatePaths, name: str, ready_url: str, env: dict[str, str]
) -> subprocess.Popen:
    """Start ``command`` in its own session (so it outlives this command and `down` can stop
    its whole group), logging to logs/<name>.log, and wait until ``ready_url`` answers."""
    return wait_ready(spawn_detached(command, paths, name, env), paths, name, ready_url)


def spawn_detached(
    command: list[str], paths: StatePaths, name: str, env: dict[str, str]
) -> subprocess.Popen:
    """``start_detached`` without the wait: for several processes starting side by side."""
    return subprocess.Popen(
        command,
        stdout=(paths.logs / f"{name}.log").open("ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=paths.root,
        env=env,
    )


def wait_ready(
    process: subprocess.Popen, paths: StatePaths, name: str, ready_url: str
) -> subprocess.Popen:
    """``process`` once ``ready_url`` answers; stopped, and a StackError, if it never does."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not answers(ready_url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_group(process.pid)
            raise StackError(f"{name} did not start (see {paths.logs / f'{name}.log'})")
        time.sleep(0.25)
    return process


def start_ray_head(
    paths: StatePaths, num_cpus: float, num_gpus: float, extra_env: dict[str, str] | None = None
) -> StackInfo:
    """A Ray head whose dashboard serves the Jobs API; ``extra_env`` is for its drivers."""
    paths.stack_file.unlink(missing_ok=True)
    _ensure_token(paths)
    gcs_port, dashboard_port = free_port(), free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    command = [
        ray_cli,
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--num-cpus={num_cpus:g}",
        f"--num-gpus={num_gpus:g}",
        "--include-dashboard=true",
        f"--temp-dir={paths.ray_temp_dir}",
    ]
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    env = {**head_env(paths, dashboard_url), **(extra_env or {})}
    head = start_detached(command, paths, "ray-head", f"{dashboard_url}/api/version", env)
    stack = StackInfo(
        ray_address=f"127.0.0.1:{gcs_port}",
        dashboard_url=dashboard_url,
        head_pid=head.pid,
        num_cpus=float(num_cpus),
        num_gpus=float(num_gpus),
    )
    stack.save(paths.stack_file)
    return stack


def stop_group(pid: int) -> None:
    stop_groups([pid])


def stop_groups(pids: list[int]) -> None:
    """Stop the process groups led by ``pids`` side by side. SIGTERM to each leader alone
    lets `ray start` drain and stop its children in order (a few seconds); signalling a
    whole group at once makes it wait for a GCS that is gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def down(paths: StatePaths) -> bool:
    """Stop the controller, then Ray; False if nothing was running. Jobs, runs and models
    stay on disk."""
    stack = StackInfo.load(paths.stack_file)
    if stack is None:
        return False
    if stack.server_pid:
        stop_group(stack.server_pid)
    # Worker nodes before the head (they would wait for its GCS), MLflow before S3.
    services = stack.services
    stop_groups([pid for name, pid in services.items() if name.startswith("ray-worker-")])
    stop_group(stack.head_pid)
    stop_groups([pid for name, pid in services.items() if not name.startswith("ray-worker-")])
    if stack.postgres_port is not None:
        # The try-out production stack keeps nothing: its S3 (moto's) lived in memory, and
        # databases naming artifacts that are gone would only mislead the next start.
        PrivateCluster(paths.postgres_root, stack.postgres_port).stop()
        shutil.rmtree(paths.postgres_root, ignore_errors=True)
        paths.server_config.unlink(missing_ok=True)
        paths.api_token_file.unlink(missing_ok=True)
    paths.stack_file.unlink(missing_ok=True)
    return True
