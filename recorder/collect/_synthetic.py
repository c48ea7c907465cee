"""Synthetic NeMo Gym rollout lines with token fields, for demos, tests and benchmarks.

The lines have Gym's real shape (Responses output items, token fields on each model call's
item, function calls and their outputs, indices, agent_ref), with random token IDs and text.
Knobs plant the cases a tape must survive: a history rewrite (a call whose prompt drops part
of the previous context, as a summarising harness does) and calls with empty token fields.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np

_WORDS = (
    "the weather city temperature rain sun wind cloud answer check tool result value step "
    "first then next compute total sum degrees celsius north south today tomorrow because "
    "so we need to call get result expression number eggs boxes left compare colder warmer"
).split()


def _text(rng: np.random.Generator, n_tokens: int) -> str:
    # About four characters per token, like English under a BPE vocabulary.
    return " ".join(rng.choice(_WORDS, size=max(1, (n_tokens * 4) // 6)).tolist())


def _logprobs(rng: np.random.Generator, n: int) -> list[float]:
    # What an engine returns: float32 values, widened to Python floats.
    return (-np.abs(rng.standard_normal(n).astype(np.float32)) * np.float32(0.7)).astype(np.float64).tolist()


def synthesize_gym_rollouts(
    tasks: list[dict[str, Any]],
    *,
    repeats: int = 2,
    calls: int = 4,
    context_tokens: int = 1024,
    vocab_size: int = 151_936,
    env: str = "synthetic_tool_env",
    rewrite_every: int = 0,
    empty_every: int = 0,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """Yield Gym rollout lines: ``repeats`` per task, ``calls`` model calls each.

    The context grows from a quarter of ``context_tokens`` to about ``context_tokens`` over the
    calls. Every ``rewrite_every``-th rollout rewrites its history at the middle call; every
    ``empty_every``-th rollout carries empty (``[]``) token fields, as some real Gym files do.
    """
    rng = np.random.default_rng(seed)
    first = max(8, context_tokens // 4)
    growth = max(4, (context_tokens - first) // max(1, calls))
    gen_len, tool_len = max(2, growth * 2 // 5), max(2, growth - growth * 2 // 5)
    n = 0
    for task_index, task in enumerate(tasks):
        for repeat in range(repeats):
            n += 1
            rewrite_at = calls // 2 if rewrite_every and n % rewrite_every == 0 and calls > 1 else -1
            empty = bool(empty_every) and n % empty_every == 0
            rcp = copy.deepcopy(task.get("responses_create_params", {}))
            msgs = rcp.setdefault("input", [{"role": "user", "content": "", "type": "message"}])
            msgs[0]["content"] = f"{msgs[0].get('content', '')} {_text(rng, first)}"
            tools = rcp.get("tools") or [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
            context = rng.integers(0, vocab_size, size=first, dtype=np.int64)
            output: list[dict[str, Any]] = []
            for k in range(calls):
                if k == rewrite_at:  # keep the system prompt, replace the rest by a short summary
                    context = np.concatenate([context[:first], rng.integers(0, vocab_size, size=growth // 2)])
                prompt = np.concatenate([context, rng.integers(0, vocab_size, size=3)])  # turn header
                gen = rng.integers(0, vocab_size, size=gen_len)
                last = k == calls - 1
                if last:
                    item: dict[str, Any] = {
                        "id": f"msg_{n}_{k}",
                        "type": "message",
                        "role": "assistant",
                        "status": "completed",
                        "content": [{"type": "output_text", "text": _text(rng, gen_len), "annotations": []}],
                    }
                else:
                    tool = tools[k % len(tools)]
                    item = {
                        "id": f"fc_{n}_{k}",
                        "type": "function_call",
                        "call_id": f"call_{n}_{k}",
                        "name": tool.get("name", "tool"),
                        "arguments": '{"query": "%s"}' % _text(rng, 4),
                        "status": "completed",
                    }
                item["prompt_token_ids"] = [] if empty else prompt.tolist()
                item["generation_token_ids"] = [] if empty else gen.tolist()
                item["generation_log_probs"] = [] if empty else _logprobs(rng, gen_len)
                output.append(item)
                context = np.concatenate([prompt, gen])
                if not last:
                    output.append({"type": "function_call_output", "call_id": item["call_id"], "output": _text(rng, tool_len)})
                    context = np.concatenate([context, rng.integers(0, vocab_size, size=tool_len)])
            reward = float(rng.random() < 0.5)
            yield {
                "responses_create_params": rcp,
                "response": {
                    "id": f"resp_{n}",
                    "object": "response",
                    "created_at": 1764000000.0 + n,
                    "model": "synthetic-policy",
                    "status": "completed",
                    "output": output,
                    "incomplete_details": None,
                },
                "reward": reward,
                "num_tool_calls": calls - 1,
                "_ng_task_index": task_index,
                "_ng_rollout_index": repeat,
                "agent_ref": {"type": "responses_api_agents", "name": env},
            }
