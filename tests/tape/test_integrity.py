"""Referential integrity (`recorder.rollout_integrity`): rollout rows whose calls are missing,
incomplete rollouts, and failed rows a retry superseded, on tapes written by TapeWriter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
from typer.testing import CliRunner

from cli import app
from recorder import Tape, read_integrity, rollout_integrity, summarize
from tests.tape.broken_tapes import write_integrity_tape


def test_each_broken_rollout_gets_its_verdict_and_clean_ones_none(tmp_path: Path) -> None:
    ids = write_integrity_tape(tmp_path / "t")
    rows, integrity = read_integrity(Tape(tmp_path / "t"))
    verdict = dict(zip(rows["rollout_id"].to_pylist(), integrity.reason()))
    assert verdict[ids["short"]] == verdict[ids["gap"]] == verdict[ids["lost"]] == "missing_calls"
    assert verdict[ids["incomplete"]] == "incomplete"
    assert verdict[ids["retried"]] == "superseded", "the failed row is replaced by the later row of its task/repeat"
    ok = [r for r, v in verdict.items() if v == "ok"]
    assert sorted(ok) == sorted([ids["clean"], ids["retried_new"], *(f"clean-{task}-1" for task in range(6))])
    found = dict(zip(rows["rollout_id"].to_pylist(), integrity.calls_found.tolist()))
    assert (found[ids["short"]], found[ids["gap"]], found[ids["lost"]]) == (2, 2, 0)
    assert integrity.counts() == {"superseded": 1, "incomplete": 1, "missing_calls": 3}


def test_only_failed_or_broken_rows_are_superseded_and_only_by_a_later_row() -> None:
    """Training rounds reuse a task and repeat on purpose: a good row is never replaced; a failed
    row is replaced only by a later one, whatever order the rows are stored in."""
    ts = pa.array([0, 2, 1, 3, 5, 4], pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    rollouts = pa.table({
        "rollout_id": ["ok-old", "ok-new", "failed-old", "failed-new", "failed-last", "no-key"],
        "env": ["e", "e", "e", "e", "e", "e"],
        "task_index": pa.array([0, 0, 1, 1, 1, None], pa.int64()),
        "rollout_index": pa.array([0, 0, 0, 0, 0, 0], pa.int64()),
        "status": ["ok", "ok", "failed", "failed", "failed", "failed"],
        "token_status": ["ok"] * 6,
        "num_calls": pa.array([0] * 6, pa.int32()),
        "created_at": ts,
    })
    calls = pa.table({"rollout_id": pa.array([], pa.string()), "call_index": pa.array([], pa.int32())})
    integrity = rollout_integrity(rollouts, calls)
    assert integrity.superseded.tolist() == [False, False, True, True, False, False]
    flipped = rollouts.take(pa.array(np.arange(6)[::-1]))
    assert rollout_integrity(flipped, calls).superseded.tolist() == [False, False, True, True, False, False][::-1]


def test_duplicate_call_rows_do_not_hide_a_missing_index() -> None:
    rollouts = pa.table({"rollout_id": ["r"], "num_calls": pa.array([2], pa.int32()), "token_status": ["ok"]})
    calls = pa.table({"rollout_id": ["r", "r"], "call_index": pa.array([0, 0], pa.int32())})
    assert rollout_integrity(rollouts, calls).missing_calls.tolist() == [True]


def test_inspect_names_rollouts_missing_calls_and_incomplete_ones(tmp_path: Path) -> None:
    ids = write_integrity_tape(tmp_path / "t")
    s = summarize(Tape(tmp_path / "t"))
    got = s["integrity"]
    assert (got["missing_calls"], got["incomplete"], got["superseded"]) == (3, 1, 1)
    named = {b["rollout_id"]: b for b in got["broken_rollouts"]}
    assert set(named) == {ids["short"], ids["gap"], ids["lost"], ids["incomplete"]}
    assert (named[ids["gap"]]["num_calls"], named[ids["gap"]]["calls_found"]) == (3, 2)
    assert named[ids["lost"]]["task_index"] == 3 and named[ids["lost"]]["problem"] == "missing_calls"
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "t"), "--json", "--no-jsonl-ratio"])
    assert r.exit_code == 0, r.output
    assert orjson.loads(r.stdout)["integrity"]["missing_calls"] == 3
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "t"), "--no-jsonl-ratio"])
    assert r.exit_code == 0, r.output
    assert "3 rollout(s) missing calls, 1 incomplete" in r.stdout and ids["gap"] in r.stdout
