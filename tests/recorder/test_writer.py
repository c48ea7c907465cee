"""TapeWriter: flush triggers, crash safety, signals, concurrent writers, record validation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recorder import CallRecord, RolloutRecord, Tape, TapeValueError, TapeWriter, WriterClosedError
from tests.conftest import ROOT, wait_until


def _call(rid: str, k: int, prompt: int = 8, gen: int = 4) -> CallRecord:
    return CallRecord(rollout_id=rid, call_index=k, prompt_ids=list(range(prompt)), generation_ids=[7] * gen,
                      generation_logprobs=[-0.5] * gen)


def _child(tape: Path, mode: str, writer_id: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.recorder.writer_child", str(tape), mode, writer_id, str(count)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


def _rows(tape: Path, table: str) -> int:
    return Tape(tape).read(table).num_rows


def test_flush_by_row_count(tmp_path: Path) -> None:
    with TapeWriter(tmp_path / "t", flush_rows=3, flush_seconds=None) as w:
        for k in range(7):
            w.add_call(_call("r", k))
        assert len(w.shards) == 2 and _rows(tmp_path / "t", "calls") == 6
    assert _rows(tmp_path / "t", "calls") == 7


def test_flush_by_bytes(tmp_path: Path) -> None:
    with TapeWriter(tmp_path / "t", flush_bytes=10_000, flush_seconds=None) as w:
        w.add_call(_call("r", 0, prompt=100))
        assert not w.shards
        w.add_call(_call("r", 1, prompt=5000))
        assert len(w.shards) == 1


def test_flush_by_time_without_further_writes(tmp_path: Path) -> None:
    w = TapeWriter(tmp_path / "t", flush_seconds=0.05)
    w.add_call(_call("r", 0))
    wait_until(lambda: bool(w.shards), what="the time-triggered flush")
    assert _rows(tmp_path / "t", "calls") == 1
    w.close()


def test_exception_in_with_block_publishes_nothing_buffered(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with TapeWriter(tmp_path / "t", writer_id="w1", flush_seconds=None) as w:
            w.add_call(_call("r", 0))
            raise RuntimeError("boom")
    t = Tape(tmp_path / "t")
    assert t.read("calls").num_rows == 0 and t.writers() == {}, "an aborted run must not look complete"
    with pytest.raises(WriterClosedError):
        w.add_call(_call("r", 1))


def test_close_writes_manifest_and_reused_id_continues_sequence(tmp_path: Path) -> None:
    for k in range(2):
        with TapeWriter(tmp_path / "t", writer_id="same", flush_seconds=None) as w:
            w.add_call(_call(f"r{k}", 0))
    t = Tape(tmp_path / "t")
    assert [s.name for s in t.shards("calls")] == ["same-000000.parquet", "same-000001.parquet"]
    assert t.writers()["same"]["rows"]["calls"] == 1


def test_records_breaking_rules_are_refused_with_the_call_named(tmp_path: Path) -> None:
    with TapeWriter(tmp_path / "t", flush_seconds=None) as w:
        with pytest.raises(TapeValueError, match=r"call r-0: generation_ids has 2 entries but generation_logprobs 1"):
            w.add_call(CallRecord(rollout_id="r", call_index=0, prompt_ids=[1], generation_ids=[1, 2],
                                  generation_logprobs=[0.0]))
        with pytest.raises(TapeValueError, match="outside"):
            w.add_call(CallRecord(rollout_id="r", call_index=0, prompt_ids=[-1], generation_ids=[],
                                  generation_logprobs=[]))
        with pytest.raises(TapeValueError, match="status"):
            w.add_rollout(RolloutRecord(rollout_id="r", status="great"))
        w.add_call(_call("r", 0))  # the refusals left no half-written state behind
    assert _rows(tmp_path / "t", "calls") == 1


def test_rollout_aggregates_are_filled_from_its_calls(tmp_path: Path) -> None:
    with TapeWriter(tmp_path / "t", flush_seconds=None) as w:
        for k, version in enumerate((3, 5)):
            c = _call("r", k, prompt=10 + 20 * k, gen=4)
            c.policy_version = version
            w.add_call(c)
        w.add_rollout(RolloutRecord(rollout_id="r", reward=1.0))
    row = Tape(tmp_path / "t").rollouts().collect().row(0, named=True)
    assert (row["num_calls"], row["prompt_tokens"], row["generation_tokens"]) == (2, 40, 8)
    assert (row["min_policy_version"], row["max_policy_version"], row["token_status"]) == (3, 5, "ok")


@pytest.mark.parametrize("mode", ["pause-publish", "pause-write"])
def test_sigkill_mid_flush_leaves_only_complete_readable_shards(tmp_path: Path, mode: str) -> None:
    tape = tmp_path / "t"
    child = _child(tape, mode, "victim", 20)
    line = child.stdout.readline()
    assert line.startswith("PAUSED "), f"child did not reach the flush: {line!r}"
    tmp = Path(line.split(" ", 1)[1].strip())
    assert tmp.exists() and tmp.name.startswith(".")
    child.kill()
    child.wait()
    t = Tape(tape)
    assert str(tmp.relative_to(tape)) in t.temp_files(), "the interrupted flush left its hidden temporary file"
    calls = t.read("calls")
    rollouts = t.read("rollouts")
    # Flushes 1 and 2 were published whole (2 rollouts, 4 calls each); flush 3 is invisible.
    assert (calls.num_rows, rollouts.num_rows) == (8, 4)
    assert set(rollouts.column("rollout_id").to_pylist()) == {f"victim-r{i}" for i in range(4)}
    assert len(t.prompts()) == 8
    assert t.writers() == {}, "a killed writer has no manifest"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_closes_writer_and_publishes_buffer(tmp_path: Path, sig: signal.Signals) -> None:
    tape = tmp_path / "t"
    child = _child(tape, "wait-signal", "sig", 5)
    assert child.stdout.readline().strip() == "READY"
    assert Tape(tape).read("calls").num_rows == 0
    child.send_signal(sig)
    child.wait(timeout=30)
    assert child.returncode != 0, "the signal still ends the program after the writer closed"
    t = Tape(tape)
    assert (t.read("calls").num_rows, t.read("rollouts").num_rows) == (10, 5)
    assert "sig" in t.writers()


def test_two_writer_processes_share_one_tape(tmp_path: Path) -> None:
    tape = tmp_path / "shared"  # neither process finds tape.json: both race to create it
    children = [_child(tape, "run", f"w{i}", 15) for i in range(2)]
    for c in children:
        out, _ = c.communicate(timeout=120)
        assert c.returncode == 0 and "DONE" in out
    t = Tape(tape)
    ids = t.read("rollouts").column("rollout_id").to_pylist()
    assert sorted(ids) == sorted(f"w{i}-r{r}" for i in range(2) for r in range(15))
    assert t.read("calls").num_rows == 60
    assert set(t.writers()) == {"w0", "w1"}
    assert len(t.prompts()) == 60 and not t.temp_files()


def test_deferred_close_when_signal_lands_inside_a_critical_section(tmp_path: Path) -> None:
    w = TapeWriter(tmp_path / "t", flush_seconds=None, handle_signals=False)
    w.add_call(_call("r", 0))
    with w._critical():
        assert w._close_from_signal() is False and not w.closed
    assert w.closed and _rows(tmp_path / "t", "calls") == 1


def test_import_has_no_side_effects(tmp_path: Path) -> None:
    code = "import recorder, replay, trainer_bridge, cli, signal; assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert list(tmp_path.iterdir()) == []


def test_token_arrays_are_stored_as_int32_and_float32(tmp_path: Path) -> None:
    with TapeWriter(tmp_path / "t", flush_seconds=None) as w:
        w.add_call(CallRecord(rollout_id="r", call_index=0, prompt_ids=np.array([2**31 - 1]), generation_ids=[5],
                              generation_logprobs=[-1e-8]))
    row = Tape(tmp_path / "t").read("calls").to_pylist()[0]
    assert row["prompt_suffix_ids"] == [2**31 - 1]
    assert np.float32(row["generation_logprobs"][0]) == np.float32(-1e-8)


def test_remembered_contexts_stay_under_their_byte_bound_and_every_prompt_still_rebuilds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server's writer never sees its rollouts end (the recorder writes the rollout rows), so
    what it remembers for delta-encoding is bounded in bytes as well as in rollouts. A rollout
    forgotten under that bound stores its next prompt whole: the tape rebuilds every prompt."""
    from recorder.tape import _writer

    bound = 64 * 1024
    monkeypatch.setattr(_writer, "MAX_OPEN_CONTEXT_BYTES", bound)
    rng = np.random.default_rng(0)
    expected: dict[str, np.ndarray] = {}
    context = {f"r{i}": rng.integers(0, 50_000, 2_000, dtype=np.int32) for i in range(20)}  # 8 KB each
    with TapeWriter(tmp_path / "t", flush_seconds=None) as w:
        # Every rollout twice; the second round goes newest first, so the latest are still remembered.
        for k, order in enumerate((list(context), list(context)[::-1])):
            for rid in order:
                ctx = context[rid]
                prompt = np.concatenate([ctx, rng.integers(0, 50_000, 50, dtype=np.int32)])
                gen = rng.integers(0, 50_000, 10, dtype=np.int32)
                call_id = w.add_call(CallRecord(rollout_id=rid, call_index=k, prompt_ids=prompt, generation_ids=gen,
                                                generation_logprobs=np.full(10, -0.5, np.float32)))
                expected[call_id] = prompt
                context[rid] = np.concatenate([prompt, gen])
                assert w._open_bytes <= bound
                assert w._open_bytes == sum(s.context.nbytes for s in w._open.values())
    tape = Tape(tmp_path / "t")
    rebuilt = tape.prompts()
    assert set(rebuilt) == set(expected)
    for call_id, prompt in expected.items():
        np.testing.assert_array_equal(rebuilt[call_id], prompt)
    second = tape.read("calls", ["call_index", "prefix_len"]).to_pylist()
    prefixes = [r["prefix_len"] for r in second if r["call_index"] == 1]
    assert 0 in prefixes and any(p > 0 for p in prefixes)  # some forgotten (stored whole), some delta-encoded
