"""Ingest never changes a token ID or a logprob: a float, bool, string or out-of-range ID makes
its line malformed (with the reason), invalid logprobs are kept and flagged; `ingest` fails when
nothing was ingested, and `check` fails on shards it cannot read and on rollouts missing calls."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from recorder import GymFormatError, Tape, ingest_gym_jsonl, iter_gym_lines, tokenizer_identity
from replay import check_tape
from tests.tape.broken_tapes import write_integrity_tape

runner = CliRunner()


def _line(prompt: Any = (1, 2, 3), gen: Any = (7,), logprobs: Any = (-0.5,), **extra: Any) -> dict[str, Any]:
    item = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "4"}],
            "prompt_token_ids": list(prompt) if isinstance(prompt, tuple) else prompt,
            "generation_token_ids": list(gen) if isinstance(gen, tuple) else gen,
            "generation_log_probs": list(logprobs) if isinstance(logprobs, tuple) else logprobs}
    return {"responses_create_params": {"input": "What is 2+2?"}, "response": {"output": [item]}, "reward": 1.0,
            "_ng_task_index": 0, "_ng_rollout_index": 0, **extra}


def _write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))  # Python's json: NaN, Infinity, big ints
    return path


@pytest.mark.parametrize(("field", "values", "reason"), [
    ("generation_token_ids", [1.5], "generation_token_ids[0] is 1.5 (float); token IDs are integers"),
    ("generation_token_ids", [1.0], "generation_token_ids[0] is 1.0 (float); token IDs are integers"),
    ("prompt_token_ids", [1, True, 3], "prompt_token_ids[1] is True (bool); token IDs are integers"),
    ("prompt_token_ids", [1, "5"], "prompt_token_ids[1] is '5' (str); token IDs are integers"),
    ("prompt_token_ids", [[1, 2]], "prompt_token_ids[0] is [1, 2] (list)"),
    ("prompt_token_ids", [3, -1], "prompt_token_ids[1] is -1; token IDs are integers in 0..2^31-1"),
    ("generation_token_ids", [2**31], "generation_token_ids[0] is 2147483648; token IDs are integers in 0..2^31-1"),
    ("generation_token_ids", [2**70], "generation_token_ids[0] is 1180591620717411303424"),
    ("generation_log_probs", ["-0.5"], "generation_log_probs[0] is '-0.5' (str); logprobs are numbers"),
    ("generation_log_probs", [True], "generation_log_probs[0] is True (bool); logprobs are numbers"),
    ("generation_log_probs", {"a": 1}, "generation_log_probs is dict, expected a list of numbers"),
])
def test_a_bad_token_field_makes_the_line_malformed_never_cast(tmp_path: Path, field: str, values: Any,
                                                              reason: str) -> None:
    line = _line()
    line["response"]["output"][0][field] = values
    src = _write(tmp_path / "r.jsonl", [_line(prompt=(4, 5)), line])
    report = ingest_gym_jsonl([src], tmp_path / "t")
    assert report.rollouts == 1 and len(report.errors) == 1, "the good line is ingested, the bad one skipped"
    e = report.errors[0]
    assert isinstance(e, GymFormatError) and e.line_no == 2 and reason in e.reason, e.reason
    assert Tape(tmp_path / "t").read("calls").num_rows == 1
    with pytest.raises(GymFormatError, match=r"r\.jsonl:2: .*" + re.escape(reason)):
        ingest_gym_jsonl([src], tmp_path / "strict", strict=True)


def test_token_ids_at_or_above_a_given_vocabulary_are_malformed(tmp_path: Path) -> None:
    src = _write(tmp_path / "r.jsonl", [_line(gen=(99,)), _line(gen=(100,))])
    report = ingest_gym_jsonl([src], tmp_path / "t", vocab_size=100)
    assert report.rollouts == 1 and [e.line_no for e in report.errors] == [2]
    want = "generation_token_ids[0] is 100; token IDs are integers below the vocabulary size 100"
    assert want in report.errors[0].reason
    r = runner.invoke(app, ["ingest", str(src), "--tape", str(tmp_path / "t2"), "--vocab-size", "100"])
    assert r.exit_code == 0 and "r.jsonl:2:" in r.stderr and "below the vocabulary size 100" in r.stderr


def test_invalid_logprobs_are_kept_exactly_and_flagged(tmp_path: Path, model_dir: Path) -> None:
    bad = [[-0.5, math.nan], [math.inf], [-math.inf, -0.1], [0.25], [-1e40], [1e-7, -0.5]]
    lines = [_line(gen=tuple(range(7, 7 + len(lp))), logprobs=tuple(lp), _ng_task_index=i) for i, lp in enumerate(bad)]
    src = _write(tmp_path / "r.jsonl", lines)
    report = ingest_gym_jsonl([src], tmp_path / "t")
    assert report.rollouts == 6 and not report.errors
    assert report.token_status == {"invalid_logprobs": 5, "ok": 1}, "1e-7 is float rounding, not an invalid logprob"
    assert len(report.flagged) == 5
    assert "r.jsonl:1: response.output[0]: generation_log_probs[1] is nan" in report.flagged[0]
    assert "is -1e+40, beyond what the tape's float32 holds" in report.flagged[4]
    tape = Tape(tmp_path / "t")
    calls = tape.read("calls").to_pylist()
    assert sorted(c["token_status"] for c in calls) == ["invalid_logprobs"] * 5 + ["ok"]
    rollouts = tape.read("rollouts", ["task_index", "token_status"]).to_pylist()
    assert {r["task_index"]: r["token_status"] for r in rollouts} == {0: "invalid_logprobs", 1: "invalid_logprobs",
                                                                      2: "invalid_logprobs", 3: "invalid_logprobs",
                                                                      4: "invalid_logprobs", 5: "ok"}
    # the values as given (float32), in the tape and in its export
    for line, back in zip(lines, iter_gym_lines(tape)):
        with np.errstate(over="ignore"):  # -1e40 is -inf in float32
            want = np.asarray(line["response"]["output"][0]["generation_log_probs"], np.float32)
        got = np.asarray(back["response"]["output"][0]["generation_log_probs"], np.float32)
        assert np.array_equal(want, got, equal_nan=True)
    # gymtape check names each value; the trainer never sees these rollouts
    d = check_tape(tape, model_dir).to_dict()
    assert (d["totals"]["logprob_nan"], d["totals"]["logprob_inf"], d["totals"]["logprob_positive"]) == (1, 3, 2), \
        "NaN; +inf, -inf, -1e40 (-inf as float32); 0.25 and +inf (positive too)"
    from trainer_bridge import build_sequences

    assert build_sequences(tape).num_rows == 1, "only the rollout with valid logprobs is trained on"


def test_ingest_exits_non_zero_when_every_line_is_malformed(tmp_path: Path) -> None:
    src = _write(tmp_path / "r.jsonl", [_line(gen=(n + 0.5,)) for n in range(808)])
    r = runner.invoke(app, ["ingest", str(src), "--tape", str(tmp_path / "t")])
    assert r.exit_code == 1 and "malformed: 808" in r.stderr and "none of the 808 lines" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    one_good = _write(tmp_path / "r2.jsonl", [_line(gen=(1.5,)), _line()])
    r = runner.invoke(app, ["ingest", str(one_good), "--tape", str(tmp_path / "t")])
    assert r.exit_code == 0 and "ingested 1 rollouts" in r.stderr
    r = runner.invoke(app, ["ingest", str(one_good), "--tape", str(tmp_path / "t")])
    assert r.exit_code == 0 and "already on tape: 1" in r.stderr, "a re-run that finds its rollouts on the tape is fine"


# -- gymtape check on unreadable shards and missing calls ------------------------------------------------


@pytest.fixture
def clean_tape(tmp_path: Path, model_dir: Path) -> Path:
    """A tape gymtape check passes: two clean two-call rollouts of real SmolLM2 tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    words = ["What is two plus two?", " The answer is four.", " Six, since three plus three is six."]
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    def tokens(k: int) -> list[int]:
        return list(tok.encode(words[k % len(words)], add_special_tokens=False)) + ([eos] if k else [])

    write_integrity_tape(tmp_path / "t", tokens=tokens, kinds=("clean", "clean"),
                         identity=tokenizer_identity(model_dir))
    r = runner.invoke(app, ["check", str(tmp_path / "t"), "--tokenizer", str(model_dir)])
    assert r.exit_code == 0, r.output
    return tmp_path / "t"


