"""What a caller hands to :class:`~recorder.TapeWriter`: one model call or one rollout.

Callers give *full* prompts and message lists; the writer does the delta encoding against the
previous call of the same rollout, so nobody outside the writer has to get it right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

TokenIds = Sequence[int] | np.ndarray
Logprobs = Sequence[float] | np.ndarray


@dataclass(slots=True, kw_only=True)
class CallRecord:
    """One model call, as the sampler saw it."""

    rollout_id: str
    call_index: int
    #: The full prompt token IDs the engine generated from.
    prompt_ids: TokenIds
    #: Generated token IDs, exactly as sampled.
    generation_ids: TokenIds
    #: Sampling logprob of each generated token (same length as ``generation_ids``).
    generation_logprobs: Logprobs
    #: None: generated from ``rollout_id`` and ``call_index``.
    call_id: str | None = None
    #: ``ok``, ``empty`` (the source had the token fields, but empty) or ``invalid_logprobs``
    #: (a logprob is NaN, infinite or positive; kept as given). None: inferred.
    token_status: str | None = None
    finish_reason: str | None = None
    policy_version: int = 0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    #: ``raw`` or ``processed`` (see the schema); None when unknown.
    logprobs_kind: str | None = None
    engine: str | None = None
    model: str | None = None
    started_at: datetime | None = None
    latency_s: float | None = None
    #: The full list of request messages (Chat Completions form), or None.
    messages: list[dict[str, Any]] | None = None
    #: The request's tools, or None when the request had none.
    tools: list[dict[str, Any]] | None = None
    #: The parsed model output (a message dict), or None.
    output: dict[str, Any] | None = None


@dataclass(slots=True, kw_only=True)
class RolloutRecord:
    """One rollout (episode): its outcome and where it came from.

    Counts and policy versions left as None are filled in from the calls this writer saw for
    the rollout.
    """

    rollout_id: str
    env: str | None = None
    task_index: int | None = None
    rollout_index: int | None = None
    group_key: str | None = None
    reward: float | None = None
    #: ``ok``, ``truncated`` or ``failed``.
    status: str = "ok"
    status_reason: str | None = None
    #: ``ok``, ``empty``, ``partial``, ``missing``, ``incomplete`` (a call failed to be
    #: captured: Gym's ``mark_incomplete``; never trained on) or ``invalid_logprobs`` (a call's
    #: logprobs are NaN, infinite or positive; never trained on); None: inferred from the calls.
    token_status: str | None = None
    num_calls: int | None = None
    prompt_tokens: int | None = None
    generation_tokens: int | None = None
    min_policy_version: int | None = None
    max_policy_version: int | None = None
    #: Gym ``responses_create_params`` (dict) or its JSON text.
    input: Any = None
    #: Gym ``response`` without token fields (dict) or its JSON text.
    response: Any = None
    #: Other fields of the Gym line (dict) or their JSON text.
    extras: Any = None
    #: Per call (by call index): which ``response.output`` item carries its token fields.
    call_item_indices: list[int] | None = None
    gym_keys: list[str] | None = None
    source: str | None = None
    created_at: datetime | None = None


CALL_STATUSES = ("ok", "empty", "invalid_logprobs")
ROLLOUT_STATUSES = ("ok", "truncated", "failed")
ROLLOUT_TOKEN_STATUSES = ("ok", "empty", "partial", "missing", "incomplete", "invalid_logprobs")
LOGPROBS_KINDS = ("raw", "processed")
