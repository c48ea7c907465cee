"""Two real processes capture into one tape, as two Gym model-server workers do.

A harness sends each continuation to whichever worker is free, so the worker that resolves a
call's parent is often not the one that recorded it. Gym's contract: once ``put`` returns, every
worker's resolver sees the entry. Here every turn of a rollout goes to the other process (the
parent sits in the first process's write-ahead log, not yet in a shard), one process is killed
with SIGKILL right after a put returned, and both write rollouts at once; the tape must then
hold every acknowledged entry, with prompts that rebuild exactly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ROOT
from tests.gym_capture.conftest import require_gym

require_gym()

from nemo_gym.token_id_capture.consumer import trajectories_from_source  # noqa: E402

from recorder import Tape, TapeSource  # noqa: E402
from tests.gym_capture.driver import expected_sequence  # noqa: E402
from trainer_bridge import build_sequences  # noqa: E402


class Worker:
    def __init__(self, tape: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.gym_capture.capture_child", str(tape)], cwd=ROOT, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert self.ask(None) == {"ready": True}

    def ask(self, cmd: dict[str, Any] | None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if cmd is not None:
            self.proc.stdin.write(orjson.dumps(cmd).decode() + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            log = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"worker died with {self.proc.wait()}: {log}")
        return orjson.loads(line)

    def quit(self) -> None:
        self.ask_no_answer({"quit": True})
        assert self.proc.wait(timeout=60) == 0, self.proc.stderr.read() if self.proc.stderr else ""

    def ask_no_answer(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(cmd).decode() + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[[], Worker]]:
    started: list[Worker] = []

    def start() -> Worker:
        started.append(Worker(tmp_path / "tape"))
        return started[-1]

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.kill()


def _check_tape(tape: Path, rollouts: dict[str, tuple[int, int]]) -> None:
    """Every rollout rebuilds to the sampled tokens, from the call rows and through Gym's builder."""
    seqs = {r["rollout_id"]: r for r in build_sequences(tape, include_open=True).to_pylist()}
    source = TapeSource(tape, share=False)
    for rid, (seed, turns) in rollouts.items():
        ids, mask, _ = expected_sequence(seed, turns)
        assert seqs[rid]["input_ids"] == ids and seqs[rid]["loss_mask"] == mask, f"{rid}: rows rebuild other tokens"
        built = asyncio.run(trajectories_from_source(rid, source))
        assert not built["mask_sample"], f"{rid}: {built.get('error') or built['metrics']}"
        item = [i for i in built["rebuilt_response"]["output"] if i.get("generation_token_ids")][-1]
        assert item["prompt_token_ids"] + item["generation_token_ids"] == ids
    asyncio.run(source.close())


def test_each_turn_on_the_other_process_resolves_its_parent_from_the_tape(
        tmp_path: Path, workers: Callable[[], Worker]) -> None:
    a, b = workers(), workers()
    state = None
    for k in range(5):
        state = (a if k % 2 == 0 else b).ask(
            {"rollout": "alternating", "seed": 7, "turns": 5, "first": k, "last": k + 1, "state": state})["state"]
    # driver.run_rollout asserted every continuation RESOLVED (not UNRESOLVED) in the other process
    a.quit()
    b.quit()
    _check_tape(tmp_path / "tape", {"alternating": (7, 5)})
    calls = sorted(Tape(tmp_path / "tape").read("calls").to_pylist(), key=lambda c: c["call_index"])
    assert all(c["prefix_len"] > 0 for c in calls[1:]), "a call after another process's call was stored whole"


def test_an_entry_acknowledged_before_a_sigkill_is_there_for_the_next_worker(
        tmp_path: Path, workers: Callable[[], Worker]) -> None:
    a = workers()
    state = a.ask({"rollout": "killed", "seed": 11, "turns": 3, "first": 0, "last": 2, "state": None})["state"]
    a.kill()  # its log segment is left unsealed, its lock released
    b = workers()
    b.ask({"rollout": "killed", "seed": 11, "turns": 3, "first": 2, "last": 3, "state": state})
    b.quit()
    _check_tape(tmp_path / "tape", {"killed": (11, 3)})


def test_two_processes_capturing_at_once_lose_and_mix_nothing(tmp_path: Path, workers: Callable[[], Worker]) -> None:
    a, b = workers(), workers()
    for w, prefix, seed in ((a, "a", 100), (b, "b", 200)):
        w.ask_no_answer({"many": prefix, "count": 6, "seed": seed, "turns": 3})
    assert a.ask(None) == {"done": 6} and b.ask(None) == {"done": 6}
    a.quit()
    b.quit()
    _check_tape(tmp_path / "tape", {f"{p}-{n}": (s + n, 3) for p, s in (("a", 100), ("b", 200)) for n in range(6)})
