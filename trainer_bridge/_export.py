"""Offline training exports: SFT and DPO Parquet files from a tape, in the layouts TRL reads.

Gym users also train without RL from their rollouts: supervised fine-tuning on the good ones
(rejection sampling) and preference tuning on good/bad pairs of the same task. Both need the
exact token IDs the model produced, which the tape has and Gym's JSONL text does not.

* **SFT** (``format="sft"``): one row per C1 sequence of a rollout whose reward is at least
  ``min_reward``. ``input_ids`` + ``completion_mask`` (1 exactly on generated tokens; TRL's
  ``completion_only_loss``) + ``assistant_masks`` (the same mask, for ``assistant_only_loss``):
  TRL's SFTTrainer treats a dataset with ``input_ids`` as already tokenised. ``prompt`` /
  ``completion`` text (the sequence decoded before / from its first generated token) is added
  when a tokenizer is given; for multi-turn sequences the completion text also holds the tool
  outputs between turns, so train on the token columns there.
* **DPO** (``format="dpo"``): within each GRPO group, rollouts whose first call has the same
  prompt tokens are paired (chosen, rejected) when their rewards differ by at least ``margin``.
  Only the first call's generation is the completion: a DPO completion has no loss mask, and
  later calls would put tool outputs inside it. Columns follow TRL's preference format
  (``prompt``, ``chosen``, ``rejected`` text) and its tokenised names (``prompt_input_ids``,
  ``chosen_input_ids``, ``rejected_input_ids``).

Files are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recorder import GymtapeError, Tape, atomic_file, resolve_tokenizer

from ._filters import TapeFilters
from ._sequences import build_sequences

Pairs = Literal["disjoint", "all"]


class ExportError(GymtapeError):
    """The export cannot be written as asked (tokenizer does not fit the tape, bad option)."""


@dataclass
class ExportReport:
    """What an export wrote and what it left out, and why."""

    format: str
    out: str
    rows: int = 0
    rollouts_considered: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    #: What the tokenizer policy had to say (an allowed mismatch, an identity not compared).
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "out": self.out, "rows": self.rows,
                "rollouts_considered": self.rollouts_considered, "skipped": dict(self.skipped),
                "warnings": list(self.warnings)}


SFT_SCHEMA = pa.schema([
    pa.field("sequence_id", pa.string(), nullable=False),
    pa.field("rollout_id", pa.string(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("completion_mask", pa.list_(pa.int8()), nullable=False),
    pa.field("assistant_masks", pa.list_(pa.int8()), nullable=False),
    pa.field("reward", pa.float64()),
    pa.field("group_key", pa.string()),
    pa.field("env", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("completion", pa.string()),
])

DPO_SCHEMA = pa.schema([
    pa.field("group_key", pa.string()),
    pa.field("prompt_input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("chosen_input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("rejected_input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("chosen_reward", pa.float64(), nullable=False),
    pa.field("rejected_reward", pa.float64(), nullable=False),
    pa.field("chosen_rollout_id", pa.string(), nullable=False),
    pa.field("rejected_rollout_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("chosen", pa.string()),
    pa.field("rejected", pa.string()),
])


def export_sft(
    tape: Tape | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    min_reward: float | None = 1.0,
    filters: TapeFilters | None = None,
    tokenizer: Any = None,
    allow_tokenizer_mismatch: bool = False,
) -> ExportReport:
    """Write reward-filtered training sequences as SFT Parquet (:data:`SFT_SCHEMA`).

    Args:
        min_reward: keep rollouts with ``reward >= min_reward`` (None: every rollout the filters keep).
        filters: rollout selection (default: status ok, reward present).
        tokenizer: a transformers tokenizer, its directory, or a
            :class:`recorder.ResolvedTokenizer`, to add ``prompt``/``completion`` text; None leaves
            the text columns null. Held to the tape's identity by :func:`recorder.resolve_tokenizer`.
        allow_tokenizer_mismatch: decode with a tokenizer whose identity differs from the tape's
            (a warning in the report) instead of raising :class:`recorder.TokenizerMismatchError`.
    """
    tape = tape if isinstance(tape, Tape) else Tape(tape)
    report = ExportReport("sft", str(out))
    tok = _tokenizer(tokenizer, tape, allow_tokenizer_mismatch, report)
    seqs, report.rollouts_considered, report.skipped = _selected_sequences(tape, filters)
    if min_reward is not None:
        low = pc.fill_null(pc.less(seqs["reward"], min_reward), True)
        report.skipped["reward_below_min"] = len(set(pc.filter(seqs["rollout_id"], low).to_pylist()))
        seqs = seqs.filter(pc.invert(low))
    prompt = completion = pa.nulls(seqs.num_rows, pa.string())
    if tok is not None and seqs.num_rows:
        ids = seqs["input_ids"].to_pylist()
        cut = seqs["prompt_len"].to_pylist()
        prompt = pa.array(_decode(tok, [i[:c] for i, c in zip(ids, cut)]), pa.string())
        completion = pa.array(_decode(tok, [i[c:] for i, c in zip(ids, cut)]), pa.string())
    table = pa.Table.from_arrays([
        seqs["sequence_id"], seqs["rollout_id"], seqs["input_ids"], seqs["loss_mask"], seqs["loss_mask"],
        seqs["reward"], seqs["group_key"], seqs["env"], prompt, completion,
    ], schema=SFT_SCHEMA)
    _write(table, out)
    report.rows = table.num_rows
    return report


def export_dpo(
    tape: Tape | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    margin: float = 0.5,
    pairs: Pairs = "disjoint",
    filters: TapeFilters | None = None,
    tokenizer: Any = None,
    allow_tokenizer_mismatch: bool = False,
) -> ExportReport:
    """Write (chosen, rejected) pairs within GRPO groups as DPO Parquet (:data:`DPO_SCHEMA`).

    Args:
        margin: least reward difference between chosen and rejected.
        pairs: ``"disjoint"``: each rollout in at most one pair (best with worst, second best
            with second worst, ...); ``"all"``: every pair of the group that meets the margin.
        filters: rollout selection (default: status ok, reward present).
        tokenizer: as for :func:`export_sft`, for the text columns (None: null).
        allow_tokenizer_mismatch: as for :func:`export_sft`.
    """
    if pairs not in ("disjoint", "all"):
        raise ExportError(f"pairs must be 'disjoint' or 'all', got {pairs!r}")
    if margin < 0:
        raise ExportError(f"margin must be >= 0, got {margin}")
    tape = tape if isinstance(tape, Tape) else Tape(tape)
    report = ExportReport("dpo", str(out))
    tok = _tokenizer(tokenizer, tape, allow_tokenizer_mismatch, report)
    seqs, report.rollouts_considered, report.skipped = _selected_sequences(tape, filters)
    first = seqs.filter(pc.and_(pc.equal(seqs["segment"], 0), pc.greater(seqs["num_generated"], 0)))
    ids = first["input_ids"].to_pylist()
    calls = first["token_call_index"].to_pylist()
    rows: dict[str, list] = {f.name: [] for f in DPO_SCHEMA}
    by_prompt: dict[tuple[str | None, bytes], list[tuple[float, str, np.ndarray]]] = {}
    for r, seq, who in zip(first.select(["rollout_id", "group_key", "reward", "prompt_len"]).to_pylist(), ids, calls):
        seq_np = np.asarray(seq, np.int32)
        prompt = seq_np[: r["prompt_len"]]
        completion = seq_np[np.asarray(who) == 0]
        by_prompt.setdefault((r["group_key"], prompt.tobytes()), []).append((r["reward"], r["rollout_id"], completion))
    unpaired = 0
    for (group, prompt_bytes), members in by_prompt.items():
        members.sort(key=lambda m: (-m[0], m[1]))
        chosen_pairs = _pairs(members, margin, pairs)
        unpaired += len(members) - len({rid for c, rj in chosen_pairs for rid in (c[1], rj[1])})
        prompt = np.frombuffer(prompt_bytes, np.int32)
        for c, rj in chosen_pairs:
            rows["group_key"].append(group)
            rows["prompt_input_ids"].append(prompt)
            rows["chosen_input_ids"].append(c[2])
            rows["rejected_input_ids"].append(rj[2])
            rows["chosen_reward"].append(c[0])
            rows["rejected_reward"].append(rj[0])
            rows["chosen_rollout_id"].append(c[1])
            rows["rejected_rollout_id"].append(rj[1])
    report.skipped["unpaired"] = unpaired
    n = len(rows["group_key"])
    if tok is not None and n:
        rows["prompt"] = _decode(tok, [p.tolist() for p in rows["prompt_input_ids"]])
        rows["chosen"] = _decode(tok, [p.tolist() for p in rows["chosen_input_ids"]])
        rows["rejected"] = _decode(tok, [p.tolist() for p in rows["rejected_input_ids"]])
    else:
        rows["prompt"] = rows["chosen"] = rows["rejected"] = [None] * n
    arrays = []
    for f in DPO_SCHEMA:
        values = rows[f.name]
        if pa.types.is_list(f.type):
            arrays.append(_list_array(values))
        else:
            arrays.append(pa.array(values, f.type))
    table = pa.Table.from_arrays(arrays, schema=DPO_SCHEMA)
    _write(table, out)
    report.rows = n
    return report


# -- helpers ----------------------------------------------------------------------------------


def _selected_sequences(tape: Tape, filters: TapeFilters | None) -> tuple[pa.Table, int, dict[str, int]]:
    from ._filters import ROLLOUT_META_COLUMNS, first_row_per_rollout

    rollouts = first_row_per_rollout(tape.read("rollouts", ROLLOUT_META_COLUMNS))
    keep = (filters or TapeFilters()).mask(rollouts) if rollouts.num_rows else np.zeros(0, bool)
    wanted = rollouts["rollout_id"].filter(pa.array(keep)).to_pylist()
    seqs = build_sequences(tape, rollout_ids=wanted, include_open=False)
    return seqs, rollouts.num_rows, {"filtered": int((~keep).sum())}


def _pairs(members: list[tuple[float, str, np.ndarray]], margin: float, mode: Pairs) -> list[tuple[Any, Any]]:
    """Pairs from members sorted by reward, best first."""
    out = []
    if mode == "all":
        for i, c in enumerate(members):
            for rj in members[i + 1:]:
                if c[0] - rj[0] >= margin and c[0] > rj[0]:
                    out.append((c, rj))
        return out
    lo, hi = 0, len(members) - 1
    while lo < hi:
        c, rj = members[lo], members[hi]
        if c[0] - rj[0] < margin or c[0] <= rj[0]:
            break
        out.append((c, rj))
        lo, hi = lo + 1, hi - 1
    return out


def _list_array(values: list[np.ndarray]) -> pa.Array:
    lengths = np.fromiter((len(v) for v in values), np.int64, len(values))
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(values).astype(np.int32) if values else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32()))


def _tokenizer(tokenizer: Any, tape: Tape, allow_mismatch: bool, report: ExportReport) -> Any:
    """The loaded tokenizer for the text columns (None: no text), resolved before any work is done."""
    if tokenizer is None:
        return None
    resolved = resolve_tokenizer(tape, tokenizer, allow_mismatch=allow_mismatch)
    report.warnings += resolved.warnings
    return resolved.tokenizer


def _decode(tok: Any, id_lists: list[list[int]]) -> list[str]:
    vocab = len(tok)
    top = max((max(ids) for ids in id_lists if len(ids)), default=-1)
    if top >= vocab:
        raise ExportError(
            f"the tape holds token ID {top}, outside the tokenizer's vocabulary ({vocab} tokens): it was "
            "recorded with another tokenizer. Pass that one with --tokenizer, or leave the text out (--no-text)"
        )
    return tok.batch_decode(id_lists, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _write(table: pa.Table, out: str | os.PathLike[str]) -> None:
    final = Path(out)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(final) as f:
        pq.write_table(table, f, compression="zstd")
