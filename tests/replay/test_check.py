"""`gymtape check`: structural checks on tapes built with the real SmolLM2 tokenizer.

Recorded prompts are built the way `gymtape serve` builds them (recorder._prompting.PromptBuilder,
on-policy splice included), so the re-templating check sees exactly what a served tape holds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from recorder import (CallRecord, RolloutRecord, Tape, TapeWriter, TokenizerIdentity, TokenizerMismatchError,
                      tokenizer_identity)
from recorder.serve._prompting import PromptBuilder
from recorder.tape._prompts import common_prefix_len
from replay import CheckReport, check_tape

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TOOLS = [{"type": "function", "function": {"name": "f", "description": "Adds one to x.",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "integer"}},
                                                          "required": ["x"]}}}]


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def builder(tok: Any) -> PromptBuilder:
    return PromptBuilder(tok)


def enc(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def conversation(builder: PromptBuilder, rid: str, steps: list[tuple[list[dict[str, Any]], list[int], dict[str, Any]]],
                 tools: list[dict[str, Any]] | None = None) -> list[CallRecord]:
    """Calls as `gymtape serve` records them: each step adds messages, the model generates
    ``gen`` (its parsed reply is ``reply``), and the client sends the reply back with its IDs."""
    msgs: list[dict[str, Any]] = []
    calls = []
    for k, (added, gen, reply) in enumerate(steps):
        msgs = msgs + added
        p = builder.build(msgs, tools)
        calls.append(CallRecord(rollout_id=rid, call_index=k, prompt_ids=p.ids, generation_ids=gen,
                                generation_logprobs=[-0.25] * len(gen), messages=p.messages, tools=tools))
        msgs = msgs + [{**reply, "prompt_token_ids": p.ids, "generation_token_ids": gen}]
    return calls


def write(path: Path, calls: list[CallRecord], identity: TokenizerIdentity | None) -> Tape:
    with TapeWriter(path, tokenizer=identity, flush_seconds=None, handle_signals=False) as w:
        for c in calls:
            w.add_call(c)
        for rid in dict.fromkeys(c.rollout_id for c in calls):
            w.add_rollout(RolloutRecord(rollout_id=rid, reward=1.0))
    return Tape(path)


@pytest.fixture(scope="module")
def ident(model_dir: Path) -> TokenizerIdentity:
    return tokenizer_identity(model_dir)


def on_policy_calls(tok: Any, builder: PromptBuilder, rid: str = "clean") -> list[CallRecord]:
    eos = builder.eos_token_id
    a1, a2 = "The answer is 4.", "Six, since 3+3=6."
    return conversation(builder, rid, [
        ([SYSTEM, {"role": "user", "content": "What is 2+2?"}], enc(tok, a1) + [eos], {"role": "assistant", "content": a1}),
        ([{"role": "user", "content": "And 3+3?"}], enc(tok, a2) + [eos], {"role": "assistant", "content": a2}),
        ([{"role": "user", "content": "Thanks!"}], enc(tok, "You're welcome.") + [eos],
         {"role": "assistant", "content": "You're welcome."}),
    ])


def merge_calls(tok: Any, builder: PromptBuilder) -> tuple[list[CallRecord], dict[str, int]]:
    """The model emits " Ski" + "nny"; re-encoding " Skinny" splits it differently."""
    eos = builder.eos_token_id
    head, ski, nny, whole = enc(tok, "The cat is"), enc(tok, " Ski"), enc(tok, "nny"), enc(tok, " Skinny")
    assert ski + nny != whole, "the planted merge needs ' Ski'+'nny' to differ from ' Skinny'"
    gen0 = head + ski + nny + enc(tok, ".") + [eos]
    gen1 = enc(tok, "It eats a lot.") + [eos]
    calls = conversation(builder, "merge", [
        ([SYSTEM, {"role": "user", "content": "Describe the cat."}], gen0, {"role": "assistant", "content": "The cat is Skinny."}),
        ([{"role": "user", "content": "Why?"}], gen1, {"role": "assistant", "content": "It eats a lot."}),
    ])
    split = common_prefix_len(np.array(ski + nny), np.array(whole))
    return calls, {"gen_pos": len(head) + split, "prompt0_len": len(calls[0].prompt_ids), "gen0_len": len(gen0),
                   "gen1_len": len(gen1), "first_model_id": (ski + nny)[split], "first_reencoded_id": whole[split]}


def problems(report: CheckReport, type_: str) -> list[dict[str, Any]]:
    return [p for p in report.to_dict()["examples"] if p["type"] == type_]


def test_on_policy_conversation_is_clean(tmp_path: Path, tok: Any, builder: PromptBuilder, ident: TokenizerIdentity) -> None:
    calls = on_policy_calls(tok, builder) + on_policy_calls(tok, builder, "clean2")
    report = check_tape(write(tmp_path / "t", calls, ident), tok)
    d = report.to_dict()
    assert d["ok"] and d["problems"] == 0 and set(d["totals"].values()) == {0}, d["examples"]
    assert d["off_policy_fraction"] == 0.0
    assert d["checkable_calls"] == 6 and d["not_checkable"] == 0 and d["warnings"] == []
    assert [v["verdict"] for v in d["verdicts"]] == ["ok", "ok"]
    json.dumps(d)  # the report is plain JSON


def test_planted_merge_is_reported_in_generation_and_next_prompt(tmp_path: Path, tok: Any, builder: PromptBuilder,
                                                                  ident: TokenizerIdentity) -> None:
    calls, exp = merge_calls(tok, builder)
    report = check_tape(write(tmp_path / "t", calls, ident), tok)
    assert report.totals["retokenization"] == 1 and report.retokenization_kinds == {"merge": 1, "split": 0}
    (rt,) = problems(report, "retokenization")
    assert (rt["rollout_id"], rt["call_index"], rt["kind"], rt["position"]) == ("merge", 0, "merge", exp["gen_pos"])
    assert rt["generated"]["ids"][0] == exp["first_model_id"] and rt["reencoded"]["ids"][0] == exp["first_reencoded_id"]
    assert rt["generated"]["tokens"][0] == tok.convert_ids_to_tokens(exp["first_model_id"])
    assert "Skinny" in rt["text"] and rt["before"].endswith("Sk")
    # call 0's prompt is the template itself; call 1's carries the model's IDs, spliced in
    assert report.totals["retemplate"] == 1 and report.totals["history"] == 0
    (tp,) = problems(report, "retemplate")
    assert tp["call_index"] == 1 and tp["category"] == "retokenization"
    assert tp["position"] == exp["prompt0_len"] + exp["gen_pos"]
    assert tp["recorded"]["ids"][0] == exp["first_model_id"] and tp["template"]["ids"][0] == exp["first_reencoded_id"]
    assert report.off_policy_fraction == pytest.approx(exp["gen1_len"] / (exp["gen0_len"] + exp["gen1_len"]))
    assert report.to_dict()["verdicts"] == [{"rollout_id": "merge", "calls": 2, "verdict": "problems",
                                             "problems": {"retemplate": 1, "retokenization": 1}}]


def test_tool_call_spacing_is_classified_tool_call_format(tmp_path: Path, tok: Any, builder: PromptBuilder,
                                                          ident: TokenizerIdentity) -> None:
    eos = builder.eos_token_id
    raw = '<tool_call>\n{"name":"f", "arguments": {"x":1}}\n</tool_call>'
    gen0 = enc(tok, raw) + [eos]
    reply = {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}]}
    calls = conversation(builder, "tools", [
        ([SYSTEM, {"role": "user", "content": "Add one to 1."}], gen0, reply),
        ([{"role": "tool", "tool_call_id": "c1", "content": "2"}], enc(tok, "It is 2.") + [eos],
         {"role": "assistant", "content": "It is 2."}),
    ], tools=TOOLS)
    report = check_tape(write(tmp_path / "t", calls, ident), tok)
    (tp,) = problems(report, "retemplate")
    p0 = len(calls[0].prompt_ids)
    # the divergence is inside the model's own tool call (tools were inherited: the prompt up to it matches)
    assert tp["call_index"] == 1 and tp["category"] == "tool_call_format"
    assert p0 < tp["position"] < p0 + len(gen0)
    assert '"name":' in tp["before"] + tp["recorded"]["text"] and tp["recorded"]["text"] != tp["template"]["text"]
    assert report.retemplate_categories["tool_call_format"] == 1 and report.off_policy_fraction > 0


def test_reasoning_dropped_by_the_template_is_classified_reasoning_stripped(tmp_path: Path) -> None:
    """Qwen3's template drops <think> from earlier turns; the recorded (spliced) prompt keeps it."""
    from transformers import AutoTokenizer

    from recorder.serve.engines._qwen import qwen_tokenizer_dir

    qdir = qwen_tokenizer_dir()
    qtok = AutoTokenizer.from_pretrained(qdir)
    qb = PromptBuilder(qtok)
    eos = qb.eos_token_id
    gen0 = enc(qtok, "<think>\nAdd two and two.\n</think>\n\nIt is 4.") + [eos]
    calls = conversation(qb, "think", [
        ([{"role": "user", "content": "What is 2+2?"}], gen0,
         {"role": "assistant", "content": "It is 4.", "reasoning_content": "Add two and two."}),
        ([{"role": "user", "content": "And 3+3?"}], enc(qtok, "It is 6.") + [eos], {"role": "assistant", "content": "It is 6."}),
    ])
    report = check_tape(write(tmp_path / "t", calls, tokenizer_identity(qdir)), qtok)
    (tp,) = problems(report, "retemplate")
    assert tp["call_index"] == 1 and tp["category"] == "reasoning_stripped"
    assert tp["position"] == len(calls[0].prompt_ids), "diverges where the model's reasoning starts"
    assert tp["recorded"]["tokens"][0] == "<think>" and "<think>" not in tp["template"]["text"]
    assert report.totals["retokenization"] == 0 and report.totals["history"] == 0


