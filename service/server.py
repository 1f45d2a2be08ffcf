"""`selfsup server`: the controller alone, as an HTTP server, against a given Ray cluster, job
store and MLflow (see service/settings.py for the settings and their environment variables).

    python -m service.server --config server.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from service.settings import SettingsError, load_settings


def serve(config_file: str | None) -> int:
    try:
        settings = load_settings(config_file)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if settings.ray_token_file:
        # Ray reads its auth settings when first imported: before the controller imports it.
        os.environ.update(
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": settings.ray_token_file}
        )
    import uvicorn

    from service.api import create_app
    from service.controller import Controller

    app = create_app(Controller(settings))
    print(f"selfsup controller on http://{settings.host}:{settings.port}", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfsup server", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="settings file (default: $SELFSUP_CONFIG)")
    return serve(parser.parse_args(argv).config)


if __name__ == "__main__":
    sys.exit(main())
