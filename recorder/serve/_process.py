"""Child servers (gymtape serve, vLLM) run in their own process group with their output in a log.

Readiness is a condition (``/health`` answers 200), never a fixed delay; stopping sends SIGTERM
to the whole group (a server's own children go too) and SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def log_tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float, *,
                 fail: Callable[[str], Exception], poll: float = 0.25) -> None:
    """Return once ``{url}/health`` answers 200; raise ``fail(reason)`` if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise fail(f"exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        tick.wait(poll)
    raise fail(f"did not answer /health within {timeout:g} s")


def stop_process_group(proc: subprocess.Popen[bytes] | None, grace: float = 60.0) -> int | None:
    """SIGTERM the process's group, SIGKILL it after ``grace`` seconds; the exit code (None: never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode
