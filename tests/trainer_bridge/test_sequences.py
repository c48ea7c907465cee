"""Sequences (contract C1): multi-turn rollouts with and without history rewrites, checked against
prompts rebuilt independently by the recorder's reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recorder import CallRecord, RolloutRecord, Tape, TapeError, TapeWriter
from trainer_bridge import SEQUENCE_SCHEMA, build_sequences


def _rows(table) -> dict[str, dict]:
    return {r["sequence_id"]: r for r in table.to_pylist()}


def _assert_sequence_holds_its_calls(seq: dict, calls: dict) -> None:
    """Every call of the segment sits inside the sequence exactly: prompt as prefix, generation after it."""
    ids = np.asarray(seq["input_ids"])
    mask = np.asarray(seq["loss_mask"])
    lp = np.asarray(seq["behaviour_logprobs"], dtype=np.float32)
    who = np.asarray(seq["token_call_index"])
    expected_mask = np.zeros(ids.size, dtype=np.int8)
    for k in range(seq["first_call_index"], seq["first_call_index"] + seq["num_calls"]):
        prompt, gen, glp = calls["prompt_ids"][k], calls["generation_ids"][k], calls["generation_logprobs"][k]
        np.testing.assert_array_equal(ids[: prompt.size], prompt)
        span = slice(prompt.size, prompt.size + gen.size)
        np.testing.assert_array_equal(ids[span], gen)
        np.testing.assert_array_equal(lp[span], glp)
        assert (who[span] == k).all()
        expected_mask[span] = 1
    last = seq["first_call_index"] + seq["num_calls"] - 1
    assert ids.size == calls["prompt_ids"][last].size + calls["generation_ids"][last].size
    np.testing.assert_array_equal(mask, expected_mask)
    assert (lp[mask == 0] == 0).all() and (who[mask == 0] == -1).all()
    assert seq["num_generated"] == int(mask.sum())
    assert seq["prompt_len"] == int(np.flatnonzero(mask)[0])


def test_multi_turn_rollouts_without_rewrites_are_one_sequence_each(make_tape) -> None:
    tape_dir, _ = make_tape(repeats=2, calls=4, context_tokens=256)
    tape = Tape(tape_dir)
    table = build_sequences(tape)
    assert table.schema.equals(SEQUENCE_SCHEMA)
    rollouts = {r["rollout_id"]: r for r in tape.read("rollouts").to_pylist()}
    assert table.num_rows == len(rollouts)
    index = tape.calls_by_rollout(("generation_logprobs",))
    for seq in table.to_pylist():
        assert seq["segment"] == 0 and seq["split_reason"] == "start"
        assert seq["sequence_id"] == f"{seq['rollout_id']}/0"
        assert (seq["first_call_index"], seq["num_calls"]) == (0, 4)
        _assert_sequence_holds_its_calls(seq, index.get(seq["rollout_id"]))
        r = rollouts[seq["rollout_id"]]
        assert seq["num_generated"] == r["generation_tokens"]
        for c in ("reward", "group_key", "env", "task_index", "rollout_index", "status"):
            assert seq[c] == r[c]


def test_history_rewrite_starts_a_new_sequence_and_says_why(make_tape) -> None:
    tape_dir, _ = make_tape(repeats=2, calls=4, context_tokens=256, rewrite_every=2)
    tape = Tape(tape_dir)
    table = build_sequences(tape)
    index = tape.calls_by_rollout(("generation_logprobs",))
    by_rollout: dict[str, list[dict]] = {}
    for seq in table.to_pylist():
        by_rollout.setdefault(seq["rollout_id"], []).append(seq)
        _assert_sequence_holds_its_calls(seq, index.get(seq["rollout_id"]))
    split = {rid: s for rid, s in by_rollout.items() if len(s) > 1}
    assert split and len(split) < len(by_rollout)  # every second rollout rewrites its history at call 2
    for rid, segs in split.items():
        assert [s["segment"] for s in segs] == [0, 1]
        assert [s["split_reason"] for s in segs] == ["start", "history_rewrite"]
        assert [(s["first_call_index"], s["num_calls"]) for s in segs] == [(0, 2), (2, 2)]
    gen_tokens = {r["rollout_id"]: r["generation_tokens"] for r in tape.read("rollouts").to_pylist()}
    for rid, segs in by_rollout.items():  # each generated token is trained exactly once
        assert sum(s["num_generated"] for s in segs) == gen_tokens[rid]


def test_sequences_do_not_depend_on_how_the_calls_are_chunked(make_tape) -> None:
    """A read gives one chunk per shard and row group, and filters give sliced chunks (list offsets
    not starting at 0); the planner reads each chunk's values in place, so all must agree."""
    import pyarrow as pa

    from trainer_bridge._sequences import CALL_COLUMNS, ROLLOUT_COLUMNS, sequences_from_tables

    tape_dir, _ = make_tape(repeats=2, calls=4, context_tokens=256, rewrite_every=2)
    tape = Tape(tape_dir)
    calls = tape.read("calls", CALL_COLUMNS).combine_chunks()
    rollouts = tape.read("rollouts", ROLLOUT_COLUMNS)
    whole = sequences_from_tables(calls, rollouts)
    n = calls.num_rows
    cuts = [0, 1, n // 3, n // 3 + 1, n - 2, n]  # chunks of one row, sliced mid-table, one empty
    pieces = [calls.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])] + [calls.slice(n, 0)]
    chunked = pa.Table.from_batches([b for t in pieces for b in t.to_batches()] or calls.to_batches(),
                                    schema=calls.schema)
    assert chunked["prompt_suffix_ids"].num_chunks >= 4
    assert chunked["prompt_suffix_ids"].chunk(2).offsets[0].as_py() > 0  # a slice with a list offset
    assert sequences_from_tables(chunked, rollouts).equals(whole)
    # and in reverse row order (the planner sorts calls itself)
    reverse = pa.Table.from_batches(chunked.to_batches()[::-1], schema=calls.schema)
    assert sequences_from_tables(reverse, rollouts).equals(whole)


def test_rollouts_without_token_ids_give_no_sequence(make_tape) -> None:
    tape_dir, _ = make_tape(repeats=2, calls=3, context_tokens=128, empty_every=3)
    tape = Tape(tape_dir)
    statuses = {r["rollout_id"]: r["token_status"] for r in tape.read("rollouts").to_pylist()}
    assert "empty" in statuses.values()
    got = set(build_sequences(tape)["rollout_id"].to_pylist())
    assert got == {rid for rid, s in statuses.items() if s == "ok"}


def _call(rid: str, k: int, prompt: list[int], gen: list[int], version: int = 0) -> CallRecord:
    return CallRecord(rollout_id=rid, call_index=k, prompt_ids=prompt, generation_ids=gen,
                      generation_logprobs=[-0.1 * (k + 1)] * len(gen), policy_version=version)


def test_chained_rewrites_copy_prefixes_from_earlier_segments(tmp_path: Path) -> None:
    """Two rewrites in one rollout: segment 2's prompt keeps tokens segment 1 itself copied."""
    tape_dir = tmp_path / "tape"
    with TapeWriter(tape_dir, flush_seconds=None, handle_signals=False) as w:
        w.add_call(_call("r", 0, [1, 2, 3], [10, 11], version=3))
        w.add_call(_call("r", 1, [1, 2, 3, 10, 11, 4], [12], version=4))             # extends
        w.add_call(_call("r", 2, [1, 2, 5], [13, 14], version=5))                    # rewrite: keeps 2 tokens
        w.add_call(_call("r", 3, [1, 2, 5, 13, 14, 6], [15], version=5))             # extends
        w.add_call(_call("r", 4, [1, 2, 5, 13, 7], [16, 17, 18], version=6))        # rewrite inside segment 1's text
        w.add_rollout(RolloutRecord(rollout_id="r", reward=1.0, group_key="g", env="e"))
        w.add_call(_call("open", 0, [9, 9], [8]))                                    # no rollout row: still running
    table = build_sequences(tape_dir)
    rows = _rows(table)
    assert set(rows) == {"r/0", "r/1", "r/2", "open/0"}
    s0, s1, s2 = rows["r/0"], rows["r/1"], rows["r/2"]
    assert s0["input_ids"] == [1, 2, 3, 10, 11, 4, 12]
    assert s0["loss_mask"] == [0, 0, 0, 1, 1, 0, 1]
    assert s0["token_call_index"] == [-1, -1, -1, 0, 0, -1, 1]
    assert s1["input_ids"] == [1, 2, 5, 13, 14, 6, 15]
    assert s1["loss_mask"] == [0, 0, 0, 1, 1, 0, 1]
    assert s2["input_ids"] == [1, 2, 5, 13, 7, 16, 17, 18]
    assert s2["loss_mask"] == [0, 0, 0, 0, 0, 1, 1, 1]  # 13 was generated by call 2, but is prompt here
    assert s2["behaviour_logprobs"] == pytest.approx([0, 0, 0, 0, 0, -0.5, -0.5, -0.5])
    assert [(s["min_policy_version"], s["max_policy_version"]) for s in (s0, s1, s2)] == [(3, 4), (5, 5), (6, 6)]
    assert [s["split_reason"] for s in (s0, s1, s2)] == ["start", "history_rewrite", "history_rewrite"]
    assert rows["open/0"]["status"] == "open" and rows["open/0"]["reward"] is None
    assert set(build_sequences(tape_dir, include_open=False)["rollout_id"].to_pylist()) == {"r"}
    assert build_sequences(tape_dir, rollout_ids=["open"])["sequence_id"].to_pylist() == ["open/0"]


def test_missing_call_is_refused_with_the_rollout_named(tmp_path: Path) -> None:
    tape_dir = tmp_path / "tape"
    with TapeWriter(tape_dir, flush_seconds=None, handle_signals=False) as w:
        w.add_call(_call("r", 0, [1, 2], [3]))
        w.add_call(_call("r", 2, [1, 2, 3, 4], [5]))
    with pytest.raises(TapeError, match="rollout r call 2"):
        build_sequences(tape_dir)
