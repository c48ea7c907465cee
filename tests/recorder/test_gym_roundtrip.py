"""Gym rollout JSONL → tape → Gym rollout JSONL is exact, and the tape stores each token once."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from recorder import GymFormatError, Tape, export_gym_jsonl, ingest_gym_jsonl, iter_gym_lines
from tests.conftest import load_jsonl, write_jsonl

TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")


def _split_tokens(line: dict) -> tuple[dict, list[tuple[int, list[int], list[int], bytes]]]:
    """The line without token fields, and each carrying item's token fields (logprobs as float32 bits)."""
    line = json.loads(json.dumps(line))
    fields = []
    for i, item in enumerate((line.get("response") or {}).get("output", [])):
        if "generation_token_ids" in item:
            lp = np.asarray(item.pop("generation_log_probs"), dtype=np.float32).tobytes()
            fields.append((i, item.pop("prompt_token_ids"), item.pop("generation_token_ids"), lp))
    return line, fields


def assert_roundtrip(original: list[dict], exported: list[dict]) -> None:
    assert len(exported) == len(original), "export must write one line per ingested rollout"
    for n, (a, b) in enumerate(zip(original, exported)):
        assert list(b) == list(a), f"line {n}: top-level keys or their order changed"
        rest_a, tok_a = _split_tokens(a)
        rest_b, tok_b = _split_tokens(b)
        assert rest_b == rest_a, f"line {n}: non-token content is not JSON-equal"
        assert tok_b == tok_a, f"line {n}: token IDs or float32 logprob bits changed"
        assert b.get("reward") == a.get("reward") and type(b.get("reward")) is type(a.get("reward"))


def test_multi_turn_roundtrip_is_exact_with_rewrites_and_empty_fields(make_tape) -> None:
    tape, src = make_tape(repeats=3, calls=5, context_tokens=600, rewrite_every=3, empty_every=4)
    original = load_jsonl(src)
    assert_roundtrip(original, list(iter_gym_lines(Tape(tape))))


def test_exported_bytes_reparse_to_the_original(make_tape, tmp_path: Path) -> None:
    tape, src = make_tape(repeats=2, calls=3, context_tokens=300)
    buf = io.BytesIO()
    assert export_gym_jsonl(tape, buf) == len(load_jsonl(src))
    out = write_jsonl(tmp_path / "unused.jsonl", [])
    out.write_bytes(buf.getvalue())
    assert_roundtrip(load_jsonl(src), load_jsonl(out))


def test_every_full_prompt_is_rebuilt_from_the_deltas(make_tape) -> None:
    tape, src = make_tape(repeats=2, calls=6, context_tokens=800, rewrite_every=2)
    expected = [
        item["prompt_token_ids"]
        for line in load_jsonl(src)
        for item in line["response"]["output"]
        if "prompt_token_ids" in item
    ]
    t = Tape(tape)
    got = []
    order = {rid: i for i, rid in enumerate(t.read("rollouts", ["rollout_id"]).column("rollout_id").to_pylist())}
    for rid, calls in sorted(t.iter_rollout_calls(), key=lambda kv: order[kv[0]]):
        got += [p.tolist() for p in calls["prompt_ids"]]
    assert got == expected


def test_history_rewrite_shows_as_prefix_shorter_than_previous_context(make_tape) -> None:
    tape, _ = make_tape(repeats=1, calls=4, context_tokens=400, rewrite_every=1)
    calls = Tape(tape).calls().sort("rollout_id", "call_index").collect()
    rewrites = 0
    for (rid,), g in calls.group_by(["rollout_id"], maintain_order=True):
        ctx = None
        for row in g.iter_rows(named=True):
            if ctx is not None:
                assert row["prefix_len"] <= ctx
                rewrites += row["prefix_len"] < ctx
            ctx = row["prompt_len"] + len(row["generation_ids"])
    assert rewrites == calls["rollout_id"].n_unique(), "every rollout was built with exactly one rewrite"