def test_history_rewrite_is_flagged_with_prefix_len_and_context(tmp_path: Path, tok: Any, builder: PromptBuilder,
                                                               ident: TokenizerIdentity) -> None:
    eos = builder.eos_token_id
    gen0 = enc(tok, "The answer is 4.") + [eos]
    p0 = builder.build([SYSTEM, {"role": "user", "content": "What is 2+2?"}], None)
    # the harness replaces the conversation so far by a summary
    p1 = builder.build([SYSTEM, {"role": "user", "content": "Earlier: 2+2 is 4. Now: what is 3+3?"}], None)
    calls = [
        CallRecord(rollout_id="rw", call_index=0, prompt_ids=p0.ids, generation_ids=gen0,
                   generation_logprobs=[-0.1] * len(gen0), messages=p0.messages),
        CallRecord(rollout_id="rw", call_index=1, prompt_ids=p1.ids, generation_ids=[eos], generation_logprobs=[-0.1],
                   messages=p1.messages),
    ]
    report = check_tape(write(tmp_path / "t", calls, ident), tok)
    assert report.totals["history"] == 1 and report.totals["retemplate"] == 0
    (h,) = problems(report, "history")
    expected_keep = common_prefix_len(np.array(p0.ids + gen0, np.int32), np.array(p1.ids, np.int32))
    assert h["call_index"] == 1 and h["prefix_len"] == expected_keep
    assert h["previous_context_len"] == len(p0.ids) + len(gen0)
    assert h["previous"]["ids"][0] == (p0.ids + gen0)[expected_keep] and h["prompt"]["ids"][0] == p1.ids[expected_keep]


