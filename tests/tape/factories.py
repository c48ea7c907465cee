"""Small tapes written by gymtape's own writer, one shard per flush, for the storage tests."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from recorder import CallRecord, RolloutRecord, Tape, TapeWriter


def write_rollouts(tape: str | os.PathLike[str], writer_id: str, rollouts: range, *, calls: int = 2,
                   flush_every: int = 1, **writer_kw: Any) -> None:
    """``rollouts`` (ids ``<writer>-r<i>``), ``calls`` multi-turn calls each, a flush (two shards)
    every ``flush_every`` rollouts; closes the writer (manifest)."""
    rng = np.random.default_rng(len(writer_id) * 1000 + rollouts.start)
    with TapeWriter(tape, writer_id=writer_id, flush_rows=10**9, flush_seconds=None, handle_signals=False,
                    **writer_kw) as w:
        for n, r in enumerate(rollouts, 1):
            rid = f"{writer_id}-r{r}"
            prompt = rng.integers(0, 50_000, size=32)
            for k in range(calls):
                gen = rng.integers(0, 50_000, size=8)
                w.add_call(CallRecord(rollout_id=rid, call_index=k, prompt_ids=prompt, generation_ids=gen,
                                      generation_logprobs=-rng.random(8)))
                prompt = np.concatenate([prompt, gen, rng.integers(0, 50_000, size=4)])
            w.add_rollout(RolloutRecord(rollout_id=rid, task_index=r, rollout_index=0, reward=float(r % 2)))
            if n % flush_every == 0:
                w.flush()


def rows(tape: Tape | str | os.PathLike[str], table: str) -> pa.Table:
    """A table's rows in a canonical order (by id), to compare tapes whatever their shard layout."""
    t = tape if isinstance(tape, Tape) else Tape(tape)
    key = "call_id" if table == "calls" else "rollout_id"
    return t.read(table).sort_by(key)


def ids(table: pa.Table) -> list[str]:
    return table.column("call_id" if "call_id" in table.column_names else "rollout_id").to_pylist()
