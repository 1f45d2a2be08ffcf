"""`selfsup server`: the controller alone, as an HTTP server, against a given Ray cluster, job
store and MLflow (see service/settings.py for the settings and their environment variables).

    python -m service.server --config server.yaml

Two kinds of process. This one runs the controller's loop: a turn every ``tick_s`` admits,
follows Ray, makes MLflow runs and writes to the store why each queued job waits. Beside it,
``api_processes`` processes (unset: one on SQLite, two on PostgreSQL) serve the HTTP API on
the socket this one listens on, each in an interpreter of its own: a burst of requests never
waits for the loop's Python work, nor the loop for the requests. They share nothing but the
store (and Ray and MLflow). An API process ends with this one, however it ends, and one that
dies is started again at the next turn.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from multiprocessing.process import BaseProcess

from service.settings import ServerSettings, SettingsError, load_settings

log = logging.getLogger("selfsup.controller")
_PR_SET_PDEATHSIG = 1  # prctl(2)
_STOP_TIMEOUT_S = 20.0


def _end_with(parent: int) -> None:
    """Have the kernel send this process SIGTERM when ``parent`` dies, even by SIGKILL, so that
    no API is left serving without the loop (Linux; elsewhere the process outlives it)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request above
        os._exit(0)


def serve_api(settings: ServerSettings, listener: socket.socket, parent: int) -> None:
    """One API process: the FastAPI app on ``listener`` until SIGTERM."""
    _end_with(parent)
    import uvicorn

    from service.api import create_app
    from service.controller import Controller

    config = uvicorn.Config(create_app(Controller(settings)), log_level="warning")
    uvicorn.Server(config).run(sockets=[listener])


def _start_api(settings: ServerSettings, listener: socket.socket) -> BaseProcess:
    # spawn, not fork: the loop's threads, sockets and SQLite connections stay in this process.
    # The target by its module's name, also when this file runs as __main__.
    from service.server import serve_api as target

    process = multiprocessing.get_context("spawn").Process(
        target=target, args=(settings, listener, os.getpid()), name="selfsup-api", daemon=True
    )
    process.start()
    return process


def serve(config_file: str | None) -> int:
    try:
        settings = load_settings(config_file)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if settings.ray_token_file:
        # Ray reads its auth settings when first imported: before the controller imports it;
        # the API processes inherit them.
        os.environ.update(
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": settings.ray_token_file}
        )
    from service.controller import Controller

    controller = Controller(settings)  # upgrades the store before an API process opens it
    try:
        listener = socket.create_server((settings.host, settings.port), backlog=2048)
    except OSError as error:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {error}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    api = [_start_api(settings, listener) for _ in range(settings.api_process_count)]
    print(f"selfsup controller on http://{settings.host}:{settings.port}", flush=True)
    while not stop.is_set():
        try:
            controller.tick()
        except Exception:  # noqa: BLE001 - one bad turn must not end the controller
            log.exception("controller turn failed; trying again")
        for index, process in enumerate(api):
            if not process.is_alive() and not stop.is_set():
                log.warning(
                    "API process %s exited (%s); starting another", process.pid, process.exitcode
                )
                api[index] = _start_api(settings, listener)
        stop.wait(settings.tick_s)
    for process in api:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()  # uvicorn ends the requests in flight, then exits
    for process in api:
        process.join(_STOP_TIMEOUT_S)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfsup server", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="settings file (default: $SELFSUP_CONFIG)")
    return serve(parser.parse_args(argv).config)


if __name__ == "__main__":
    sys.exit(main())