def test_field_problems_are_each_reported(tmp_path: Path, tok: Any, builder: PromptBuilder) -> None:
    calls = on_policy_calls(tok, builder, "pos")[:1] + on_policy_calls(tok, builder, "nan")[:1] \
        + on_policy_calls(tok, builder, "oov")[:1] + on_policy_calls(tok, builder, "fine")[:1]
    calls[0].generation_logprobs = [-0.1, 0.5] + [-0.1] * (len(calls[0].generation_ids) - 2)
    calls[1].generation_logprobs = [-0.1] * (len(calls[1].generation_ids) - 1) + [math.nan]
    calls[2].generation_ids = [len(tok) + 10] + list(calls[2].generation_ids[1:])
    other = TokenizerIdentity(name="other-tokenizer", sha256="0" * 64)
    tape = write(tmp_path / "t", calls, other)
    with pytest.raises(TokenizerMismatchError, match="other-tokenizer .*SmolLM2"):
        check_tape(tape, tok)  # a different tokenizer is refused unless allowed
    report = check_tape(tape, tok, allow_tokenizer_mismatch=True)
    assert any("other-tokenizer" in w for w in report.warnings)
    t = report.totals
    assert (t["logprob_positive"], t["logprob_nan"], t["logprob_inf"], t["token_out_of_vocab"], t["tokenizer_mismatch"]) \
        == (1, 1, 0, 1, 1)
    assert t["retokenization"] == 0 and t["length_mismatch"] == 0 and t["prompt_len_mismatch"] == 0
    (pos,) = problems(report, "logprob_positive")
    (nan,) = problems(report, "logprob_nan")
    (oov,) = problems(report, "token_out_of_vocab")
    (mm,) = problems(report, "tokenizer_mismatch")
    assert (pos["rollout_id"], pos["position"], pos["value"]) == ("pos", 1, 0.5)
    assert (nan["rollout_id"], nan["position"]) == ("nan", len(calls[1].generation_ids) - 1)
    assert (oov["rollout_id"], oov["part"], oov["position"], oov["token_id"]) == ("oov", "generation", 0, len(tok) + 10)
    assert mm["tape_tokenizer"]["name"] == "other-tokenizer" and mm["rollout_id"] is None
    verdicts = {v.rollout_id: v.ok for v in report.verdicts}
    assert verdicts == {"fine": True, "nan": False, "oov": False, "pos": False}


