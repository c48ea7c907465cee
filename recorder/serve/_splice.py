"""The on-policy token splice: build the next prompt from the exact token IDs the model produced.

Why this exists. Policy-gradient training is only on-policy when the trainer scores exactly the
tokens the sampler produced, under the same prefix. An OpenAI-style chat API breaks that on
every multi-turn call, because the client sends back *text* and the server rebuilds the prompt:

1. **Re-tokenization.** Generated IDs are decoded to text and tokenized again, which need not
   give the same IDs: the model may have emitted ``" Skin"`` + ``"ny"`` where the tokenizer
   encodes ``" Skinny"`` as one token. The next prompt then conditions on a sequence the model
   never produced, and the recorded logprobs no longer belong to the trainer's tokens.
2. **Re-chat-templating.** A parsed tool call or message is rendered again by the chat template,
   which may format it differently from what the model emitted (whitespace, key order, newlines).

The fix: every model response carries ``prompt_token_ids`` and ``generation_token_ids`` on its
message and the client sends them back unchanged. The server takes the *model prefix* (the last
such message's prompt IDs + generation IDs), and splices it into the freshly templated prompt
right at the end-of-turn (EOS) token that closes that assistant turn; everything after that
point (tool results, new user turns, the generation prompt) comes from the template.

The splice point is found by *counting* end-of-turn tokens, never by position: the template
rendered over the history up to and including that assistant message closes ``n`` turns, so the
splice is at the ``n``-th EOS of the full templated prompt. Templates that drop earlier
reasoning (Qwen3 strips ``<think>`` blocks before the last user query) shift positions but keep
the number of turns, so counting still lands on the right boundary. What splicing cannot repair
(a harness rewriting earlier history) is detected elsewhere; see the design notes
(ARCHITECTURE.md, "on-policy token splice").

Every ambiguity raises :class:`SpliceError` instead of guessing: a silent wrong splice would
train on tokens the model never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .._errors import GymtapeError

__all__ = ["SpliceError", "count_eos", "splice_prefix"]

_SHOW = 48  # tokens of context shown on each side in an error message


class _Decoder(Protocol):
    def decode(self, ids: list[int], /) -> str: ...


TokenIds = Sequence[int] | np.ndarray


class SpliceError(GymtapeError, ValueError):
    """The model's token prefix cannot be spliced into the templated prompt unambiguously."""

    def __init__(self, reason: str, advice: str, sides: dict[str, str]) -> None:
        shown = "".join(f"\n  {name}: {text}" for name, text in sides.items())
        super().__init__(f"on-policy splice failed: {reason}. {advice}{shown}")
        self.reason = reason


def _as_array(ids: TokenIds) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.dtype != np.int32:
        arr = arr.astype(np.int32, copy=False) if arr.size else np.zeros(0, dtype=np.int32)
    return arr.ravel()


def _as_list(ids: TokenIds) -> list[int]:
    return ids.tolist() if isinstance(ids, np.ndarray) else list(map(int, ids))


def count_eos(ids: TokenIds, eos_token_id: int) -> int:
    """How many end-of-turn tokens ``ids`` holds (the number of turns it closes)."""
    return int(np.count_nonzero(_as_array(ids) == eos_token_id))


def _show(ids: TokenIds, tokenizer: _Decoder | None) -> str:
    """The last tokens of ``ids``: decoded (repr, so whitespace shows) or as raw IDs."""
    part = _as_list(ids)
    cut = len(part) > _SHOW
    part = part[-_SHOW:]
    if tokenizer is not None:
        try:
            text = repr(tokenizer.decode(part))
        except Exception as exc:  # noqa: BLE001 - a broken decoder must not hide the real error
            text = f"{part} (decode failed: {exc!r})"
    else:
        text = str(part)
    return f"... {text}" if cut else text


def splice_prefix(
    model_prefix_ids: TokenIds,
    template_prefix_ids: TokenIds,
    template_ids: TokenIds,
    eos_token_id: int | None,
    *,
    tokenizer: _Decoder | None = None,
) -> list[int]:
    """The prompt to generate from: the model's exact IDs, then the template's tail.

    Args:
        model_prefix_ids: the last assistant message's ``prompt_token_ids`` +
            ``generation_token_ids``, as the client sent them back. Empty: nothing to splice.
        template_prefix_ids: the chat template rendered over the messages up to and including
            that assistant message, without a generation prompt.
        template_ids: the full templated prompt for this request (with generation prompt).
        eos_token_id: the end-of-turn token (``<|im_end|>`` for ChatML templates).
        tokenizer: anything with ``decode(list[int]) -> str``; used only to show both sides
            as text in a :class:`SpliceError`.

    Returns:
        ``model_prefix_ids`` (without a trailing EOS, if it has one) followed by
        ``template_ids`` from the EOS that closes the same number of turns as
        ``template_prefix_ids`` (that EOS included). So a generation that stopped without an
        EOS (max tokens) gets one appended. With an empty model prefix, a copy of
        ``template_ids``.

    Raises:
        SpliceError: ``eos_token_id`` is None, ``template_prefix_ids`` holds no EOS, or
            ``template_ids`` holds fewer EOS tokens than ``template_prefix_ids``.
    """
    if len(model_prefix_ids) == 0:
        return _as_list(template_ids)

    def sides(label: str, template_part: TokenIds) -> dict[str, str]:
        return {"model prefix (end)": _show(model_prefix_ids, tokenizer), label: _show(template_part, tokenizer)}

    if eos_token_id is None:
        raise SpliceError(
            "the tokenizer has no end-of-turn (EOS) token id, so the turn boundary cannot be located",
            "Set eos_token (e.g. '<|im_end|>' for ChatML) in the tokenizer config or pass the id "
            "explicitly.",
            sides("template prefix (end)", template_prefix_ids),
        )
    n_turns = count_eos(template_prefix_ids, eos_token_id)
    if n_turns == 0:
        raise SpliceError(
            f"the template rendered over the history up to the last assistant message holds no EOS "
            f"token (id {eos_token_id}), so it does not say where that turn ends",
            "Check that eos_token_id is the token the chat template closes each turn with "
            "(e.g. <|im_end|>, not <|endoftext|>), and that the template prefix was rendered "
            "with that assistant message included.",
            sides("template prefix (end)", template_prefix_ids),
        )
    eos_at = np.flatnonzero(_as_array(template_ids) == eos_token_id)
    if len(eos_at) < n_turns:
        raise SpliceError(
            f"the full templated prompt closes {len(eos_at)} turn(s) (EOS id {eos_token_id}) but the "
            f"history up to the last assistant message closes {n_turns}",
            "The template prefix and the full prompt must be rendered from the same messages, "
            "tools and template; a prompt that drops turns is a history rewrite, which splicing "
            "cannot repair (start a new segment without the model prefix).",
            sides("templated prompt (end)", template_ids),
        )
    cut = int(eos_at[n_turns - 1])
    prefix = _as_list(model_prefix_ids)
    if prefix[-1] == eos_token_id:
        prefix.pop()
    prefix.extend(_as_list(template_ids[cut:]))
    return prefix
