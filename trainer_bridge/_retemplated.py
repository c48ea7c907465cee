"""The training sequences a trainer that re-templates the conversation would build.

Many RL stacks do not keep the sampled token IDs across turns: after a multi-turn rollout they
render the final conversation with the chat template, mask its assistant spans for the loss and
line the sampler's logprobs up with those spans, position by position. That is on-policy only
where re-templating reproduces the sampled tokens. This module builds exactly those sequences
from a tape, so ``gymtape train --ab`` can train on them and show what they cost:

* a rollout whose calls chain (every prompt extends the previous call's context) is already one
  sequence, identical to the re-templated one: it is kept as it is;
* a rollout split by a history rewrite (a re-templating server re-renders earlier turns:
  re-tokenizes a generation into other IDs, or drops tokens the model was conditioned on, as
  Qwen3's template drops think blocks of earlier turns) becomes ONE sequence: its last
  segment's tokens (the final conversation as rendered), with every earlier segment's
  generated spans put back into the loss mask with their behaviour logprobs. A span that
  starts before the point where the re-rendering diverges keeps its position; one after it is
  moved back to start at that point (the template dropped what came before it). Where the
  re-rendered token at a trained position is not the sampled one, the trainer scores a token
  the sampler never produced against the sampled token's logprob: those are the
  ``offpolicy_tokens``; where only the context changed, the logprobs drift (k3) while the IDs
  match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class RetemplatedStats:
    """What the re-templated view changed in one batch."""

    #: Rollouts that were split (more than one sequence) and were merged into one.
    rollouts_merged: int = 0
    #: Generated positions moved from earlier segments into the merged sequence.
    tokens_moved: int = 0
    #: Of those, positions whose re-rendered token ID differs from the sampled one.
    offpolicy_tokens: int = 0


def retemplated_sequences(seqs: pa.Table) -> tuple[pa.Table, RetemplatedStats]:
    """``seqs`` (rows of :data:`~trainer_bridge.SEQUENCE_SCHEMA`, extra columns kept) with every
    split rollout merged into the one sequence a re-templating trainer builds (see module doc).

    Row order follows the first segment of each rollout; per-rollout columns (advantage,
    reward, ...) are taken from the last segment, which they equal for every segment."""
    stats = RetemplatedStats()
    rids = seqs.column("rollout_id").to_pylist()
    rows_of: dict[str, list[int]] = {}
    for i, rid in enumerate(rids):
        rows_of.setdefault(rid, []).append(i)
    if all(len(r) == 1 for r in rows_of.values()):
        return seqs, stats
    segment = seqs.column("segment").to_pylist()
    keep: list[int] = []
    replaced: dict[int, dict[str, object]] = {}  # kept row -> new values of its list columns
    for rows in rows_of.values():
        rows = sorted(rows, key=lambda i: segment[i])
        last = rows[-1]
        keep.append(last)
        if len(rows) == 1:
            continue
        stats.rollouts_merged += 1
        ids = np.asarray(seqs.column("input_ids")[last].values, np.int32)
        mask = np.asarray(seqs.column("loss_mask")[last].values, np.int8).copy()
        lp = np.asarray(seqs.column("behaviour_logprobs")[last].values, np.float32).copy()
        tci = np.asarray(seqs.column("token_call_index")[last].values, np.int16).copy()
        for r in rows[:-1]:
            e_ids = np.asarray(seqs.column("input_ids")[r].values, np.int32)
            e_mask = np.asarray(seqs.column("loss_mask")[r].values, np.int8)
            e_lp = np.asarray(seqs.column("behaviour_logprobs")[r].values, np.float32)
            e_tci = np.asarray(seqs.column("token_call_index")[r].values, np.int16)
            diverge = _common_prefix(e_ids, ids)
            shift = None
            for a, b in _spans(e_mask):
                if a > diverge and shift is None:
                    shift = a - diverge
                to = a - (shift or 0)
                n = min(b - a, ids.size - to)
                if n <= 0:
                    continue
                mask[to : to + n] = 1
                lp[to : to + n] = e_lp[a : a + n]
                tci[to : to + n] = e_tci[a : a + n]
                stats.tokens_moved += n
                stats.offpolicy_tokens += int((e_ids[a : a + n] != ids[to : to + n]).sum())
        versions = [seqs.column("min_policy_version")[i].as_py() for i in rows]
        replaced[last] = {
            "loss_mask": mask, "behaviour_logprobs": lp, "token_call_index": tci,
            "num_generated": int(mask.sum()), "segment": 0,
            "first_call_index": min(seqs.column("first_call_index")[i].as_py() for i in rows),
            "num_calls": sum(seqs.column("num_calls")[i].as_py() for i in rows),
            "min_policy_version": min(versions),
        }
    keep.sort(key=lambda i: rows_of[rids[i]][0])
    out = seqs.take(pa.array(keep, pa.int64()))
    if not replaced:
        return out, stats
    columns = {}
    for name in ("loss_mask", "behaviour_logprobs", "token_call_index", "num_generated", "segment",
                 "first_call_index", "num_calls", "min_policy_version"):
        field = out.schema.field(name)
        old = out.column(name).to_pylist()
        new = [replaced[k][name] if k in replaced else v for k, v in zip(keep, old)]
        new = [v.tolist() if isinstance(v, np.ndarray) else v for v in new]
        columns[name] = pa.array(new, field.type)
    for name, arr in columns.items():
        out = out.set_column(out.schema.get_field_index(name), out.schema.field(name), arr)
    return out, stats


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of non-zero entries."""
    edges = np.diff(np.concatenate([[0], (mask != 0).astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))
