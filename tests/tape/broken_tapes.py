"""Tapes with rollouts a trainer must not see, written by gymtape's own TapeWriter.

``write_integrity_tape`` writes, for env ``e``, tasks 0..5 with two repeats each. Repeat 1 of
every task is a clean two-call rollout; repeat 0 is the case named in :data:`KINDS`:

* ``short``: the row says 3 calls, the tape holds calls 0 and 1 (a server lost the last);
* ``gap``: the row says 3 calls, the tape holds calls 0 and 2;
* ``lost``: the row says 2 calls and none is on the tape (a joined row whose server calls were lost);
* ``incomplete``: two calls, ``token_status = "incomplete"`` (Gym's ``mark_incomplete``);
* ``retried``: a ``failed`` row, then (later ``created_at``) a clean row for the same task and
  repeat (``gymtape record --resume --retry-failed``): the failed row is superseded;
* ``clean``: a clean rollout (task 0).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone

from recorder import CallRecord, RolloutRecord, TapeWriter, TokenizerIdentity

KINDS = ("clean", "short", "gap", "lost", "incomplete", "retried")
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _calls(rid: str, n: int, tokens: Callable[[int], list[int]]) -> list[CallRecord]:
    prompt = tokens(0)
    out = []
    for k in range(n):
        gen = tokens(k + 1)
        out.append(CallRecord(rollout_id=rid, call_index=k, prompt_ids=prompt, generation_ids=gen,
                              generation_logprobs=[-0.5] * len(gen)))
        prompt = [*prompt, *gen, *tokens(0)]
    return out


def write_integrity_tape(path: str | os.PathLike[str], *, tokens: Callable[[int], list[int]] | None = None,
                         kinds: Sequence[str] = KINDS, identity: TokenizerIdentity | None = None) -> dict[str, str]:
    """Write the tape; returns ``{kind: rollout_id}`` of the repeat-0 rollouts (``retried``: the
    failed row's id; ``retried_new``: the row that supersedes it)."""
    tokens = tokens or (lambda k: [10 + k, 20 + k, 30 + k])
    ids: dict[str, str] = {}
    with TapeWriter(path, tokenizer=identity, flush_seconds=None, handle_signals=False) as w:
        def rollout(rid: str, task: int, repeat: int, reward: float, minute: int, **kw: object) -> None:
            w.add_rollout(RolloutRecord(rollout_id=rid, env="e", task_index=task, rollout_index=repeat,
                                        group_key=f"e#{task}", reward=reward,
                                        created_at=T0 + timedelta(minutes=minute), **kw))  # type: ignore[arg-type]

        for task, kind in enumerate(kinds):
            rid = f"{kind}-{task}-0"
            ids[kind] = rid
            calls = _calls(rid, 3 if kind in ("short", "gap") else 2, tokens)
            if kind == "short":
                calls = calls[:2]
            elif kind == "gap":
                calls = [calls[0], calls[2]]
            elif kind in ("lost", "retried"):
                calls = []
            for c in calls:
                w.add_call(c)
            if kind == "retried":
                rollout(rid, task, 0, 0.0, 0, status="failed", status_reason="model server unreachable")
                new = f"retried-{task}-0-new"
                ids["retried_new"] = new
                for c in _calls(new, 2, tokens):
                    w.add_call(c)
                rollout(new, task, 0, 1.0, 5)
            else:
                extra: dict[str, object] = {}
                if kind in ("short", "gap"):
                    extra = {"num_calls": 3}
                elif kind == "lost":
                    extra = {"num_calls": 2, "token_status": "ok"}
                elif kind == "incomplete":
                    extra = {"token_status": "incomplete"}
                rollout(rid, task, 0, 1.0, 1, **extra)
            clean = f"clean-{task}-1"
            for c in _calls(clean, 2, tokens):
                w.add_call(c)
            rollout(clean, task, 1, 0.0, 2)
    return ids
