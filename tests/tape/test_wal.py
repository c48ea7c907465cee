"""The write-ahead log: committed rows are durable, visible to fresh readers, and read once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import fill_disk
from recorder import CallRecord, RolloutRecord, Tape, TapeValueError, TapeWriter, TapeWriteError, WriterClosedError
from recorder.tape._layout import FORMAT_VERSION

ROOT = Path(__file__).resolve().parents[2]


def _call(rid: str, k: int, prompt: list[int], gen: list[int], **kw) -> CallRecord:
    return CallRecord(rollout_id=rid, call_index=k, prompt_ids=prompt, generation_ids=gen,
                      generation_logprobs=[-0.25] * len(gen), **kw)


def _segments(tape: Path) -> list[Path]:
    return sorted((tape / "wal").rglob("*.arrows"))


def test_committed_rows_are_visible_to_a_fresh_reader_before_any_shard(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    with TapeWriter(tape, durable=True, flush_seconds=None, handle_signals=False) as w:
        w.add_call(_call("r1", 0, [1, 2, 3], [4, 5]))
        w.add_call(_call("r1", 1, [1, 2, 3, 4, 5, 6], [7]))
        w.add_rollout(RolloutRecord(rollout_id="r1", reward=1.0))
        w.commit()
        assert not list((tape / "calls").glob("*.parquet"))  # nothing sealed yet: the log holds it
        fresh = Tape(tape)
        assert fresh.read("calls").num_rows == 2
        assert fresh.calls().collect().height == 2
        assert fresh.rollouts().collect()["reward"].to_list() == [1.0]
        assert [p.tolist() for p in fresh.prompts().values()] == [[1, 2, 3], [1, 2, 3, 4, 5, 6]]
        assert fresh.log_rows("calls") == 2
    # closed: sealed into shards of the same name, the log is empty, the rows are the same
    assert not _segments(tape)
    after = Tape(tape)
    assert after.read("calls").num_rows == 2 and after.log_rows("calls") == 0
    assert after.meta.format_version == FORMAT_VERSION


def test_a_segment_is_sealed_into_its_shard_when_full_and_rows_are_read_once(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    w = TapeWriter(tape, durable=True, flush_rows=5, flush_seconds=None, handle_signals=False)
    for r in range(7):
        w.add_call(_call(f"r{r}", 0, [r, 1], [2]))
        w.commit()
    shards = list((tape / "calls").glob("*.parquet"))
    assert len(shards) == 1  # the first 5 rows: their segment became this shard
    assert {p.stem for p in _segments(tape)} == {f"{w.writer_id}-000001"}
    ids = Tape(tape).read("calls", ["call_id"])["call_id"].to_pylist()
    assert sorted(ids) == sorted(f"r{r}-0" for r in range(7))
    w.close()
    assert sorted(Tape(tape).read("calls", ["call_id"])["call_id"].to_pylist()) == sorted(ids)


def test_a_torn_last_batch_is_ignored_and_earlier_rows_kept(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    w = TapeWriter(tape, durable=True, flush_seconds=None, handle_signals=False)
    w.add_call(_call("r1", 0, [1, 2], [3]))
    w.commit()
    seg = _segments(tape)[0]
    with open(seg, "ab") as f:  # what a crash in the middle of a write leaves
        f.write(b"\xff\xff\xff\xff\x10\x00\x00\x00garbage")
    assert Tape(tape).read("calls", ["call_id"])["call_id"].to_pylist() == ["r1-0"]
    w.abort()


def test_out_of_range_values_are_refused_at_add_and_later_rows_commit(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    with TapeWriter(tape, durable=True, flush_seconds=None, handle_signals=False) as w:
        for bad in ({"seed": 2**63}, {"top_k": 2**31}, {"policy_version": -(2**63) - 1}, {"seed": 1.5},
                    {"temperature": "hot"}, {"max_tokens": True}):
            with pytest.raises(TapeValueError, match=next(iter(bad))):
                w.add_call(_call("bad", 0, [1], [2], **bad))
        w.add_call(_call("ok", 0, [1], [2], seed=2**63 - 1, top_k=2**31 - 1, policy_version=2**63 - 1))
        w.commit()
    row = Tape(tape).calls().collect().row(0, named=True)
    assert (row["call_id"], row["seed"], row["top_k"]) == ("ok-0", 2**63 - 1, 2**31 - 1)


def test_concurrent_commits_all_land_and_share_fsyncs(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    w = TapeWriter(tape, durable=True, flush_rows=10**6, flush_seconds=None, handle_signals=False)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for r in range(20):
                w.add_call(_call(f"t{t}-r{r}", 0, [t, r], [1, 2]))
                w.commit()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert Tape(tape).read("calls").num_rows == 320
    batches = w._segments["calls"].batches  # one per group commit
    assert sum(b.num_rows for b in batches) == 320
    w.close()
    assert Tape(tape).read("calls").num_rows == 320


def test_sigkill_while_committing_loses_no_acknowledged_row_and_a_new_writer_appends(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    child = subprocess.Popen([sys.executable, "-m", "tests.tape.wal_child", str(tape), "victim", "4"],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    acked: list[str] = []
    try:
        while len(acked) < 400:  # several segments sealed (64 rows each) and several open
            line = child.stdout.readline()
            assert line, "the writer exited before it was killed"
            acked.append(line.strip())
    finally:
        os.kill(child.pid, signal.SIGKILL)
    acked += [line.strip() for line in child.stdout]  # lines written before the kill
    child.wait()
    calls = {a.split()[1] for a in acked if a.startswith("ACK ") and not a.startswith("ACK rollout")}
    rollouts = {a.split()[2] for a in acked if a.startswith("ACK rollout")}
    t = Tape(tape)
    on_tape = t.read("calls", ["call_id"])["call_id"].to_pylist()
    assert len(on_tape) == len(set(on_tape)), "a row was read twice"
    assert calls <= set(on_tape), f"acknowledged calls missing: {sorted(calls - set(on_tape))[:5]}"
    assert rollouts <= set(t.read("rollouts", ["rollout_id"])["rollout_id"].to_pylist())
    t.prompts()  # every delta chain rebuilds
    before = t.read("calls").sort_by("call_id")
    # A new durable writer seals the dead writer's segments and appends after them.
    with TapeWriter(tape, writer_id="next", durable=True, flush_seconds=None, handle_signals=False) as w:
        assert all(p.stem.startswith("next-") for p in _segments(tape))
        w.add_call(_call("new", 0, [1], [2]))
        w.commit()
    after = Tape(tape).read("calls").sort_by("call_id")
    assert after.num_rows == before.num_rows + 1
    assert after.filter(np.array([c != "new-0" for c in after["call_id"].to_pylist()])).equals(before)


def test_commit_after_close_is_refused(tmp_path: Path) -> None:
    w = TapeWriter(tmp_path / "t", durable=True, flush_seconds=None, handle_signals=False)
    w.close()
    with pytest.raises(WriterClosedError):
        w.commit()


def test_a_durable_writer_needs_a_posix_folder() -> None:
    from recorder import StorageError
    with pytest.raises(StorageError):
        TapeWriter("s3://bucket/tape", durable=True)


def test_full_disk_fails_the_commit_discards_its_rows_and_recovers_when_space_returns(small_disk: Path) -> None:
    tape = small_disk / "t"
    w = TapeWriter(tape, durable=True, flush_rows=10**6, flush_seconds=None, handle_signals=False)
    w.add_call(_call("r1", 0, [1, 2, 3], [4]))
    w.commit()
    filler = fill_disk(small_disk)
    big = list(range(200_000))
    w.add_call(_call("r1", 1, [1, 2, 3, 4] + big[:50_000], big[:50_000]))
    with pytest.raises(TapeWriteError, match="No space left"):
        w.commit()
    assert w.last_error and w.write_errors == 1
    assert Tape(tape).read("calls", ["call_id"])["call_id"].to_pylist() == ["r1-0"]  # nothing half-written
    filler.unlink()  # space returns
    w.add_call(_call("r1", 1, [1, 2, 3, 4, 9], [10]))  # the retried call, against r1-0's context
    w.commit()
    assert w.last_error is None
    # read from the log, before any seal: the retried row follows the first one directly
    assert Tape(tape).read("calls", ["call_id"])["call_id"].to_pylist() == ["r1-0", "r1-1"]
    w.close()
    prompts = Tape(tape).prompts()
    assert prompts["r1-1"].tolist() == [1, 2, 3, 4, 9]
