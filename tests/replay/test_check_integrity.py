"""`gymtape check` flags rollouts whose calls are missing and incomplete ones, names them, and
exits 1; a failed row a retry superseded is counted, not flagged (real SmolLM2 tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from cli import app
from replay import check_tape
from tests.tape.broken_tapes import write_integrity_tape


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _tokens(tok: Any):  # noqa: ANN202
    """Token IDs that decode and re-encode to themselves: words and the end-of-turn token."""
    words = ["What is two plus two?", " The answer is four.", " Six, since three plus three is six.", " Done."]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    return lambda k: list(tok.encode(words[k % len(words)], add_special_tokens=False)) + ([eos] if k else [])


def test_check_flags_and_names_missing_calls_and_incomplete_rollouts(tmp_path: Path, tok: Any, model_dir: Path) -> None:
    ids = write_integrity_tape(tmp_path / "t", tokens=_tokens(tok))
    d = check_tape(tmp_path / "t", tok).to_dict()
    assert d["totals"]["missing_calls"] == 3 and d["totals"]["incomplete"] == 1
    assert (d["rollouts_missing_calls"], d["rollouts_incomplete"], d["rollouts_superseded"]) == (3, 1, 1)
    named = {b["rollout_id"]: b for b in d["broken_rollouts"]}
    assert set(named) == {ids["short"], ids["gap"], ids["lost"], ids["incomplete"]}
    assert named[ids["gap"]]["missing_call_indices"] == [1] and named[ids["short"]]["missing_call_indices"] == [2]
    assert named[ids["lost"]]["missing_call_indices"] == [0, 1]
    verdicts = {v["rollout_id"]: v for v in d["verdicts"]}
    assert verdicts[ids["lost"]]["problems"] == {"missing_calls": 1}, "a rollout with no call at all gets a verdict"
    assert verdicts[ids["incomplete"]]["problems"] == {"incomplete": 1}
    assert ids["retried"] not in named and all(v["verdict"] == "ok" for r, v in verdicts.items() if r.startswith("clean"))
    message = next(p["message"] for p in d["examples"] if p["rollout_id"] == ids["gap"] and p["type"] == "missing_calls")
    assert "num_calls = 3" in message and "missing call index 1" in message and "--retry-failed" in message

    r = CliRunner().invoke(app, ["check", str(tmp_path / "t"), "--tokenizer", str(model_dir), "--json"])
    assert r.exit_code == 1, r.output
    assert {b["rollout_id"] for b in orjson.loads(r.stdout)["broken_rollouts"]} == set(named)
    r = CliRunner().invoke(app, ["check", str(tmp_path / "t"), "--tokenizer", str(model_dir)])
    assert r.exit_code == 1 and ids["lost"] in r.stdout and "rollouts missing calls or incomplete (4)" in r.stdout


def test_a_superseded_failed_row_leaves_the_check_clean(tmp_path: Path, tok: Any, model_dir: Path) -> None:
    write_integrity_tape(tmp_path / "t", tokens=_tokens(tok), kinds=("clean", "retried"))
    d = check_tape(tmp_path / "t", tok).to_dict()
    assert d["ok"] and d["rollouts_superseded"] == 1 and d["broken_rollouts"] == [], d["examples"]
    r = CliRunner().invoke(app, ["check", str(tmp_path / "t"), "--tokenizer", str(model_dir)])
    assert r.exit_code == 0, r.output
