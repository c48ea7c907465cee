"""From chat messages to the exact prompt token IDs: chat template + on-policy splice.

The server never trusts re-rendered text for tokens the model already produced: when the
request carries message-level token IDs, the prompt is the model's own prefix spliced into the
freshly templated prompt (recorder.onpolicy.splice_prefix). Templates are rendered to text and
then encoded without special-token insertion, so the IDs are exactly what the template says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ._config import ServeConfigError
from ._openai import TOKEN_FIELDS, APIError
from ._splice import SpliceError, splice_prefix


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    #: The (prompt IDs, generation IDs) of the assistant message spliced in, or None.
    anchor: tuple[list[int], list[int]] | None
    #: Request messages as stored on the tape (token fields removed, content normalised).
    messages: list[dict[str, Any]]


class PromptBuilder:
    """Renders messages with a tokenizer's chat template and applies the on-policy splice."""

    def __init__(self, tokenizer: Any, *, chat_template: str | Path | None = None, eos_token: str | None = None,
                 retemplate: bool = False) -> None:
        self.tokenizer = tokenizer
        #: Stock-server mode: the prompt is always the re-templated text (see ServeConfig.retemplate).
        self.retemplate = retemplate
        if chat_template is not None:
            p = Path(chat_template)
            tokenizer.chat_template = p.read_text() if p.exists() else str(chat_template)
        if not tokenizer.chat_template:
            raise ServeConfigError("the tokenizer has no chat template; pass --chat-template")
        eos = eos_token or tokenizer.eos_token
        self.eos_token_id: int = tokenizer.convert_tokens_to_ids(eos)
        if self.eos_token_id is None or self.eos_token_id == tokenizer.unk_token_id:
            raise ServeConfigError(f"end-of-turn token {eos!r} is not in the vocabulary; pass --eos-token")
        self.vocab_size = len(tokenizer)
        self._developer_ok = "developer" in tokenizer.chat_template
        #: The most characters one token stands for (its vocabulary string: one character per byte
        #: for byte-level BPE, the longest added/special token included): a text of C characters
        #: is at least C / max_token_chars tokens, however it is tokenized.
        self.max_token_chars: int = max(map(len, tokenizer.get_vocab()), default=1) or 1
        #: The Rust tokenizer behind a fast HF tokenizer (None: a slow one). Called directly on the
        #: hot path when that is exactly what the HF wrapper would do (see :meth:`encode`, :meth:`decode`):
        #: the wrapper's Python costs more than the tokenizing of a short prompt itself.
        self._backend: Any = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) \
            else None

    def encode(self, text: str) -> list[int]:
        """``tokenizer.encode(text, add_special_tokens=False)``: the backend's own encode when the
        wrapper would only call it (no truncation, padding or special-token splitting configured)."""
        b = self._backend
        if (b is not None and b.truncation is None and b.padding is None
                and b.encode_special_tokens == getattr(self.tokenizer, "split_special_tokens", False)):
            return b.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        """``tokenizer.decode(ids, skip_special_tokens=False)``: the backend's own decode when the
        wrapper would return it unchanged (no clean-up of tokenization spaces)."""
        b = self._backend
        if b is not None and not self.tokenizer.clean_up_tokenization_spaces:
            return b.decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def min_prompt_tokens(self, messages: list[dict[str, Any]]) -> tuple[int, int, int]:
        """A lower bound on the prompt's length, from lengths alone (no template, no tokenizer),
        with what it is made of: ``(bound, characters of text counted, token IDs counted)``.

        Counted: the spliced model prefix (the last assistant message's prompt + generation IDs,
        which the prompt starts with) and the text of every non-assistant message after it (a
        template renders those; assistant text is left out, as templates may drop earlier
        reasoning). Each token stands for at most ``max_token_chars`` characters.
        """
        start, prefix = 0, 0
        for i in range(len(messages) - 1, -1, -1):
            m = messages[i]
            if m["role"] == "assistant" and (m.get("generation_token_ids") or m.get("prompt_token_ids")):
                start, prefix = i + 1, len(m.get("prompt_token_ids") or ()) + len(m.get("generation_token_ids") or ())
                break
        chars = sum(len(m.get("content") or "") for m in messages[start:] if m["role"] != "assistant")
        return prefix + self.min_text_tokens(chars), chars, prefix

    def min_text_tokens(self, chars: int) -> int:
        """The fewest tokens a text of ``chars`` characters can be."""
        return -(-chars // self.max_token_chars)

    def check_fits(self, messages: list[dict[str, Any]], max_model_len: int, completion_tokens: int) -> None:
        """Refuse, before templating and tokenizing (whose cost grows with the text), messages
        that cannot fit ``max_model_len`` with ``completion_tokens`` more: a 400 naming the limit."""
        bound, chars, prefix = self.min_prompt_tokens(messages)
        if bound + completion_tokens > max_model_len:
            ids = f"{prefix} token IDs of the last assistant message and " if prefix else ""
            raise APIError(
                f"This model's maximum context length is {max_model_len} tokens. These messages cannot fit it: "
                f"they hold {ids}{chars} characters of text (one token stands for at most {self.max_token_chars}), "
                f"at least {bound} prompt tokens, plus {completion_tokens} for the completion. Shorten the messages.",
                param="messages", code="context_length_exceeded")

    def _template_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for m in messages:
            t = {k: v for k, v in m.items() if k not in TOKEN_FIELDS}
            if t["role"] == "developer" and not self._developer_ok:
                t["role"] = "system"
            if t.get("tool_calls"):
                t["tool_calls"] = [_tool_call_for_template(c) for c in t["tool_calls"]]
            out.append(t)
        return out

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *,
               add_generation_prompt: bool, kwargs: dict[str, Any] | None = None) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **(kwargs or {})
            )
        except Exception as e:  # jinja errors: the template rejected these messages
            raise APIError(f"the chat template could not render these messages: {e}", param="messages") from e
        if not isinstance(text, str):  # e.g. chat_template_kwargs {"return_dict": true}
            raise APIError(f"the chat template rendered {type(text).__name__}, not text: check chat_template_kwargs",
                           param="chat_template_kwargs")
        return self.encode(text)

    def build(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
              kwargs: dict[str, Any] | None = None, *, add_generation_prompt: bool = True) -> Prompt:
        """The prompt IDs for a request: templated, with the last model turn spliced in."""
        tmsgs = self._template_messages(messages)
        stored = [_stored_message(m) for m in messages]
        anchor_at = None
        for i in range(len(messages) - 1, -1, -1):
            m = messages[i]
            if m["role"] == "assistant" and (m.get("generation_token_ids") or m.get("prompt_token_ids")):
                anchor_at = i
                break
        full = self.render(tmsgs, tools, add_generation_prompt=add_generation_prompt, kwargs=kwargs)
        if anchor_at is None:
            return Prompt(full, None, stored)
        m = messages[anchor_at]
        if self.retemplate:  # what a stock server samples from; the IDs still name the rollout
            return Prompt(full, (list(m["prompt_token_ids"]), list(m["generation_token_ids"])), stored)
        prefix = self.render(tmsgs[: anchor_at + 1], tools, add_generation_prompt=False, kwargs=kwargs)
        model_prefix = list(m["prompt_token_ids"]) + list(m["generation_token_ids"])
        try:
            ids = splice_prefix(model_prefix, prefix, full, self.eos_token_id, tokenizer=self.tokenizer)
        except SpliceError as e:
            raise APIError(f"messages[{anchor_at}]: cannot splice its token IDs into the prompt: {e}",
                           param=f"messages[{anchor_at}]", code="splice_failed") from e
        return Prompt(ids, (list(m["prompt_token_ids"]), list(m["generation_token_ids"])), stored)


def _tool_call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    """HF chat templates expect arguments as a dict; OpenAI sends a JSON string."""
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = orjson.loads(args)
        except orjson.JSONDecodeError:
            pass
    return {**call, "function": fn}


def _stored_message(m: dict[str, Any]) -> dict[str, Any]:
    """What the tape keeps of a request message: its token fields live in the calls already."""
    return {k: v for k, v in m.items() if k not in TOKEN_FIELDS}
