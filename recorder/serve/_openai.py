"""OpenAI-style request validation and errors for `gymtape serve`.

Requests are parsed from raw JSON (orjson) and checked by hand rather than through pydantic
models: it is faster on the hot path, and every rule produces the exact OpenAI-style error a
client needs (`{"error": {"message", "type", "param", "code"}}`) naming the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from .engines._protocol import SamplingParams

TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered to the client as OpenAI-style JSON."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A validated chat request (or /tokenize request)."""

    model: str | None
    #: Messages as sent, token fields included (validated).
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop_token_ids: tuple[int, ...]
    logprobs: bool
    return_tokens_as_token_ids: bool
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    add_generation_prompt: bool = True
    stream: bool = False

    def sampling(self, max_tokens: int, stop_token_ids: tuple[int, ...]) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed,
                              stop_token_ids=tuple(dict.fromkeys(self.stop_token_ids + stop_token_ids)))


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise APIError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def _number(d: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
        raise APIError(f"{key} must be a number in [{lo:g}, {hi:g}], got {v!r}", param=key)
    return float(v)


def _int(d: dict[str, Any], key: str, lo: int, hi: int | None = None) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rule = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise APIError(f"{key} must be an integer {rule}, got {v!r}", param=key)
    return v


def _content_text(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            if isinstance(p, dict) and p.get("type") in ("text", "input_text", "output_text") and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise APIError(f"{where}.content[{i}] must be a text part ({{'type': 'text', 'text': ...}})",
                               param=f"{where}.content")
        return "".join(parts)
    raise APIError(f"{where}.content must be a string, a list of text parts or null", param=f"{where}.content")


def _token_fields(m: dict[str, Any], where: str, vocab_size: int) -> None:
    present = [f for f in TOKEN_FIELDS if m.get(f) is not None]
    if not present:
        return
    if len(present) != 3:
        missing = [f for f in TOKEN_FIELDS if f not in present]
        raise APIError(f"{where} carries {', '.join(present)} but not {', '.join(missing)}; send all three "
                       "fields exactly as the previous response returned them", param=where)
    for f in ("prompt_token_ids", "generation_token_ids"):
        ids = m[f]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise APIError(f"{where}.{f} must be a list of integers", param=f"{where}.{f}")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(f"{where}.{f} holds token ID {bad}, outside this model's vocabulary [0, {vocab_size})",
                           param=f"{where}.{f}")
    lp = m["generation_log_probs"]
    if not isinstance(lp, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in lp):
        raise APIError(f"{where}.generation_log_probs must be a list of numbers", param=f"{where}.generation_log_probs")
    if len(lp) != len(m["generation_token_ids"]):
        raise APIError(f"{where}: generation_token_ids has {len(m['generation_token_ids'])} entries but "
                       f"generation_log_probs has {len(lp)}; they must be the same length", param=where)


def _messages(data: dict[str, Any], vocab_size: int) -> list[dict[str, Any]]:
    msgs = data.get("messages")
    if msgs is None:
        raise APIError("messages is required", param="messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(f"{where} must be an object", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise APIError(f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}", param=f"{where}.role")
        m = dict(m)
        m["content"] = _content_text(m.get("content"), where)
        if role == "assistant":
            calls = m.get("tool_calls")
            if calls is not None and not isinstance(calls, list):
                raise APIError(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
            for j, c in enumerate(calls or []):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise APIError(f"{where}.tool_calls[{j}] must be {{'type': 'function', 'function': "
                                   "{'name': ..., 'arguments': ...}}", param=f"{where}.tool_calls")
            _token_fields(m, where, vocab_size)
        elif any(m.get(f) is not None for f in TOKEN_FIELDS):
            raise APIError(f"{where} is a {role} message; only assistant messages carry token fields", param=where)
        out.append(m)
    return out


def _tools(data: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = data.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise APIError("tools must be a list", param="tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}",
                           param=f"tools[{i}]")
    return tools or None


_UNSUPPORTED = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": None,
    "stop": None,
}


def parse_chat(data: dict[str, Any], *, vocab_size: int, for_tokenize: bool = False) -> ChatRequest:
    """Validate a Chat Completions (or /tokenize) body; raises APIError naming the field."""
    messages = _messages(data, vocab_size)
    tools = _tools(data)
    n = data.get("n")
    if n not in (None, 1):
        raise APIError(f"n must be 1 (got {n!r}): request several completions as separate calls", param="n")
    for key, neutral in _UNSUPPORTED.items():
        v = data.get(key)
        if v not in (None, neutral, [], {}):
            raise APIError(f"{key} is not supported by gymtape serve (got {v!r})", param=key)
    top_logprobs = _int(data, "top_logprobs", 0, 20)
    if top_logprobs:
        raise APIError("top_logprobs > 0 is not supported: gymtape returns the sampled token's logprob only",
                       param="top_logprobs")
    choice = data.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise APIError(f"tool_choice {choice!r} is not supported; use 'auto' or 'none'", param="tool_choice")
    max_tokens = _int(data, "max_completion_tokens", 1) or _int(data, "max_tokens", 1)
    stop_ids = data.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in stop_ids):
        raise APIError("stop_token_ids must be a list of token IDs in the vocabulary", param="stop_token_ids")
    kwargs = data.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise APIError("chat_template_kwargs must be an object", param="chat_template_kwargs")
    stream = data.get("stream") or False
    if stream and not for_tokenize:
        raise APIError("stream=true is not supported yet; send stream=false", param="stream")
    return ChatRequest(
        model=data.get("model") if isinstance(data.get("model"), str) else None,
        messages=messages,
        tools=None if choice == "none" else tools,
        max_tokens=max_tokens,
        temperature=_number(data, "temperature", 1.0, 0.0, 100.0),
        top_p=_number(data, "top_p", 1.0, 1e-9, 1.0),
        top_k=_int(data, "top_k", -1) if data.get("top_k") is not None else -1,  # type: ignore[arg-type]
        seed=_int(data, "seed", -(2**63)),
        stop_token_ids=tuple(stop_ids),
        logprobs=bool(data.get("logprobs")),
        return_tokens_as_token_ids=bool(data.get("return_tokens_as_token_ids")),
        chat_template_kwargs=kwargs,
        add_generation_prompt=bool(data.get("add_generation_prompt", True)),
        stream=bool(stream),
    )
