"""Child servers (gymtape serve, vLLM) run in their own process group with their output in a log.

Readiness is a condition (``/health`` answers 200), never a fixed delay; stopping sends SIGTERM
to the whole group (a server's own children go too) and SIGKILL after a grace period.
:class:`ServeProcess` is `gymtape serve` for a :class:`~recorder.ServeConfig`, as a child.
"""

from __future__ import annotations

import os
import signal
import site
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import httpx
import orjson

from .._errors import ServeProcessError
from ._config import ServeConfig
from ._entry import API_KEY_ENV


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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """`gymtape serve` for a :class:`~recorder.ServeConfig`, as a child process.

    The config reaches the child as a file beside the log (``serve.json`` for ``serve.log``; also
    the run's record of what was served), read by ``python -m recorder.serve --config FILE``: the same entry point
    as `gymtape serve`, so every field arrives as set. The child runs in its own process group
    with stdout and stderr in ``log``; ``port=0`` picks a free port. Construction starts it;
    :meth:`wait_ready` waits for ``/health``; :meth:`stop` (also on leaving a ``with`` block)
    sends SIGTERM to the group and SIGKILL after a grace period. An api_key goes to the child in
    ``GYMTAPE_API_KEY``, never into the file.
    """

    def __init__(self, config: ServeConfig, *, log: Path, env: Mapping[str, str] | None = None) -> None:
        self.config = replace(config, port=config.port or free_port())
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::", "") else self.config.host
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.config.port}"
        self.log = Path(log)
        self.config_path = self.log.with_suffix(".json" if self.log.suffix != ".json" else ".config.json")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # written before the child that reads it starts: no reader can see it half-written
        self.config_path.write_bytes(orjson.dumps({**self.config.to_dict(), "api_key": None},
                                                  option=orjson.OPT_INDENT_2))
        child_env = {**os.environ, **(env or {})}
        if self.config.api_key:
            child_env[API_KEY_ENV] = self.config.api_key
        else:
            child_env.pop(API_KEY_ENV, None)
        pythonpath = _code_path()
        if pythonpath is not None:
            child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, child_env.get("PYTHONPATH")]))
        # -P: the child's working directory (the caller's) must not shadow the recorder it runs
        args = [sys.executable, "-P", "-m", "recorder.serve", "--config", str(self.config_path)]
        with open(self.log, "wb") as f:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env=child_env)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 3000) -> str:
        return log_tail(self.log, n)

    def wait_ready(self, timeout: float = 300.0) -> ServeProcess:
        """Return once ``/health`` answers 200; if the child exits or time runs out, stop it and raise."""
        def fail(reason: str) -> ServeProcessError:
            self.stop()
            return ServeProcessError(f"gymtape serve {reason}; its log ({self.log}):\n{self.log_tail()}")

        wait_healthy(self.proc, self.url, timeout, fail=fail)
        return self

    def check_alive(self) -> None:
        """Raise if the child has exited (with its exit code and the end of its log)."""
        if self.proc.poll() is not None:
            raise ServeProcessError(f"gymtape serve died (exit {self.proc.returncode}); its log ({self.log}):\n"
                                    f"{self.log_tail()}")

    def load_weights(self, path: Path, *, version: int | None = None, timeout: float = 600.0) -> int:
        """POST ``/admin/weights``: load a ``save_pretrained`` directory; returns the new policy version."""
        self.check_alive()
        body: dict[str, object] = {"path": str(path)}
        if version is not None:
            body["version"] = version
        headers = {"authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        try:
            r = httpx.post(f"{self.url}/admin/weights", json=body, headers=headers, timeout=timeout)
        except httpx.HTTPError as e:
            raise ServeProcessError(f"/admin/weights at {self.url} failed: {type(e).__name__}: {e}; "
                                    f"its log ({self.log}):\n{self.log_tail()}") from e
        if r.status_code != 200:
            raise ServeProcessError(f"/admin/weights answered {r.status_code}: {r.text[:500]}")
        return int(r.json()["policy_version"])

    def stop(self, grace: float = 60.0) -> int | None:
        """SIGTERM the child's group, SIGKILL after ``grace`` seconds; its exit code."""
        return stop_process_group(self.proc, grace)


def _code_path() -> str | None:
    """The folder holding the ``recorder`` package this process runs, when a child started with
    ``-P`` would not find it there by itself (a checkout, not an installed copy)."""
    root = Path(__file__).resolve().parents[2]
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return None if root in installed else str(root)
