"""Summary statistics of a tape: what `gymtape inspect` prints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl

from ._integrity import broken_rollouts, read_integrity
from ._layout import CALLS_DIR, META_FILE, ROLLOUTS_DIR
from ._reader import Tape
from ._shards import READ_ATTEMPTS


def summarize(tape: Tape, *, jsonl_size: Callable[[Tape], int] | None = None,
              max_groups: int | None = None, max_broken: int | None = 100) -> dict[str, Any]:
    """Counts, token totals, storage, reward by group, statuses, policy versions and shards.

    ``tape_bytes`` counts ``tape.json`` and the live shards (what a reader reads); shards a
    compacted shard replaces, awaiting deletion, are counted apart (``superseded``).
    ``integrity`` counts rollout rows whose calls are missing, incomplete ones, and rows a
    retry superseded (:func:`~recorder.rollout_integrity`), and names the broken ones (the
    first ``max_broken``).
    ``calls_per_rollout`` and ``splice`` show multi-turn rollouts (:func:`_turns`).
    ``jsonl_size`` sizes the same rollouts in another format (``recorder.gym_jsonl_size``: Gym
    rollout JSONL); the summary then holds ``gym_jsonl_bytes`` and ``compression_ratio``.
    """
    for attempt in range(READ_ATTEMPTS):
        try:
            return _summarize(tape, jsonl_size, max_groups, max_broken)
        except FileNotFoundError:  # a compactor deleted a shard between listing and reading: again
            if attempt == READ_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _summarize(tape: Tape, jsonl_size: Callable[[Tape], int] | None, max_groups: int | None,
               max_broken: int | None) -> dict[str, Any]:
    calls = tape.calls()
    rollouts = tape.rollouts()
    c = calls.select(
        pl.len().alias("calls"),
        pl.col("prompt_len").cast(pl.Int64).sum().alias("prompt_tokens"),
        pl.col("generation_ids").list.len().cast(pl.Int64).sum().alias("generation_tokens"),
        pl.col("prompt_suffix_ids").list.len().cast(pl.Int64).sum().alias("stored_prompt_tokens"),
        pl.col("policy_version").min().alias("min_policy_version"),
        pl.col("policy_version").max().alias("max_policy_version"),
    ).collect().row(0, named=True)
    stored = (c["stored_prompt_tokens"] or 0) + (c["generation_tokens"] or 0)
    versions = (
        calls.group_by("policy_version").agg(pl.len().alias("calls")).sort("policy_version").collect().rows(named=True)
    )
    r = rollouts.select(pl.len().alias("rollouts"), pl.col("reward").mean().alias("mean_reward")).collect().row(0, named=True)

    def counts(col: str) -> dict[str, int]:
        rows = rollouts.group_by(col).agg(pl.len()).sort(col).collect().rows()
        return {str(k): int(v) for k, v in rows}

    groups_q = (
        rollouts.group_by("group_key")
        .agg(
            pl.len().alias("rollouts"),
            pl.col("reward").mean().alias("mean"),
            pl.col("reward").std().alias("std"),
            pl.col("reward").min().alias("min"),
            pl.col("reward").max().alias("max"),
        )
        .sort("group_key", nulls_last=True)
    )
    groups = groups_q.collect().rows(named=True)
    rows, integrity = read_integrity(tape)
    listings = {t: tape.listing(t) for t in (CALLS_DIR, ROLLOUTS_DIR)}
    shards = {t: listing.live for t, listing in listings.items()}
    tape_bytes = sum(s.bytes for ss in shards.values() for s in ss) + tape.storage.size(META_FILE)
    writers_seen = sorted({w for ss in shards.values() for s in ss for w in s.writers})
    clean = tape.writers()
    out: dict[str, Any] = {
        "tape": tape.location,
        "format_version": tape.meta.format_version,
        "tokenizer": tape.meta.tokenizer.to_dict() if tape.meta.tokenizer else None,
        "rollouts": r["rollouts"],
        "calls": c["calls"],
        "prompt_tokens": c["prompt_tokens"] or 0,
        "generation_tokens": c["generation_tokens"] or 0,
        "stored_tokens": stored,
        "tape_bytes": tape_bytes,
        "mean_reward": r["mean_reward"],
        "status": counts("status"),
        "token_status": counts("token_status"),
        "policy_versions": {
            "min": c["min_policy_version"],
            "max": c["max_policy_version"],
            "calls_by_version": {str(v["policy_version"]): v["calls"] for v in versions},
        },
        "groups": groups if max_groups is None else groups[:max_groups],
        "num_groups": len(groups),
        "shards": {t: {"count": len(ss), "bytes": sum(s.bytes for s in ss), "rows": sum(s.rows for s in ss),
                       "compacted": sum(s.compacted for s in ss)} for t, ss in shards.items()},
        "superseded": {t: {"count": len(ls.superseded), "bytes": sum(s.bytes for s in ls.superseded)}
                       for t, ls in listings.items()},
        "writers": {"seen": writers_seen, "closed_cleanly": sorted(w for w in writers_seen if w in clean),
                    "not_closed": sorted(w for w in writers_seen if w not in clean)},
        "temp_files": tape.temp_files(),
        "integrity": {**integrity.counts(), "broken_rollouts": broken_rollouts(rows, integrity, max_broken)},
    }
    out.update(_turns(calls))
    if jsonl_size is not None:
        total = jsonl_size(tape)
        out["gym_jsonl_bytes"] = total
        out["compression_ratio"] = total / tape_bytes if tape_bytes else None
    return out


def _turns(calls: pl.LazyFrame) -> dict[str, Any]:
    """How many calls the rollouts hold, and how much of the later calls' prompts the splice reused.

    A call after the first keeps ``prefix_len`` tokens of the previous call's context (its prompt
    followed by its generation) exactly as they were: behind ``gymtape serve`` these are the tokens
    the server took from the model's own earlier prompt and generation instead of re-templating the
    history from text. ``reused_share`` is their share of the later calls' prompt tokens (the rest is
    what the environment and the chat template added since); ``reused_generation_tokens`` counts the
    previous turn's sampled tokens among them, and ``whole_context_calls`` the later calls that kept
    the whole previous context (fewer: the history was rewritten, or re-templated differently).
    """
    per_rollout = calls.group_by("rollout_id").agg(pl.len().alias("n")).collect()["n"]
    hist = per_rollout.value_counts().sort("n").rows()
    ordered = calls.select(
        "rollout_id", "call_index", pl.col("prefix_len").cast(pl.Int64), pl.col("prompt_len").cast(pl.Int64),
        pl.col("generation_ids").list.len().cast(pl.Int64).alias("gen_len"),
    ).sort("rollout_id", "call_index")
    later = ordered.with_columns(
        pl.col("prompt_len").shift(1).over("rollout_id").alias("prev_prompt"),
        (pl.col("prompt_len") + pl.col("gen_len")).shift(1).over("rollout_id").alias("prev_context"),
    ).filter(pl.col("call_index") > 0)
    s = later.select(
        pl.len().alias("later_calls"),
        pl.col("prompt_len").sum().alias("later_prompt_tokens"),
        pl.col("prefix_len").sum().alias("reused_tokens"),
        (pl.col("prefix_len") - pl.col("prev_prompt")).clip(lower_bound=0).sum().alias("reused_generation_tokens"),
        (pl.col("prefix_len") == pl.col("prev_context")).sum().alias("whole_context_calls"),
    ).collect().row(0, named=True)
    splice = {k: int(v or 0) for k, v in s.items()}
    total = splice["later_prompt_tokens"]
    splice["reused_share"] = splice["reused_tokens"] / total if total else None
    return {
        "calls_per_rollout": {
            "mean": float(per_rollout.mean()) if len(per_rollout) else None,  # type: ignore[arg-type]
            "min": int(per_rollout.min()) if len(per_rollout) else None,  # type: ignore[arg-type]
            "max": int(per_rollout.max()) if len(per_rollout) else None,  # type: ignore[arg-type]
            "rollouts_by_calls": {str(n): int(c) for n, c in hist},
        },
        "splice": splice,
    }
