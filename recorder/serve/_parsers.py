"""Turn generated text into OpenAI message fields: reasoning and tool calls.

Parsers only read text; the token IDs returned to the client are always the generated ones,
so a parser's choice of whitespace or key order can never leak into training data.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Protocol

import orjson


class ToolParser(Protocol):
    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """Split text into (content without the tool calls, OpenAI tool_calls)."""
        ...


class HermesToolParser:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen2.5/3, SmolLM-style).

    A block whose JSON does not parse stays in the content: the client sees exactly what the
    model wrote rather than a guessed call.
    """

    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        calls: list[dict[str, Any]] = []
        kept: list[str] = []
        pos = 0
        for m in self._BLOCK.finditer(text):
            try:
                obj = orjson.loads(m.group(1))
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                continue
            args = obj.get("arguments", obj.get("parameters", {}))
            kept.append(text[pos : m.start()])
            pos = m.end()
            calls.append({
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else orjson.dumps(args).decode()},
            })
        kept.append(text[pos:])
        content = "".join(kept).strip() if calls else text
        return (content or None), calls


TOOL_PARSERS: dict[str, type] = {"hermes": HermesToolParser}


def split_reasoning(text: str, start: str = "<think>", end: str = "</think>") -> tuple[str | None, str]:
    """Split ``<think>…</think>`` reasoning from the answer.

    Handles templates that put the opening tag in the prompt (the text then has only the
    closing tag). Without a closing tag the text is all answer.
    """
    close = text.find(end)
    if close < 0:
        return None, text
    head = text[:close]
    open_ = head.find(start)
    reasoning = head[open_ + len(start) :] if open_ >= 0 else head
    return reasoning.strip("\n"), text[close + len(end) :].lstrip("\n")
