"""The run manifests of a tape (``runs/<writer>.json``): the resolved configuration of each
command that wrote to it, read back by commands that must know how it was recorded (e.g. the
chat template `gymtape serve --chat-template` rendered with, for `gymtape check`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from .._errors import GymtapeError
from ._layout import RUNS_DIR

if TYPE_CHECKING:
    from ._reader import Tape


def run_manifests(tape: Tape) -> dict[str, dict[str, Any]]:
    """``{file name: manifest}`` of every readable run manifest of ``tape``, by name; a manifest
    that cannot be read or is not a JSON object is left out (it is informational)."""
    try:
        names = sorted(e.name for e in tape.storage.list(RUNS_DIR)
                       if e.name.endswith(".json") and not e.name.startswith("."))
    except (OSError, GymtapeError):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            run = orjson.loads(tape.storage.read_bytes(RUNS_DIR, name))
        except (OSError, GymtapeError, orjson.JSONDecodeError):
            continue
        if isinstance(run, dict):
            out[name] = run
    return out
