"""Where a server process starts: `gymtape serve` and ``python -m recorder.serve --config FILE``
(what :class:`~recorder.ServeProcess` runs) both end in :func:`run_server`, so a child started
from a :class:`~recorder.ServeConfig` is the same server a user starts from the command line."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ._config import ServeConfig

#: The api_key travels in the environment, never in a config file (files are saved with runs).
API_KEY_ENV = "GYMTAPE_API_KEY"


def run_server(config: ServeConfig) -> None:
    """Serve until SIGTERM/SIGINT. In-flight requests get 10 s to finish on a stop; then they are
    cancelled and the tape writer is closed (a Gym call with thousands of max_tokens must not
    hold the stop)."""
    import uvicorn

    from ._server import create_app

    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=10)


def main(argv: list[str] | None = None) -> None:
    """``python -m recorder.serve --config FILE``: the server for a ServeConfig file."""
    from .._errors import GymtapeError

    parser = argparse.ArgumentParser(prog="python -m recorder.serve", description=main.__doc__)
    parser.add_argument("--config", type=Path, required=True, help="JSON/YAML file of ServeConfig fields")
    args = parser.parse_args(argv)
    try:
        config = ServeConfig.from_file(args.config)
    except GymtapeError as e:
        parser.exit(2, f"error: {e}\n")
    if config.api_key is None and os.environ.get(API_KEY_ENV):
        config.api_key = os.environ[API_KEY_ENV]
    run_server(config)
