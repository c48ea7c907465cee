"""`gymtape serve` keeps multi-call conversations on-policy, on both engines, and records them exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from recorder import Tape
from tests.servers import Server, start_gymtape_serve

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _tool_turn(city: str, call_id: str, result: str, answer: str) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": f"What is the weather in {city}?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "%s"}' % city}}]},
        {"role": "tool", "tool_call_id": call_id, "content": result},
        {"role": "assistant", "content": answer},
    ]


FIRST = [{"role": "developer", "content": "You answer weather questions with the get_weather tool."},
         *_tool_turn("Berlin", "call_1", "11C, rain", "It is 11C and raining in Berlin."),
         {"role": "user", "content": "And what about Paris? Describe it in a few words."}]


def _chat(server: Server, messages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    body = {"model": "smol", "messages": messages, "tools": TOOLS, "temperature": 1.5, "max_tokens": 20,
            "logprobs": True, "top_logprobs": 0, "return_tokens_as_token_ids": True, **kw}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _as_history(response: dict[str, Any]) -> dict[str, Any]:
    """The assistant message as a Gym-style client sends it back: token fields included."""
    m = response["choices"][0]["message"]
    return {k: v for k, v in m.items() if v is not None}


def _naive(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k not in ("prompt_token_ids", "generation_token_ids", "generation_log_probs")}


def _tokenize(server: Server, messages: list[dict[str, Any]]) -> list[int]:
    r = httpx.post(f"{server.url}/tokenize", json={"model": "smol", "messages": messages, "tools": TOOLS}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def run_conversation(server: Server) -> tuple[list[dict[str, Any]], int]:
    """Three calls: first reply, a follow-up user turn, then a tool result. Returns responses and seed.

    The seed is the first whose reply does not survive re-templating (decode → parse → render →
    encode gives other IDs), so the check below is a real one: without the splice the second
    prompt would differ from what the model generated.
    """
    for seed in range(32):
        r1 = _chat(server, FIRST, seed=seed)
        a1 = _as_history(r1)
        second = FIRST + [a1, {"role": "user", "content": "Please check it with the tool."}]
        model_prefix = a1["prompt_token_ids"] + a1["generation_token_ids"]
        naive = _tokenize(server, FIRST + [_naive(a1), second[-1]])
        if naive[: len(model_prefix)] != model_prefix:
            break
    else:
        pytest.fail("no seed in 0..31 produced a reply that re-templates differently; widen the search")
    r2 = _chat(server, second, seed=seed)
    a2 = _as_history(r2)
    third = second + [a2, {"role": "tool", "tool_call_id": "call_2", "content": "18C, sun"}]
    r3 = _chat(server, third, seed=seed)
    assert _tokenize(server, third) == r3["prompt_token_ids"], "/tokenize must give the chat endpoint's spliced prompt"
    return [r1, r2, r3], seed


def check_splice_and_tape(server: Server, tape: Path, responses: list[dict[str, Any]]) -> None:
    for prev, cur in zip(responses, responses[1:]):
        pm = prev["choices"][0]["message"]
        model_prefix = pm["prompt_token_ids"] + pm["generation_token_ids"]
        prompt = cur["prompt_token_ids"]
        assert prompt[: len(model_prefix)] == model_prefix, "the next prompt must start with the model's exact IDs"
        assert cur["choices"][0]["message"]["prompt_token_ids"] == prompt
    rollouts = {r["gymtape"]["rollout_id"] for r in responses}
    assert len(rollouts) == 1 and [r["gymtape"]["call_index"] for r in responses] == [0, 1, 2]
    assert server.stop() in (0, -15), server.log_tail()  # uvicorn re-raises SIGTERM after a graceful shutdown
    t = Tape(tape)
    assert t.writers(), "shutdown must close the tape writer (its manifest is written last)"
    prompts = t.prompts()
    for r in responses:
        assert prompts[r["id"]].tolist() == r["prompt_token_ids"], "the tape must rebuild the exact prompt"
    calls = t.calls().filter(rollout_id=rollouts.pop()).sort("call_index").collect()
    for row, r in zip(calls.iter_rows(named=True), responses):
        m = r["choices"][0]["message"]
        assert row["generation_ids"] == m["generation_token_ids"]
        assert np.array_equal(np.float32(row["generation_logprobs"]), np.float32(m["generation_log_probs"]))
        assert row["logprobs_kind"] == "raw" and row["engine"] in ("hf", "vllm")
        assert (row["tools_json"] is not None) == (row["call_index"] == 0), "tools are stored once per rollout"


def test_vllm_engine_conversation_is_on_policy_and_matches_vllm(vllm_upstream: Server, model_dir: Path,
                                                                tmp_path: Path) -> None:
    tape = tmp_path / "tape"
    server = start_gymtape_serve(tmp_path, "--engine", "vllm", "--upstream", vllm_upstream.url,
                                 "--tokenizer", str(model_dir), "--tape", str(tape))
    try:
        responses, seed = run_conversation(server)
        # The same prompt sent straight to vLLM with the same seed gives the same tokens and logprobs.
        for r in responses:
            direct = httpx.post(f"{vllm_upstream.url}/v1/completions", timeout=300, json={
                "model": "smol", "prompt": r["prompt_token_ids"], "max_tokens": 20, "temperature": 1.5, "seed": seed,
                "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False, "stop_token_ids": [2]}).json()
            m = r["choices"][0]["message"]
            assert direct["choices"][0]["token_ids"] == m["generation_token_ids"]
            np.testing.assert_allclose(direct["choices"][0]["logprobs"]["token_logprobs"], m["generation_log_probs"],
                                       atol=1e-6, err_msg="served logprobs must be vLLM's own")
        check_splice_and_tape(server, tape, responses)
    finally:
        server.stop()


def test_hf_engine_conversation_is_on_policy_and_logprobs_match_a_forward_pass(model_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tape = tmp_path / "tape"
    server = start_gymtape_serve(tmp_path, "--engine", "hf", "--model", str(model_dir), "--tape", str(tape),
                                 "--served-model-name", "smol")
    try:
        responses, _ = run_conversation(server)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        for r in responses:
            m = r["choices"][0]["message"]
            ids = torch.tensor([m["prompt_token_ids"] + m["generation_token_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            n = len(m["prompt_token_ids"])
            ref = logp[n - 1 : -1].gather(1, ids[0, n:, None])[:, 0]
            np.testing.assert_allclose(ref.numpy(), m["generation_log_probs"], atol=1e-4,
                                       err_msg="hf engine logprobs must be the model's raw logprobs")
        check_splice_and_tape(server, tape, responses)
    finally:
        server.stop()


def test_vllm_engine_without_upstream_starts_and_stops_its_own_vllm(model_dir: Path, tmp_path: Path) -> None:
    """One command serves a model: gymtape starts vLLM, health-checks it, keeps its log, stops it."""
    import os

    from tests.servers import VLLM_PYTHON

    if not VLLM_PYTHON.exists():
        if os.environ.get("GYMTAPE_REQUIRE_VLLM"):
            pytest.fail(f"vLLM venv not found at {VLLM_PYTHON}")
        pytest.skip(f"vLLM venv not found at {VLLM_PYTHON}: run `make test`")
    log = tmp_path / "own-vllm.log"
    server = start_gymtape_serve(
        tmp_path, "--engine", "vllm", "--model", str(model_dir), "--dtype", "float32", "--max-model-len", "1024",
        "--vllm-log", str(log), "--vllm-arg=--enforce-eager", "--vllm-arg=--no-enable-chunked-prefill",
        name="serve-own", timeout=900, env={"GYMTAPE_VLLM_PYTHON": str(VLLM_PYTHON), "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        r = _chat(server, FIRST[:1] + FIRST[-1:], seed=1, max_tokens=4)
        assert len(r["choices"][0]["message"]["generation_token_ids"]) > 0
        assert "Starting vLLM" in log.read_text(), "the started vLLM's log is kept where --vllm-log says"
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        wanted = ("vllm.entrypoints", str(model_dir), "--max-model-len 1024")
        vllm_pids = [p for p in pids if all(w in _cmdline(p) for w in wanted)]
        assert vllm_pids, "the started vLLM must be running while gymtape serves"
    finally:
        server.stop()
    assert all(not Path(f"/proc/{p}").exists() or "zombie" in _status(p) for p in vllm_pids), \
        "stopping gymtape must stop the vLLM it started"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"