def test_ingested_gym_rollouts_are_re_templated_from_their_rollout_lines(make_tape: Any, tok: Any) -> None:
    """Their request messages are rebuilt from the Gym line (tests/replay/test_check_gym_rollouts.py
    checks that on a real sample); these synthetic prompts are random IDs, so every call differs."""
    tape, _ = make_tape(repeats=1, calls=3, context_tokens=256, vocab_size=len(tok), rewrite_every=2)
    report = check_tape(Tape(tape), tok, max_examples=2)
    d = report.to_dict()
    assert d["calls"] == d["rebuilt_calls"] == d["checkable_calls"] == 18 and d["not_checkable"] == 0
    assert d["off_policy_fraction"] == 1.0 and d["totals"]["retemplate"] == 18
    assert d["totals"]["history"] == 3, "rollouts 0, 2, 4 rewrite their history"
    assert any("no tokenizer identity" in w for w in d["warnings"])
    assert all(len([p for p in d["examples"] if p["type"] == k]) <= 2 for k in d["totals"])


def test_cli_check_exit_codes_and_json(tmp_path: Path, tok: Any, builder: PromptBuilder, model_dir: Path,
                                       ident: TokenizerIdentity) -> None:
    runner = CliRunner()
    clean = write(tmp_path / "clean", on_policy_calls(tok, builder), ident)
    r = runner.invoke(app, ["check", clean.location, "--tokenizer", str(model_dir)])
    assert r.exit_code == 0, r.output
    assert "off-policy if re-templated" in r.stdout and "0.0%" in r.stdout
    bad = write(tmp_path / "bad", merge_calls(tok, builder)[0], ident)
    r = runner.invoke(app, ["check", bad.location, "--tokenizer", str(model_dir), "--json"])
    assert r.exit_code == 1, r.output
    d = json.loads(r.stdout)
    assert d["totals"]["retokenization"] == 1 and d["totals"]["retemplate"] == 1 and d["ok"] is False
    r = runner.invoke(app, ["check", bad.location, "--tokenizer", str(model_dir)])
    assert r.exit_code == 1 and "retokenization" in r.stdout