@pytest.mark.parametrize("table", ["rollouts", "calls"])
def test_check_exits_1_naming_a_shard_it_cannot_read(clean_tape: Path, model_dir: Path, table: str) -> None:
    shard = next((clean_tape / table).glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-100])  # a truncated shard: its footer is gone
    r = runner.invoke(app, ["check", str(clean_tape), "--tokenizer", str(model_dir), "--json"])
    assert r.exit_code == 1 and "Traceback" not in r.stderr, r.output
    d = json.loads(r.stdout)
    assert d["unreadable_shards"] == [str(shard)] and d["totals"]["unreadable_shard"] == 1
    assert any(str(shard) in e["message"] and "cannot be read" in e["message"] for e in d["examples"])
    if table == "calls":
        assert d["rollouts_missing_calls"] == 4, "rollouts whose calls were in the unreadable shard"
    r = runner.invoke(app, ["check", str(clean_tape), "--tokenizer", str(model_dir)])
    assert r.exit_code == 1 and "unreadable_shard" in r.stdout


def test_check_exits_1_when_rollouts_reference_calls_that_are_missing(clean_tape: Path, model_dir: Path) -> None:
    for shard in (clean_tape / "calls").glob("*.parquet"):
        shard.unlink()
    r = runner.invoke(app, ["check", str(clean_tape), "--tokenizer", str(model_dir), "--json"])
    d = json.loads(r.stdout)
    assert r.exit_code == 1 and d["rollouts_missing_calls"] == 4 and not d["unreadable_shards"]
