"""OpenAI-style request validation and errors for `gymtape serve`.

Requests are parsed from raw JSON (orjson) and checked by hand rather than through pydantic
models: it is faster on the hot path, and every rule produces the exact OpenAI-style error a
client needs (`{"error": {"message", "type", "param", "code"}}`) naming the offending field.

Every value that ends up in a tape column is range-checked here, against that column's type
(`recorder/tape/_schema.py`): a value that does not fit is a 400 naming the field, never a
200 whose row then cannot be written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import orjson

from .engines._protocol import SamplingParams

TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")
ROLES = ("system", "developer", "user", "assistant", "tool")

# Limits of the tape columns the request fields land in (recorder/tape/_schema.py).
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Largest finite float32 (token logprobs are stored as float32).
FLOAT32_MAX = 3.4028234663852886e38


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
        if "infinity" not in str(e):
            raise APIError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        _raise_non_finite(body, e)
    if not isinstance(data, dict):
        raise APIError(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def _raise_non_finite(body: bytes, error: orjson.JSONDecodeError) -> None:
    """A number like 1e400 overflows a double: orjson only says where, so parse again (stdlib,
    off the hot path: only bodies that are errors anyway get here) to name the field."""
    def reject(constant: str) -> float:  # NaN / Infinity literals are not JSON either
        raise ValueError(constant)

    try:
        path = _first_non_finite(json.loads(body, parse_constant=reject), "")
    except (ValueError, RecursionError):  # not JSON after all, or nested deeper than we walk
        path = None
    if path is None:
        raise APIError(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    raise APIError(f"{path} is a number too large for a 64-bit float ({error}); numbers must be finite",
                   param=path) from None


def _first_non_finite(v: Any, path: str) -> str | None:
    if isinstance(v, float):
        return path if not math.isfinite(v) else None
    if isinstance(v, dict):
        children = ((f"{path}.{k}" if path else k, x) for k, x in v.items())
    elif isinstance(v, list):
        children = ((f"{path}[{i}]", x) for i, x in enumerate(v))
    else:
        return None
    return next((hit for p, x in children if (hit := _first_non_finite(x, p)) is not None), None)


def _number(d: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
        raise APIError(f"{key} must be a number in [{lo:g}, {hi:g}], got {v!r}", param=key)
    return float(v)


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    """An integer field; ``hi`` is the most its tape column (or engine) holds."""
    v = d.get(key)
    if v is None:
        return None
    if type(v) is not int or not lo <= v <= hi:
        raise APIError(f"{key} must be an integer in [{lo}, {hi}], got {v!r}", param=key)
    return v


def _flag(d: dict[str, Any], key: str) -> bool:
    v = d.get(key)
    if v is None or v is True or v is False:
        return bool(v)
    if type(v) is int and v in (0, 1):
        return bool(v)
    raise APIError(f"{key} must be true or false, got {v!r}", param=key)


def strict_bool(d: dict[str, Any], key: str, default: bool) -> bool:
    """A field that must be a JSON boolean: ``"no"`` or ``0`` is a 400, never silently true or false."""
    v = d.get(key)
    if v is None:
        return default
    if v is True or v is False:
        return v
    raise APIError(f"{key} must be true or false (a JSON boolean), got {v!r}", param=key)


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
    # Checked at C speed (set/map/min/max), not per element in Python: these lists are as long as
    # the conversation and arrive on every call of it.
    limit = min(vocab_size, INT32_MAX + 1)  # token IDs are int32 on the tape
    for f in ("prompt_token_ids", "generation_token_ids"):
        ids = m[f]
        if not isinstance(ids, list) or not set(map(type, ids)) <= {int}:
            raise APIError(f"{where}.{f} must be a list of integers", param=f"{where}.{f}")
        if ids and (min(ids) < 0 or max(ids) >= limit):
            bad = next(t for t in ids if not 0 <= t < limit)
            raise APIError(f"{where}.{f} holds token ID {bad}, outside this model's vocabulary [0, {limit})",
                           param=f"{where}.{f}")
    lp = m["generation_log_probs"]
    if not isinstance(lp, list) or not set(map(type, lp)) <= {int, float}:
        raise APIError(f"{where}.generation_log_probs must be a list of numbers", param=f"{where}.generation_log_probs")
    if lp and not (all(map(math.isfinite, lp)) and -FLOAT32_MAX <= min(lp) and max(lp) <= FLOAT32_MAX):
        bad = next(x for x in lp if not (math.isfinite(x) and -FLOAT32_MAX <= x <= FLOAT32_MAX))
        raise APIError(f"{where}.generation_log_probs holds {bad!r}; logprobs must be finite numbers within "
                       "float32 range, as the previous response returned them", param=f"{where}.generation_log_probs")
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
        calls = m.get("tool_calls")
        if calls is not None and role != "assistant":
            raise APIError(f"{where} is a {role} message; only assistant messages carry tool_calls",
                           param=f"{where}.tool_calls")
        if role == "assistant":
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
    if n is not None and not (type(n) is int and n == 1):
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
    # both checked even when both are sent: the first one wins, neither may be out of range
    max_completion_tokens = _int(data, "max_completion_tokens", 1, INT32_MAX)
    max_tokens = _int(data, "max_tokens", 1, INT32_MAX)
    if max_completion_tokens is not None:
        max_tokens = max_completion_tokens
    stop_ids = data.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(type(t) is int and 0 <= t < vocab_size for t in stop_ids):
        raise APIError(f"stop_token_ids must be a list of token IDs in the vocabulary [0, {vocab_size})",
                       param="stop_token_ids")
    kwargs = data.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise APIError("chat_template_kwargs must be an object", param="chat_template_kwargs")
    stream = _flag(data, "stream")
    if stream and not for_tokenize:
        raise APIError("stream=true is not supported yet; send stream=false", param="stream")
    return ChatRequest(
        model=data.get("model") if isinstance(data.get("model"), str) else None,
        messages=messages,
        tools=None if choice == "none" else tools,
        max_tokens=max_tokens,
        temperature=_number(data, "temperature", 1.0, 0.0, 100.0),
        top_p=_number(data, "top_p", 1.0, 1e-9, 1.0),
        top_k=_int(data, "top_k", -1, INT32_MAX) if data.get("top_k") is not None else -1,  # type: ignore[arg-type]
        # int64 on the tape, and exactly the range vLLM accepts
        seed=_int(data, "seed", INT64_MIN, INT64_MAX),
        stop_token_ids=tuple(stop_ids),
        logprobs=_flag(data, "logprobs"),
        return_tokens_as_token_ids=strict_bool(data, "return_tokens_as_token_ids", False),
        chat_template_kwargs=kwargs,
        add_generation_prompt=strict_bool(data, "add_generation_prompt", True),
        stream=bool(stream),
    )


def _token_ids(v: Any, where: str) -> list[int]:
    """A list of token IDs as the tape stores them (int32, not negative); None is empty."""
    if v is None:
        return []
    if not isinstance(v, list) or not set(map(type, v)) <= {int}:
        raise APIError(f"{where} must be a list of integer token IDs, got {_brief(v)}", param=where)
    if v and (min(v) < 0 or max(v) > INT32_MAX):
        bad = next(t for t in v if not 0 <= t <= INT32_MAX)
        raise APIError(f"{where} holds {bad}, not a token ID: token IDs are integers in [0, {INT32_MAX}]", param=where)
    return v


def _brief(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def parse_lookup(data: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """A ``/gymtape/lookup`` body: ``calls``, each ``{prompt_token_ids, generation_token_ids}``."""
    calls = data.get("calls")
    if not isinstance(calls, list):
        raise APIError("calls must be a list of {prompt_token_ids, generation_token_ids}", param="calls")
    out = []
    for i, c in enumerate(calls):
        if not isinstance(c, dict):
            raise APIError(f"calls[{i}] must be an object {{prompt_token_ids, generation_token_ids}}, got "
                           f"{_brief(c)}", param=f"calls[{i}]")
        out.append((_token_ids(c.get("prompt_token_ids"), f"calls[{i}].prompt_token_ids"),
                    _token_ids(c.get("generation_token_ids"), f"calls[{i}].generation_token_ids")))
    return out


# ---------------------------------------------------------------- OpenAPI (gymtape serve --openapi)
# The routes read raw JSON (above), so FastAPI cannot infer their bodies: these schemas describe
# them for /openapi.json (and for the schemathesis run over every route, tests/recorder/test_serve_fuzz.py).
# They describe what a well-formed request looks like; the parsers above stay the authority.

_TOKEN_LIST = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": INT32_MAX}}
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": list(ROLES)},
        "content": {"type": ["string", "null"]},
        "tool_calls": {"type": "array", "items": {"type": "object"}},
        "prompt_token_ids": _TOKEN_LIST,
        "generation_token_ids": _TOKEN_LIST,
        "generation_log_probs": {"type": "array", "items": {"type": "number", "maximum": 0}},
    },
}
_TOOLS = {"type": "array", "items": {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"type": "string", "enum": ["function"]},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "description": {"type": "string"}, "parameters": {"type": "object"}}}}}}
_CHAT_FIELDS = {
    "model": {"type": "string"},
    "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
    "tools": _TOOLS,
    "tool_choice": {"type": "string", "enum": ["auto", "none"]},
    "chat_template_kwargs": {"type": "object"},
}
CHAT_BODY = {"type": "object", "required": ["messages"], "properties": {
    **_CHAT_FIELDS,
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 100},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "seed": {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},
    "n": {"type": "integer", "enum": [1]},
    "stop_token_ids": _TOKEN_LIST,
    "logprobs": {"type": "boolean"},
    "top_logprobs": {"type": "integer", "enum": [0]},
    "return_tokens_as_token_ids": {"type": "boolean"},
    "stream": {"type": "boolean", "enum": [False]},
}}
TOKENIZE_BODY = {"oneOf": [
    {"type": "object", "required": ["messages"], "properties": {
        **_CHAT_FIELDS, "add_generation_prompt": {"type": "boolean"}}},
    {"type": "object", "required": ["prompt"], "properties": {
        "model": {"type": "string"}, "prompt": {"type": "string"}, "add_special_tokens": {"type": "boolean"}}},
]}
LOOKUP_BODY = {"type": "object", "required": ["calls"], "properties": {"calls": {"type": "array", "items": {
    "type": "object", "properties": {"prompt_token_ids": _TOKEN_LIST, "generation_token_ids": _TOKEN_LIST}}}}}
WEIGHTS_BODY = {"type": "object", "properties": {
    "path": {"type": "string", "description": "a save_pretrained directory to load the weights of"},
    "version": {"type": "integer", "minimum": 0, "maximum": INT64_MAX}}}
ERROR_BODY = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def openapi_body(schema: dict[str, Any]) -> dict[str, Any]:
    """A route's ``openapi_extra``: its JSON request body and its OpenAI-style error answers."""
    error = {"description": "an OpenAI-style error", "content": {"application/json": {"schema": ERROR_BODY}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {str(status): error for status in (400, 401, 403, 413, 415, 429)}}
