"""Compaction while a writer appends (a second process) and readers read: every row once, none lost."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from recorder import Tape, TapeStorage, TapeWriter, compact_tape
from tests.conftest import wait_until
from tests.servers import ROOT
from tests.tape.factories import ids, write_rollouts
from trainer_bridge import FollowerTimeout, TapeFollower

ROLLOUTS = 400  # the writer child flushes every 2 rollouts: 400 shards while compaction runs


def _writer(tape: Path, writer_id: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.recorder.writer_child", str(tape), "run", writer_id,
                             str(count)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class _Loop(threading.Thread):
    """Call ``step`` until stopped; an exception stops the loop and is raised again by ``stop``."""

    def __init__(self, step: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.step, self.runs, self.error = step, 0, None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self.step()
                self.runs += 1
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e

    def stop(self) -> None:
        self._halt.set()
        self.join(120)
        if self.error is not None:
            raise self.error


class _ExactlyOnceReader:
    """Reads both tables again and again; every read holds each row once and every row any
    earlier read held (a compaction neither doubles nor hides rows)."""

    def __init__(self, tape: Path | str) -> None:
        self.tape = tape
        self.seen: dict[str, set[str]] = {"calls": set(), "rollouts": set()}
        self.reads = 0  # reads of a tape holding rows

    def __call__(self) -> None:
        if not TapeStorage(self.tape).exists("tape.json"):
            return
        t = Tape(self.tape)
        for table in ("rollouts", "calls"):
            got = ids(t.read(table, ["call_id"] if table == "calls" else ["rollout_id"]))
            assert len(got) == len(set(got)), f"a read of {table} returned a row twice"
            missing = self.seen[table] - set(got)
            assert not missing, f"a read of {table} lost {len(missing)} row(s) an earlier read had"
            self.seen[table] = set(got)
        self.reads += bool(self.seen["rollouts"])


def _expected(writer_id: str, count: int) -> tuple[list[str], list[str]]:
    return (sorted(f"{writer_id}-r{r}-{k}" for r in range(count) for k in range(2)),
            sorted(f"{writer_id}-r{r}" for r in range(count)))


def test_compaction_beside_a_writer_process_and_a_reader_keeps_every_row_exactly_once(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    child = _writer(tape, "live", ROLLOUTS)
    check = _ExactlyOnceReader(tape)
    reader = _Loop(check)
    reader.start()
    merged = 0  # compactions that merged shards while the writer wrote
    try:
        wait_until(lambda: (tape / "tape.json").exists() or child.poll() is not None, 60, "the writer to start")
        while child.poll() is None:
            merged += compact_tape(tape).shards_in > 0
        reads_while_writing = check.reads
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0 and "DONE" in out, err
        wait_until(lambda: check.reads > reads_while_writing or reader.error is not None, 120, "one more read")
    finally:
        if child.poll() is None:
            child.kill()
        reader.stop()
    assert merged >= 2 and reads_while_writing >= 2, "compactions and reads must have overlapped the writer"
    compact_tape(tape)
    t = Tape(tape)
    calls, rollouts = _expected("live", ROLLOUTS)
    assert sorted(ids(t.read("calls", ["call_id"]))) == calls, "no call lost or doubled"
    assert sorted(ids(t.read("rollouts", ["rollout_id"]))) == rollouts, "no rollout lost or doubled"
    assert len(t.shards("calls")) == 1 and not t.listing("calls").superseded
    assert len(t.prompts()) == 2 * ROLLOUTS, "every prompt rebuilds after many compactions"


def test_a_follower_beside_compaction_uses_every_rollout_once_with_all_its_calls(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    child = _writer(tape, "live", ROLLOUTS // 2)
    follower = TapeFollower(tape, max_staleness=10**6, groups_per_batch=1, group_size=1, poll_interval=0.01)
    used: dict[str, list[int]] = {}

    def step() -> None:
        try:
            batch = follower.next_batch(trainer_version=0, timeout=0.2)
        except FollowerTimeout:
            return
        for rid, seq in zip(batch.table["rollout_id"].to_pylist(), batch.table["input_ids"].to_pylist()):
            assert rid not in used, f"rollout {rid} was used twice"
            used[rid] = seq

    loop = _Loop(step)
    loop.start()
    try:
        wait_until(lambda: (tape / "tape.json").exists() or child.poll() is not None, 60, "the writer to start")
        while child.poll() is None:
            compact_tape(tape)
        assert child.wait(60) == 0
        compact_tape(tape)
        wait_until(lambda: len(used) >= ROLLOUTS // 2 or loop.error is not None, 120, "the follower to use every rollout")
    finally:
        if child.poll() is None:
            child.kill()
        loop.stop()
    quiet = TapeFollower(tape, max_staleness=10**6, groups_per_batch=ROLLOUTS // 2, group_size=1)
    reference = quiet.next_batch(trainer_version=0, timeout=30).table
    assert used == dict(zip(reference["rollout_id"].to_pylist(), reference["input_ids"].to_pylist())), \
        "the follower beside the compactor built the same sequences as one reading the finished tape"


@pytest.mark.usefixtures("s3_server")
def test_compaction_on_object_storage_beside_a_writer_and_a_reader(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/live"
    TapeWriter(url, writer_id="first").close()  # creates tape.json before the threads start
    writer = threading.Thread(target=write_rollouts, args=(url, "live", range(30)), daemon=True)
    check = _ExactlyOnceReader(url)
    reader = _Loop(check)
    writer.start()
    reader.start()
    compactions = 0
    try:
        while writer.is_alive():
            compact_tape(url)
            compactions += 1
        writer.join()
        wait_until(lambda: check.reads >= 2 or reader.error is not None, 120, "the reader to read")
    finally:
        writer.join(120)
        reader.stop()
    compact_tape(url)
    calls, rollouts = _expected("live", 30)
    t = Tape(url)
    assert compactions >= 1
    assert sorted(ids(t.read("calls", ["call_id"]))) == calls
    assert sorted(ids(t.read("rollouts", ["rollout_id"]))) == rollouts
    assert [len(t.shards(x)) for x in ("calls", "rollouts")] == [1, 1]
