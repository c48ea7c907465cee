"""Drive NeMo Gym's own capture path (``nemo_gym.token_id_capture.sink``) the way Gym's model
server does for each model call: a capture context, the pre-dispatch intent, parent
resolution over the harness's request items, then ``capture_tokens`` on the served response.

A rollout here is an agent loop over a tool: every call's prompt is the previous call's prompt +
generation + the tool output's tokens (an exact continuation), its response a Responses payload
whose one output item (a function call, then a final message) carries the three token fields,
and the next request echoes the output items as Gym's simple agent does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from nemo_gym.token_id_capture.records import ParentResolutionStatus
from nemo_gym.token_id_capture.sink import (
    CaptureContext,
    capture_tokens,
    register_call_intent,
    reset_token_sink,
    resolve_parent,
    set_token_sink,
)

VOCAB = 150_000


@dataclass
class Turn:
    interstitial: list[int]  # tool-output tokens the harness adds before this call (none for the first)
    generation: list[int]
    logprobs: list[float]


def script(seed: int, turns: int, *, first_prompt: int = 40, tool: int = 12,
           gen: int = 16) -> tuple[list[int], list[Turn]]:
    """A rollout's first prompt and turns; logprobs are float32 values, as vLLM returns them."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, VOCAB, first_prompt).tolist()
    out = []
    for k in range(turns):
        n = int(rng.integers(gen // 2, gen * 2))
        out.append(Turn(rng.integers(0, VOCAB, int(rng.integers(1, tool))).tolist() if k else [],
                        rng.integers(0, VOCAB, n).tolist(),
                        (-rng.random(n) * 4).astype(np.float32).astype(np.float64).tolist()))
    return prompt, out


async def call(sink: Any, lineage: Any, rollout_id: str, call_id: str, request: list[dict], response: dict, *,
               delta: bool = True) -> CaptureContext:
    """One model call through Gym's capture path; returns its (finished) capture context."""
    ctx = CaptureContext(rollout_id=rollout_id, model_call_id=call_id, token_sink=sink, lineage_store=lineage,
                         model="policy", delta_records=delta)
    token = set_token_sink(ctx)
    try:
        await register_call_intent()
        await resolve_parent(request)
        await capture_tokens(response, request)
    finally:
        reset_token_sink(token)
    return ctx


async def run_rollout(sink: Any, lineage: Any, rollout_id: str, seed: int, turns: int, *, delta: bool = True,
                      first: int = 0, last: int | None = None, state: dict | None = None) -> dict:
    """Run turns ``first..last-1`` of a rollout (all by default); ``state`` carries the request
    and prompt between partial runs (another process may run the next turns)."""
    prompt0, plan = script(seed, turns)
    st = state if state is not None else {"request": [{"role": "user", "content": f"task {seed}"}],
                                           "prompt": list(prompt0), "previous": None}
    for k in range(first, turns if last is None else last):
        turn = plan[k]
        if k:
            st["prompt"] = st["prompt"] + st["previous"] + turn.interstitial
            st["request"] = st["request"] + [{"type": "function_call_output", "call_id": f"tool-{k - 1}",
                                              "output": f"result {k - 1} of {seed}"}]
        final = k == turns - 1
        item: dict[str, Any] = (
            {"type": "message", "role": "assistant", "id": f"msg-{rollout_id}-{k}",
             "content": [{"type": "output_text", "text": f"answer {seed}"}]} if final else
            {"type": "function_call", "id": f"fc-{rollout_id}-{k}", "call_id": f"tool-{k}", "name": "lookup",
             "arguments": f'{{"step": {k}, "seed": {seed}}}'})
        response = {"id": f"resp-{rollout_id}-{k}", "model": "policy", "object": "response",
                    "output": [{**item, "prompt_token_ids": st["prompt"], "generation_token_ids": turn.generation,
                                "generation_log_probs": turn.logprobs}]}
        ctx = await call(sink, lineage, rollout_id, f"{rollout_id}-call{k}", st["request"], response, delta=delta)
        assert ctx.committed, f"{rollout_id} call {k} was not committed"
        want = ParentResolutionStatus.ROOT if k == 0 else ParentResolutionStatus.RESOLVED
        assert ctx.parent_resolution is not None and ctx.parent_resolution.status == want, (
            f"{rollout_id} call {k}: {ctx.parent_resolution}")
        st["request"] = st["request"] + response["output"]  # the agent echoes items, token fields and all
        st["previous"] = turn.generation
    return st


def expected_sequence(seed: int, turns: int) -> tuple[list[int], list[int], list[float]]:
    """The one training sequence of a linear rollout: tokens, loss mask, behaviour logprobs."""
    prompt, plan = script(seed, turns)
    ids, mask, lps = list(prompt), [0] * len(prompt), [0.0] * len(prompt)
    for k, turn in enumerate(plan):
        ids += turn.interstitial
        mask += [0] * len(turn.interstitial)
        lps += [0.0] * len(turn.interstitial)
        ids += turn.generation
        mask += [1] * len(turn.generation)
        lps += turn.logprobs
    return ids, mask, lps
