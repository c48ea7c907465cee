"""`gymtape check` on ingested NeMo Gym rollouts: every call re-templated from its rollout line.

The real Gym sample (example_single_tool_call, from Gym's repository) carries no token IDs, so
they are filled in here the way Gym's vLLM model server produces them: for each model call, the
agent's request (the task input + the output items before the call) goes through Gym's OWN
converter and server step (tests/replay/gym_server_convert.py, in a subprocess with Gym's
imports), is rendered with the embedded SmolLM2's chat template (it renders tool calls) and
tokenized; the call's own items, converted the same way, are the generated tokens. gymtape's
rebuild (recorder.gym_call_requests) is an independent implementation checked against that.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from cli import app
from recorder import GymConversionError, gym_call_requests, ingest_gym_jsonl
from replay import check_tape
from tests.conftest import GYM_SAMPLES, ROOT, load_jsonl, write_jsonl

SAMPLE = "example_single_tool_call_rollouts.jsonl"
HERMES = "hermes_math_rollouts.jsonl"
#: What Gym's converter and server import, installed apart from the venv (see the Makefile).
GYM_IMPORTS = ROOT / ".venv" / "gym-converter"
CONVERT = Path(__file__).with_name("gym_server_convert.py")
TEMPLATE = ROOT / "datasets" / "chat_templates" / "chatml_tools.jinja"
#: One place where a planted template differs: a tool result opens with '[' instead of '<'.
TOOL_RESPONSE, PLANTED_TOOL_RESPONSE = "'\\n<tool_response>\\n'", "'\\n[tool_response]\\n'"
TOOLS_LINE, PLANTED_TOOLS_LINE = "You may call one or more functions", "You may call one or several functions"
#: Gym's chat request for each Responses request, keyed by the request's JSON.
Gym = dict[bytes, dict[str, Any]]


def gym_convert(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gym's chat request for each Responses request (see gym_server_convert.py): one
    subprocess for all (Gym's imports take seconds)."""
    if not GYM_IMPORTS.is_dir():
        pytest.skip(f"Gym's converter imports are not installed at {GYM_IMPORTS} (make venv installs them)")
    env = {**os.environ, "PYTHONPATH": str(GYM_IMPORTS)}
    done = subprocess.run([sys.executable, str(CONVERT)], input=orjson.dumps(requests), capture_output=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return orjson.loads(done.stdout)


def is_model_item(item: dict[str, Any]) -> bool:
    return item.get("type") in ("reasoning", "function_call") or (
        item.get("type") == "message" and item.get("role") == "assistant")


def model_calls(output: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """``(first, last)`` output index of each model call: a run of model-produced items."""
    calls: list[tuple[int, int]] = []
    for i, item in enumerate(output):
        if is_model_item(item):
            if calls and calls[-1][1] == i - 1:
                calls[-1] = (calls[-1][0], i)
            else:
                calls.append((i, i))
    return calls


def request(params: dict[str, Any], output: list[dict[str, Any]], upto: int) -> dict[str, Any]:
    """The agent's Responses request after ``output[:upto]`` (as Gym sends it: nulls left out)."""
    p = {k: v for k, v in copy.deepcopy(params).items() if v is not None}
    p["input"] = p["input"] + copy.deepcopy(output[:upto])
    return p


def for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the engine hands the template: tool-call arguments as objects (vLLM and gymtape serve
    both parse the JSON string)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def render(tok: Any, template: str, messages: list[dict[str, Any]], tools: Any, gen_prompt: bool) -> str:
    return tok.apply_chat_template(for_template(messages), tools=tools, chat_template=template, tokenize=False,
                                   add_generation_prompt=gen_prompt)


def enc(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def asks_of(lines: list[dict[str, Any]]) -> list[tuple[int, int, int, dict[str, Any], dict[str, Any]]]:
    """``(line, call, last item, request before the call, request through the call)`` of each call."""
    out = []
    for n, line in enumerate(lines):
        output = line["response"]["output"]
        for k, (first, last) in enumerate(model_calls(output)):
            out.append((n, k, last, request(line["responses_create_params"], output, first),
                        request(line["responses_create_params"], output, last + 1)))
    return out


def fill_tokens(lines: list[dict[str, Any]], gym: Gym, tok: Any, template: str,
                planted: dict[tuple[int, int], str] | None = None) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Put each model call's token fields on its last output item, as Gym's vLLM model server
    does; ``planted[(line, call)]`` renders that call's prompt with another template. Returns the
    lines and each call's prompt text."""
    lines = copy.deepcopy(lines)
    prompts: list[list[str]] = [[] for _ in lines]
    for n, k, last, before, upto in asks_of(lines):
        ask, through = gym[orjson.dumps(before)], gym[orjson.dumps(upto)]
        prompt = render(tok, (planted or {}).get((n, k), template), ask["messages"], ask["tools"], True)
        full = render(tok, template, through["messages"], through["tools"], False)
        plain = render(tok, template, ask["messages"], ask["tools"], True)
        assert full.startswith(plain) and full.endswith("<|im_end|>\n"), (plain, full)
        generated = full[len(plain):-1]  # the reply, ending with the end-of-turn token
        gen = enc(tok, generated)
        item = lines[n]["response"]["output"][last]
        item["prompt_token_ids"] = enc(tok, prompt)
        item["generation_token_ids"] = gen
        item["generation_log_probs"] = [-0.125] * len(gen)
        prompts[n].append(prompt)
    return lines, prompts


@pytest.fixture(scope="module")
def gym() -> Gym:
    """Gym's chat request for every request the tests send, keyed by the request's JSON."""
    if not GYM_SAMPLES.is_dir():
        pytest.skip(f"real NeMo Gym samples not found at {GYM_SAMPLES} (only in the gymtape workspace)")
    asks = [a for _, _, _, before, upto in asks_of(load_jsonl(GYM_SAMPLES / SAMPLE)) for a in (before, upto)]
    asks += [before for _, _, _, before, _ in asks_of(load_jsonl(GYM_SAMPLES / HERMES))]
    keys = list(dict.fromkeys(orjson.dumps(a) for a in asks))
    return dict(zip(keys, gym_convert([orjson.loads(k) for k in keys])))


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def sample(gym_samples: Path) -> list[dict[str, Any]]:
    return load_jsonl(gym_samples / SAMPLE)


def ingest(lines: list[dict[str, Any]], tmp_path: Path, name: str) -> Path:
    tape = tmp_path / name
    report = ingest_gym_jsonl([write_jsonl(tmp_path / f"{name}.jsonl", lines)], tape, strict=True)
    assert report.rollouts == len(lines) and not report.errors
    return tape


def test_rebuilt_requests_equal_gyms_own_conversion(gym_samples: Path, gym: Gym) -> None:
    """Byte for byte, for every model call of both real samples (tool calls; hermes: tokens on
    each call's first item)."""
    asks, mine = [], []
    for name in (SAMPLE, HERMES):
        for line in load_jsonl(gym_samples / name):
            output = line["response"]["output"]
            calls = model_calls(output)
            tokened = [i for i, it in enumerate(output) if "prompt_token_ids" in it]
            indices = tokened or [last for _, last in calls]
            assert len(indices) == len(calls)
            asks += [request(line["responses_create_params"], output, first) for first, _ in calls]
            mine += gym_call_requests(orjson.dumps(line["responses_create_params"]), orjson.dumps(line["response"]),
                                      indices)
    theirs = [gym[orjson.dumps(a)] for a in asks]
    assert len(mine) == len(theirs) == 16
    for (messages, tools), gym in zip(mine, theirs):
        assert orjson.dumps(messages) == orjson.dumps(gym["messages"])
        assert orjson.dumps(tools) == orjson.dumps(gym["tools"])


def test_check_re_templates_every_ingested_call_and_flags_a_planted_difference(
        sample: list[dict[str, Any]], gym: Gym, tok: Any, model_dir: Path, tmp_path: Path) -> None:
    template = TEMPLATE.read_text()
    lines, _ = fill_tokens(sample, gym, tok, template)
    tape = ingest(lines, tmp_path, "clean")
    report = check_tape(tape, model_dir)
    assert report.calls == 8 and report.rebuilt_calls == 8
    assert report.not_checkable == 0 and report.checkable_calls == 8
    assert report.totals["retemplate"] == 0 and report.ok, report.to_dict()["examples"]
    assert report.off_policy_fraction == 0.0 and report.chat_template == "tokenizer"

    # the second call of the first two-call rollout was sampled from a prompt whose tool result
    # was templated differently: check flags that call, at the token where it differs
    assert TOOL_RESPONSE in template
    planted_template = template.replace(TOOL_RESPONSE, PLANTED_TOOL_RESPONSE)
    lines, prompts = fill_tokens(sample, gym, tok, template, planted={(2, 1): planted_template})
    tape = ingest(lines, tmp_path, "planted")
    report = check_tape(tape, model_dir)
    assert report.not_checkable == 0 and report.totals["retemplate"] == 1
    assert sum(report.totals.values()) == 1
    (problem,) = [p for p in report.examples if p.type == "retemplate"]
    prompt = prompts[2][1]
    position = len(enc(tok, prompt[: prompt.index("[tool_response]")]))
    assert problem.call_index == 1 and problem.detail["position"] == position
    assert problem.detail["recorded"]["text"].startswith("[tool_response]")
    assert problem.detail["template"]["text"].startswith("<tool_response>")
    rid = next(v.rollout_id for v in report.verdicts if v.problems)
    assert [v.rollout_id for v in report.verdicts if v.problems] == [rid] and problem.rollout_id == rid


def test_cli_check_with_chat_template_and_the_tapes_recorded_template(
        sample: list[dict[str, Any]], gym: Gym, tok: Any, model_dir: Path, tmp_path: Path) -> None:
    template = TEMPLATE.read_text()
    lines, prompts = fill_tokens(sample, gym, tok, template)
    tape = ingest(lines, tmp_path, "tape")
    runner = CliRunner()
    ok = runner.invoke(app, ["check", str(tape), "--tokenizer", str(model_dir), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["not_checkable"] == 0

    # a template that differs in one place (the tools section every call has) flags every call there
    assert TOOLS_LINE in template
    other = tmp_path / "other.jinja"
    other.write_text(template.replace(TOOLS_LINE, PLANTED_TOOLS_LINE))
    result = runner.invoke(app, ["check", str(tape), "--tokenizer", str(model_dir), "--chat-template", str(other),
                                 "--json"])
    assert result.exit_code == 1, result.output
    d = json.loads(result.stdout)
    assert d["chat_template"] == str(other) and d["not_checkable"] == 0
    assert d["totals"]["retemplate"] == d["calls"] == 8 and d["off_policy_fraction"] == 1.0
    text = prompts[0][0]
    position = len(enc(tok, text[: text.index(" more functions")]))
    assert {e["position"] for e in d["examples"] if e["type"] == "retemplate"} == {position}
    example = next(e for e in d["examples"] if e["type"] == "retemplate")
    assert example["recorded"]["text"].startswith(" more") and example["template"]["text"].startswith(" several")

    # a tape recorded by `gymtape serve --chat-template FILE` is re-templated with FILE by default
    (tape / "runs").mkdir(exist_ok=True)
    (tape / "runs" / "w1.json").write_bytes(orjson.dumps({"command": "gymtape serve",
                                                          "config": {"chat_template": str(other)}}))
    report = check_tape(tape, model_dir)
    assert report.chat_template == f"recorded: {other}" and report.totals["retemplate"] == 8
    assert check_tape(tape, model_dir, chat_template=TEMPLATE).ok  # the flag wins
    other.unlink()  # recorded but not found here: the tokenizer's template, and a warning saying so
    report = check_tape(tape, model_dir)
    assert report.ok and report.chat_template == "tokenizer"
    assert any("not found here" in w and str(other) in w for w in report.warnings)


def test_calls_that_cannot_be_rebuilt_stay_not_checkable_with_the_reason(
        sample: list[dict[str, Any]], gym: Gym, tok: Any, model_dir: Path, tmp_path: Path) -> None:
    lines, _ = fill_tokens(sample, gym, tok, TEMPLATE.read_text())
    lines[2]["responses_create_params"]["previous_response_id"] = "resp_earlier"  # history kept server-side
    report = check_tape(ingest(lines, tmp_path, "t"), model_dir)
    assert report.rebuilt_calls == 6 and report.not_checkable == 2 and report.checkable_calls == 6
    (warning,) = [w for w in report.warnings if "not checkable" in w]
    assert warning.startswith("2 ingested call(s) stay not checkable") and "previous_response_id" in warning


def test_gym_call_requests_refuses_items_without_a_chat_form() -> None:
    params = {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}
    response = {"output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]}]}
    with pytest.raises(GymConversionError, match=r"input\[0\]\.content\[0\] is a 'input_image' part"):
        gym_call_requests(params, response, [0])
    params = {"input": "hi", "instructions": "Be brief.", "tools": [{"type": "web_search"}]}
    with pytest.raises(GymConversionError, match=r"tools\[0\] is a 'web_search' tool"):
        gym_call_requests(params, response, [0])
    del params["tools"]
    with pytest.raises(GymConversionError, match=r"call_item_indices\[0\] is 1"):
        gym_call_requests(params, response, [1])
    ((messages, tools),) = gym_call_requests(params, response, [0])
    assert tools is None and messages == [{"content": "Be brief.", "role": "system"},
                                          {"content": [{"type": "text", "text": "hi"}], "role": "user"}]
    output = [{"type": "reasoning", "summary": [{"type": "summary_text", "text": "think"}]},
              {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x"}]},
              {"type": "message", "role": "user", "content": "more"},
              {"type": "message", "role": "assistant", "content": "y"}]
    _, (second, _) = gym_call_requests(params, {"output": output}, [1, 3])
    assert second[2:] == [{"role": "assistant", "content": "<think>think</think>x"},
                          {"content": "more", "role": "user"}]
    output[2] = {"type": "compaction", "encrypted_content": "..."}
    with pytest.raises(GymConversionError, match=r"output\[2\] is a 'compaction' item"):
        gym_call_requests(params, {"output": output}, [1, 3])
