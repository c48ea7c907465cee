"""`gymtape diff`: two tapes built with gymtape's writer and the real SmolLM2 tokenizer.

Tape B is tape A with known changes: one rollout's second call generates a different
continuation at a known token, one environment answers differently (a prompt divergence), one
reward changes on identical tokens, one sampler logprob moves on a shared token, one rollout has
an extra call, and each tape has a rollout the other lacks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli import app
from recorder import (CallRecord, RolloutRecord, TapeWriter, TokenizerIdentity, TokenizerMismatchError,
                      tokenizer_identity)
from replay import DiffError, DiffReport, diff_tapes

EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def enc(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def user_prompt(tok: Any, text: str) -> list[int]:
    return enc(tok, f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


def tool_turn(tok: Any, result: str) -> list[int]:
    return enc(tok, f"\n<|im_start|>tool\n{result}<|im_end|>\n<|im_start|>assistant\n")


def write_rollout(w: TapeWriter, rid: str, task: int, calls: list[tuple[list[int], list[int], list[float]]],
                  reward: float, *, repeat: int = 0) -> None:
    """Calls as (tokens added to the context before the call, generated tokens, their logprobs)."""
    context: list[int] = []
    for k, (added, gen, lps) in enumerate(calls):
        prompt = context + added
        w.add_call(CallRecord(rollout_id=rid, call_index=k, prompt_ids=prompt, generation_ids=gen,
                              generation_logprobs=lps))
        context = prompt + gen
    w.add_rollout(RolloutRecord(rollout_id=rid, env="math", task_index=task, rollout_index=repeat,
                                group_key=f"math/{task}", reward=reward))


def build_diff_tapes(tok: Any, ident: TokenizerIdentity, tmp: Path) -> dict[str, Any]:
    """Tapes ``tmp/a`` and ``tmp/b`` with the known differences of the module docstring."""
    first = enc(tok, "Let me use the calculator.") + [EOS]
    shared = enc(tok, "The answer is")
    tail_a, tail_b = enc(tok, " 5."), enc(tok, " five, I think.")
    assert tail_a[0] != tail_b[0], "the test needs the continuations to differ at their first token"
    gen_a, gen_b = shared + tail_a + [EOS], shared + tail_b + [EOS]
    lp = lambda ids, v=-0.5: [v] * len(ids)  # noqa: E731
    first_lps_b = lp(first)
    first_lps_b[3] = -0.75  # the same token, scored differently by B's sampler
    q = user_prompt(tok, "What is 2+3?")
    spec: dict[str, Any] = {"ident": ident, "shared": shared, "first": first}
    for name in ("a", "b"):
        with TapeWriter(tmp / name, tokenizer=ident, flush_seconds=None, handle_signals=False) as w:
            # task 0: the second call continues differently after "The answer is"
            write_rollout(w, f"{name}-0", 0, [(q, first, lp(first) if name == "a" else first_lps_b),
                                             (tool_turn(tok, "5"), gen_a if name == "a" else gen_b,
                                              lp(gen_a if name == "a" else gen_b))], 1.0 if name == "a" else 0.0)
            # task 1: token-identical, reward changes
            write_rollout(w, f"{name}-1", 1, [(q, first, lp(first)), (tool_turn(tok, "5"), gen_a, lp(gen_a))],
                          0.0 if name == "a" else 1.0)
            # task 2: the environment answers differently; the model's call 1 output then differs too
            res = "7" if name == "a" else "8"
            write_rollout(w, f"{name}-2", 2, [(q, first, lp(first)), (tool_turn(tok, res), gen_a, lp(gen_a))], 1.0)
            # task 3: B makes one more call
            calls = [(q, first, lp(first))]
            if name == "b":
                calls.append((tool_turn(tok, "5"), gen_a, lp(gen_a)))
            write_rollout(w, f"{name}-3", 3, calls, 0.5)
            # one rollout only in each tape
            write_rollout(w, f"{name}-only", 4 if name == "a" else 5, [(q, first, lp(first))], 1.0)
    spec.update(a=tmp / "a", b=tmp / "b", tail_a=tail_a, tail_b=tail_b, q=q)
    return spec


@pytest.fixture(scope="module")
def tapes(tok: Any, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_diff_tapes(tok, tokenizer_identity(model_dir), tmp_path_factory.mktemp("diff"))


@pytest.fixture(scope="module")
def report(tapes: dict[str, Any], tok: Any) -> dict[str, Any]:
    r = diff_tapes(tapes["a"], tapes["b"], tokenizer=tok)
    assert isinstance(r, DiffReport)
    return r.to_dict()


def pair(report: dict[str, Any], task: int) -> dict[str, Any]:
    return next(p for p in report["pairs"] if p["task_index"] == task)


def test_generation_divergence_at_the_known_token_with_both_continuations(report: dict[str, Any],
                                                                          tapes: dict[str, Any]) -> None:
    p = pair(report, 0)
    v = p["divergence"]
    n_first, n_shared = len(tapes["first"]), len(tapes["shared"])
    assert (p["rollout_id_a"], p["rollout_id_b"], p["identical"]) == ("a-0", "b-0", False)
    assert (v["part"], v["call_index"], v["offset_in_call"]) == ("generation", 1, n_shared)
    assert v["stream_offset"] == n_first + n_shared == p["shared_generated"]
    assert v["before"].endswith("<|im_start|>assistant\nThe answer is")
    assert v["a"]["text"] == " 5.<|im_end|>" and v["b"]["text"] == " five, I think.<|im_end|>"
    assert v["a"]["token_id"] == tapes["tail_a"][0] and v["b"]["token_id"] == tapes["tail_b"][0]
    assert v["a"]["token_ids"] == (tapes["tail_a"] + [EOS])[:8] and v["a"]["logprob"] == -0.5
    assert not v["a"]["ended"] and not v["b"]["ended"]
    assert (p["reward_a"], p["reward_b"], p["reward_change"]) == (1.0, 0.0, -1.0)
    sl = p["shared_logprobs"]
    assert sl["tokens"] == n_first + n_shared and sl["changed_tokens"] == 1
    assert sl["max_abs_dlogprob"] == pytest.approx(0.25)
    assert sl["mean_abs_dlogprob"] == pytest.approx(0.25 / (n_first + n_shared))
    assert sl["max_at"] == {"call_index": 0, "offset_in_call": 3, "stream_offset": 3}


def test_prompt_divergence_blames_the_environment_not_the_sampler(report: dict[str, Any], tok: Any,
                                                                  tapes: dict[str, Any]) -> None:
    p = pair(report, 2)
    v = p["divergence"]
    n_tool_head = len(enc(tok, "\n<|im_start|>tool\n"))
    assert (v["part"], v["call_index"]) == ("prompt", 1)
    assert v["offset_in_call"] == len(tapes["q"]) + len(tapes["first"]) + n_tool_head
    assert v["stream_offset"] == len(tapes["first"]) == p["shared_generated"]
    assert v["a"]["text"].startswith("7<|im_end|>") and v["b"]["text"].startswith("8<|im_end|>")
    assert v["before"].endswith("<|im_start|>tool\n") and v["a"]["logprob"] is None
    assert p["shared_logprobs"]["max_abs_dlogprob"] == 0.0


def test_identical_tokens_with_a_changed_reward(report: dict[str, Any]) -> None:
    p = pair(report, 1)
    assert p["identical"] and p["divergence"] is None and p["reward_change"] == 1.0
    assert p["shared_generated"] == p["generated_a"] == p["generated_b"]
    assert report["summary"]["reward_changed_identical"] == 1


def test_an_extra_call_diverges_where_the_shorter_rollout_ends(report: dict[str, Any], tapes: dict[str, Any]) -> None:
    p = pair(report, 3)
    v = p["divergence"]
    assert (p["calls_a"], p["calls_b"]) == (1, 2)
    assert (v["part"], v["call_index"], v["offset_in_call"]) == ("prompt", 1, 0)
    assert v["a"]["ended"] and v["a"]["text"] == "" and not v["b"]["ended"]
    assert v["b"]["text"].startswith("<|im_start|>user")  # call 1's prompt starts with the whole conversation
    assert v["before"].endswith("calculator.<|im_end|>")


def test_summary_counts_unmatched_and_where(report: dict[str, Any]) -> None:
    s = report["summary"]
    assert report["schema"] == "gymtape.diff/1" and report["by"] == "task" and report["warnings"] == []
    assert (s["pairs"], s["identical"], s["diverged"], s["without_tokens"]) == (4, 1, 3, 0)
    assert (s["diverged_in_prompt"], s["diverged_in_generation"]) == (2, 1)
    assert (s["unmatched_a"], s["unmatched_b"]) == (1, 1)
    assert [u["rollout_id"] for u in report["unmatched_a"]] == ["a-only"]
    assert [u["rollout_id"] for u in report["unmatched_b"]] == ["b-only"]
    assert s["where"]["call_index"] == [{"call_index": 1, "count": 3}]
    offsets = {b["bucket"]: b["count"] for b in s["where"]["offset_in_call"]}
    assert offsets["0-15"] == 2 and offsets["16-63"] == 1 and sum(offsets.values()) == 3
    assert s["reward_changed"] == 2 and s["mean_reward_change"] == pytest.approx(0.0)
    assert s["shared_max_abs_dlogprob"] == pytest.approx(0.25) and s["shared_changed_tokens"] == 1
    json.dumps(report)  # JSON-ready as it is


def test_matching_by_id_and_a_tape_against_itself(tapes: dict[str, Any], tok: Any) -> None:
    same = diff_tapes(tapes["a"], tapes["a"], by="id", tokenizer=tok).to_dict()
    s = same["summary"]
    assert (s["pairs"], s["identical"], s["diverged"], s["unmatched_a"]) == (5, 5, 0, 0)
    assert s["shared_max_abs_dlogprob"] == 0.0
    cross = diff_tapes(tapes["a"], tapes["b"], by="id", tokenizer=tok).to_dict()
    assert cross["summary"]["pairs"] == 0 and cross["summary"]["unmatched_a"] == 5
    with pytest.raises(DiffError, match="by must be"):
        diff_tapes(tapes["a"], tapes["b"], by="name", tokenizer=tok)  # type: ignore[arg-type]


def test_different_tokenizer_identities_are_refused_unless_allowed(tapes: dict[str, Any], tok: Any,
                                                                   tmp_path: Path) -> None:
    other = TokenizerIdentity(name="other-tokenizer", sha256="0" * 64)
    with TapeWriter(tmp_path / "c", tokenizer=other, flush_seconds=None, handle_signals=False) as w:
        write_rollout(w, "c-0", 0, [(tapes["q"], tapes["first"], [-0.5] * len(tapes["first"]))], 1.0)
    with pytest.raises(TokenizerMismatchError, match=f"tape {tmp_path / 'c'} was recorded with tokenizer other-tokenizer"):
        diff_tapes(tapes["a"], tmp_path / "c", tokenizer=tok)
    r = diff_tapes(tapes["a"], tmp_path / "c", tokenizer=tok, allow_tokenizer_mismatch=True)
    assert any("different tokenizers" in x for x in r.warnings)
    assert any(f"tape {tmp_path / 'c'} was recorded with tokenizer other-tokenizer" in x for x in r.warnings)


def test_cli_json_html_and_fail_on_divergence(tapes: dict[str, Any], model_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    a, b = str(tapes["a"]), str(tapes["b"])
    res = runner.invoke(app, ["diff", a, b, "--json", "--tokenizer", str(model_dir)])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["schema"] == "gymtape.diff/1" and d["summary"]["diverged"] == 3
    html = tmp_path / "diff.html"
    res = runner.invoke(app, ["diff", a, b, "--html", str(html), "--fail-on-divergence"])
    assert res.exit_code == 1, res.output
    out = " ".join(res.stdout.split())  # the terminal table wraps at 80 columns
    assert "4 pairs: 3 diverged (2 in a prompt, 1 in a generation), 1 identical" in out
    assert "call 1 gen +3" in out and "A: 5.<|im_end|>" in out
    assert html.exists() and "b-0" in html.read_text()
    assert runner.invoke(app, ["diff", a, a, "--by", "id", "--fail-on-divergence"]).exit_code == 0
    res = runner.invoke(app, ["diff", a, str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not a tape" in res.output