def test_delta_encoding_stores_each_token_once_without_rewrites(make_tape) -> None:
    tape, src = make_tape(repeats=2, calls=8, context_tokens=1000)
    calls = Tape(tape).calls().collect()
    stored = calls["prompt_suffix_ids"].list.len().sum() + calls["generation_ids"].list.len().sum()
    unique = 0
    for line in load_jsonl(src):
        last = [it for it in line["response"]["output"] if "prompt_token_ids" in it][-1]
        unique += len(last["prompt_token_ids"]) + len(last["generation_token_ids"])
    assert stored == unique


def test_empty_token_fields_are_kept_with_status(make_tape) -> None:
    tape, _ = make_tape(repeats=2, calls=3, context_tokens=200, empty_every=1)
    t = Tape(tape)
    assert set(t.rollouts().collect()["token_status"]) == {"empty"}
    calls = t.calls().collect()
    assert len(calls) == 12 * 3 and set(calls["token_status"]) == {"empty"}


def test_real_gym_samples_roundtrip(gym_samples: Path, tmp_path: Path) -> None:
    files = sorted(gym_samples.glob("*rollouts.jsonl"))
    report = ingest_gym_jsonl(files, tmp_path / "tape", strict=True)
    original = [line for f in files for line in load_jsonl(f)]
    assert report.rollouts == len(original) and not report.errors
    t = Tape(tmp_path / "tape")
    statuses = dict(t.rollouts().group_by("token_status").len().collect().rows())
    assert statuses == {"missing": 5, "empty": 5}, "tool-call samples carry no token fields, hermes ones carry []"
    hermes = t.rollouts().filter(env="math_with_judge_hermes_agent").collect()
    assert sorted(hermes["task_index"]) == [0, 1, 2, 3, 4]
    assert_roundtrip(original, list(iter_gym_lines(t)))


def test_malformed_lines_are_reported_by_line_number_and_skipped(make_rollouts, tmp_path: Path) -> None:
    good = make_rollouts(repeats=1, calls=2, context_tokens=100)[:3]
    bad_len = json.loads(json.dumps(good[1]))
    bad_len["response"]["output"][0]["generation_log_probs"].pop()
    bad_partial = json.loads(json.dumps(good[2]))
    del bad_partial["response"]["output"][0]["prompt_token_ids"]
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(
        b"\n".join([json.dumps(good[0]).encode(), b"{not json", json.dumps(bad_len).encode(), b"[1, 2]",
                    json.dumps(bad_partial).encode(), b"", json.dumps(good[1]).encode()]) + b"\n"
    )
    report = ingest_gym_jsonl([src], tmp_path / "tape")
    assert report.rollouts == 2
    assert [e.line_no for e in report.errors] == [2, 3, 4, 5]
    assert "generation_log_probs" in report.errors[1].reason and "prompt_token_ids" in report.errors[3].reason
    with pytest.raises(GymFormatError, match=r"mixed.jsonl:2: "):
        ingest_gym_jsonl([src], tmp_path / "strict", strict=True)


def test_reingest_skips_rollouts_already_on_the_tape(make_tape) -> None:
    tape, src = make_tape(repeats=1, calls=2, context_tokens=100)
    again = ingest_gym_jsonl([src], tape)
    assert again.rollouts == 0 and again.skipped_existing == len(load_jsonl(src))
    assert Tape(tape).rollouts().collect().height == len(load_jsonl(src))


def test_non_finite_logprobs_and_odd_values_survive(make_rollouts, tmp_path: Path) -> None:
    line = make_rollouts(repeats=1, calls=2, context_tokens=100)[0]
    line["response"]["output"][0]["generation_log_probs"][0] = float("-inf")
    line["reward"] = 1  # an int, not a float
    line["_ng_task_index"] = "t-7"  # not an int
    src = tmp_path / "odd.jsonl"
    src.write_text(json.dumps(line) + "\n")  # Python's json writes -Infinity
    ingest_gym_jsonl([src], tmp_path / "tape", strict=True)
    (back,) = list(iter_gym_lines(Tape(tmp_path / "tape")))
    assert back["response"]["output"][0]["generation_log_probs"][0] == float("-inf")
    assert back["reward"] == 1 and isinstance(back["reward"], int)
    assert back["_ng_task_index"] == "t-7"
