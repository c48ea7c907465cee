"""Training sequences from a tape's calls: token IDs, loss mask, behaviour logprobs (contract C1).

A multi-turn rollout whose every call extends the previous call's context is ONE training
sequence: the last call's full prompt followed by its generation, where every earlier call's
generated tokens sit exactly where they were sampled. Training on that one sequence scores each
generated token under the exact prefix the sampler saw. A history rewrite (``prefix_len`` shorter
than the previous context: a summarising or truncating harness) breaks that; the rollout is then
split and the rewritten call starts a new sequence (``split_reason = "history_rewrite"``), so no
sequence ever holds a prefix the sampler did not see.

The work is offsets arithmetic over the Arrow list columns (numpy gathers over all tokens at
once), never a Python loop per token or per call: the loader's throughput rests on it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recorder import Tape, TapeError

from ._filters import first_row_per_rollout
from ._runs import RunStore

#: Calls columns the builder reads (only these are decoded from Parquet).
CALL_COLUMNS = [
    "rollout_id",
    "call_index",
    "prefix_len",
    "prompt_suffix_ids",
    "prompt_len",
    "generation_ids",
    "generation_logprobs",
    "token_status",
    "policy_version",
]
#: Rollouts columns the builder joins onto the sequences.
ROLLOUT_COLUMNS = ["rollout_id", "env", "task_index", "rollout_index", "group_key", "reward", "status", "token_status"]

#: ``status`` of sequences whose rollout has no rollout row yet (calls recorded by ``gymtape
#: serve`` alone, or a rollout still running). Training filters keep only ``ok`` by default.
OPEN_STATUS = "open"

SEQUENCE_SCHEMA = pa.schema(
    [
        pa.field("sequence_id", pa.string(), nullable=False),
        pa.field("rollout_id", pa.string(), nullable=False),
        pa.field("segment", pa.int32(), nullable=False),
        pa.field("split_reason", pa.string(), nullable=False),
        pa.field("first_call_index", pa.int32(), nullable=False),
        pa.field("num_calls", pa.int32(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.int8()), nullable=False),
        pa.field("behaviour_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("token_call_index", pa.list_(pa.int16()), nullable=False),
        pa.field("prompt_len", pa.int32(), nullable=False),
        pa.field("num_generated", pa.int32(), nullable=False),
        pa.field("reward", pa.float64()),
        pa.field("group_key", pa.string()),
        pa.field("env", pa.string()),
        pa.field("task_index", pa.int64()),
        pa.field("rollout_index", pa.int64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("min_policy_version", pa.int64(), nullable=False),
        pa.field("max_policy_version", pa.int64(), nullable=False),
    ]
)

_SUFFIX, _GEN, _COPY = 0, 1, 2


def build_sequences(
    tape: Tape | str | os.PathLike[str],
    *,
    rollout_ids: Sequence[str] | None = None,
    include_open: bool = True,
) -> pa.Table:
    """One row per training sequence of the tape (schema :data:`SEQUENCE_SCHEMA`).

    Args:
        tape: a :class:`recorder.Tape` or its directory.
        rollout_ids: only these rollouts (default: all).
        include_open: also build sequences for rollouts that have calls but no rollout row
            (``status = "open"``, reward/group null): tapes recorded by ``gymtape serve`` alone.

    Rollouts whose ``token_status`` is not ``ok`` (or any of whose calls lacks token IDs) give
    no sequence. Rows come in (rollout_id, segment) order.
    """
    tape = tape if isinstance(tape, Tape) else Tape(tape)
    calls = tape.read("calls", CALL_COLUMNS)
    rollouts = tape.read("rollouts", ROLLOUT_COLUMNS)
    if rollout_ids is not None:
        wanted = pa.array(list(rollout_ids), pa.string())
        calls = calls.filter(pc.is_in(calls["rollout_id"], value_set=wanted))
        rollouts = rollouts.filter(pc.is_in(rollouts["rollout_id"], value_set=wanted))
    return sequences_from_tables(calls, rollouts, include_open=include_open)


@dataclass
class _Pieces:
    """Runs of stored tokens, in output order: segment, kind, source offset, length, call index.

    ``src`` indexes the stored prompt-suffix values followed by the stored generation values.
    """

    seg: np.ndarray
    kind: np.ndarray
    src: np.ndarray
    len: np.ndarray
    call: np.ndarray

    @classmethod
    def own(cls, seg_of_call: np.ndarray, ci: np.ndarray, s_src: np.ndarray, s_len: np.ndarray,
            g_src: np.ndarray, g_len: np.ndarray) -> _Pieces:
        """Each call's suffix piece then its generation piece."""
        n = seg_of_call.size
        return cls(
            seg=np.repeat(seg_of_call, 2),
            kind=np.tile(np.array([_SUFFIX, _GEN], dtype=np.int8), n),
            src=np.stack([s_src, g_src], axis=1).ravel(),
            len=np.stack([s_len, g_len], axis=1).ravel(),
            call=np.repeat(ci, 2),
        )

    def with_copies(self, targets: np.ndarray, copy_len: np.ndarray) -> _Pieces:
        """Prepend to each target segment the first ``copy_len[t]`` tokens of segment ``t - 1``.

        Segment ``t - 1`` is already complete (its own copies resolved at the previous level),
        so its leading pieces, the last one cut short, are exactly the tokens to repeat.
        """
        if targets.size == 0:
            return self
        prev = targets - 1
        take = np.isin(self.seg, prev)
        seg, src, length = self.seg[take], self.src[take], self.len[take]
        end = np.cumsum(length)
        seg_start = np.zeros(seg.size, dtype=bool)
        seg_start[0] = True
        seg_start[1:] = seg[1:] != seg[:-1]
        first_end = np.maximum.accumulate(np.where(seg_start, end - length, 0))
        within = end - length - first_end  # start of each piece within its segment
        want = copy_len[seg + 1]
        keep = (within < want) & (length > 0)
        new_len = np.minimum(length, want - within)[keep]
        copies = _Pieces(seg=seg[keep] + 1, kind=np.full(new_len.size, _COPY, np.int8), src=src[keep], len=new_len,
                         call=np.full(new_len.size, -1, dtype=self.call.dtype))
        fields = ("seg", "kind", "src", "len", "call")
        merged = {f: np.concatenate([getattr(copies, f), getattr(self, f)]) for f in fields}
        # Stable sort by segment: a segment's copy pieces (first in the concatenation) precede its own.
        order = np.argsort(merged["seg"], kind="stable")
        return _Pieces(**{f: v[order] for f, v in merged.items()})


def sequences_from_tables(calls: pa.Table, rollouts: pa.Table, *, include_open: bool = True) -> pa.Table:
    """Build sequences from already-read tables (columns :data:`CALL_COLUMNS` / :data:`ROLLOUT_COLUMNS`).

    The follower and the exports call this on tables they read themselves (new shards only,
    other filesystems); :func:`build_sequences` is the tape-path front door.
    """
    plan = plan_sequences(calls, rollouts, include_open=include_open)
    return SEQUENCE_SCHEMA.empty_table() if plan is None else plan.table()


@dataclass
class SequencePlan:
    """Sequences as runs of stored tokens, before any token is moved, with per-sequence values.

    The loader packs micro-batches straight from the stored columns through this plan
    (:meth:`gather` in bin order), moving each token once; :meth:`table` materialises C1.
    """

    pieces: _Pieces
    piece_start: np.ndarray  # first piece of each sequence (pieces are sorted by sequence)
    piece_count: np.ndarray
    lengths: np.ndarray  # tokens per sequence
    store_ids: RunStore  # prompt-suffix values, then generation values (int32), as read
    store_lp: RunStore  # generation logprobs, then ``widest`` zeros (float32)
    n_suffix: int
    widest: int
    values: dict[str, pa.Array]  # per-sequence columns of SEQUENCE_SCHEMA (not the token lists)

    @property
    def num_sequences(self) -> int:
        return self.lengths.size

    def gather(self, seqs: np.ndarray) -> tuple[pa.Array, pa.Array, np.ndarray, np.ndarray]:
        """The sequences ``seqs`` back to back, in that order: (input_ids int32, behaviour_logprobs
        float32, and per piece whether it is generated and its length: the loss mask is
        ``np.repeat(is_gen, piece_len)``)."""
        seqs = np.asarray(seqs, dtype=np.int64)
        count = self.piece_count[seqs]
        total = int(count.sum())
        out_start = np.zeros(seqs.size, dtype=np.int64)
        np.cumsum(count[:-1], out=out_start[1:])
        rows = np.arange(total, dtype=np.int64) + np.repeat(self.piece_start[seqs] - out_start, count)
        p = self.pieces
        src, length, is_gen = p.src[rows], p.len[rows], p.kind[rows] == _GEN
        ids = self.store_ids.gather(src, length)
        lp = self.store_lp.gather(np.where(is_gen, src - self.n_suffix, len(self.store_lp) - self.widest), length)
        return ids, lp, is_gen, length

    def table(self) -> pa.Table:
        """The C1 sequence table (schema :data:`SEQUENCE_SCHEMA`), rows in (rollout, segment) order."""
        ids, lp, is_gen, piece_len = self.gather(np.arange(self.num_sequences))
        mask = pa.array(np.repeat(is_gen.view(np.int8), piece_len))
        p = self.pieces  # all sequences in order: the gathered pieces are the plan's pieces
        call_of_token = np.repeat(np.where(is_gen, p.call, -1).astype(np.int16), piece_len)
        offsets = np.zeros(self.num_sequences + 1, dtype=np.int32)
        np.cumsum(self.lengths, out=offsets[1:])
        off = pa.array(offsets)
        columns = {
            **self.values,
            "input_ids": pa.ListArray.from_arrays(off, ids),
            "loss_mask": pa.ListArray.from_arrays(off, mask),
            "behaviour_logprobs": pa.ListArray.from_arrays(off, lp),
            "token_call_index": pa.ListArray.from_arrays(off, pa.array(call_of_token, pa.int16())),
        }
        return pa.Table.from_arrays([columns[f.name] for f in SEQUENCE_SCHEMA], schema=SEQUENCE_SCHEMA)


def plan_sequences(calls: pa.Table, rollouts: pa.Table, *, include_open: bool = True) -> SequencePlan | None:
    """The :class:`SequencePlan` of already-read tables (None when no call gives a sequence)."""
    rollouts = first_row_per_rollout(rollouts)
    calls = _keep_usable_calls(calls, rollouts, include_open)
    if calls.num_rows == 0:
        return None

    rid_codes, rid_dict = _codes(calls["rollout_id"])
    call_index = _np(calls["call_index"], np.int64)
    order = np.lexsort((call_index, rid_codes))
    rid = rid_codes[order]
    ci = call_index[order]
    prefix = _np(calls["prefix_len"], np.int64)[order]
    plen = _np(calls["prompt_len"], np.int64)[order]
    suffix = _list(calls["prompt_suffix_ids"])
    gen = _list(calls["generation_ids"])
    glp = _list(calls["generation_logprobs"])
    s_start, s_len = suffix[0][order], suffix[1][order]
    g_start, g_len = gen[0][order], gen[1][order]
    if not np.array_equal(gen[1], glp[1]):
        raise TapeError("a call's generation_logprobs is not as long as its generation_ids; the tape is corrupt")
    if any(v.null_count for v in (*suffix[2], *gen[2], *glp[2])):
        raise TapeError("a call's prompt_suffix_ids, generation_ids or generation_logprobs holds a null value; "
                        "the tape is corrupt (run `gymtape check`)")

    n = rid.size
    new_rollout = np.ones(n, dtype=bool)
    new_rollout[1:] = rid[1:] != rid[:-1]
    prev_ctx = np.zeros(n, dtype=np.int64)
    prev_ctx[1:] = plen[:-1] + g_len[:-1]
    prev_ctx[new_rollout] = 0
    _check_calls(calls, order, new_rollout, ci, prefix, plen, s_len, prev_ctx, rid_dict, rid)

    seg_start = new_rollout | (prefix != prev_ctx)
    rewrite = seg_start & ~new_rollout
    seg_of_call = np.cumsum(seg_start) - 1
    seg_first = np.flatnonzero(seg_start)
    seg_last = np.empty_like(seg_first)
    seg_last[:-1] = seg_first[1:] - 1
    seg_last[-1] = n - 1
    rollout_first_seg = np.maximum.accumulate(np.where(new_rollout[seg_first], np.arange(seg_first.size), 0))
    seg_level = np.arange(seg_first.size) - rollout_first_seg

    # Each segment is the context after its last call.
    seg_len = plen[seg_last] + g_len[seg_last]
    if int(seg_len.sum()) > np.iinfo(np.int32).max:
        raise TapeError(
            f"the selected rollouts hold {int(seg_len.sum()):,} sequence tokens, more than one Arrow list column "
            "holds (2^31); build sequences for fewer rollouts at a time (rollout_ids=...)"
        )

    # Each sequence is a run of pieces of the stored columns: per call its prompt suffix, then its
    # generation; a rewritten segment first repeats the start of the previous segment (copy
    # pieces, resolved into pieces of the stored columns). Tokens are later moved once, a memcpy
    # per piece straight from the read's buffers (RunStore): no per-token index arrays.
    n_suffix_vals = sum(len(v) for v in suffix[2])
    pieces = _Pieces.own(seg_of_call, ci, s_start, s_len, g_start + n_suffix_vals, g_len)
    copy_len = np.zeros(seg_first.size, dtype=np.int64)
    copy_len[seg_of_call[rewrite]] = prefix[rewrite]
    for level in range(1, int(seg_level.max()) + 1):
        pieces = pieces.with_copies(np.flatnonzero((seg_level == level) & (copy_len > 0)), copy_len)
    if not np.array_equal(np.bincount(pieces.seg, weights=pieces.len, minlength=seg_len.size), seg_len):
        raise TapeError(
            "rebuilt sequences disagree with the calls' prompt_len; the tape is corrupt (run `gymtape check`)"
        )
    piece_count = np.bincount(pieces.seg, minlength=seg_len.size)
    piece_start = np.zeros(seg_len.size, dtype=np.int64)
    np.cumsum(piece_count[:-1], out=piece_start[1:])
    widest = int(pieces.len.max()) if pieces.len.size else 0

    # Per-sequence values.
    num_generated = np.add.reduceat(g_len, seg_first)
    first_gen_at = np.minimum.reduceat(np.where(g_len > 0, plen, np.iinfo(np.int64).max), seg_first)
    prompt_len = np.where(num_generated > 0, first_gen_at, seg_len)
    versions = _np(calls["policy_version"], np.int64)[order]
    seq_rid = rid_dict.take(pa.array(rid[seg_first]))
    level = seg_level.astype(np.int32)
    values = {
        "sequence_id": pc.binary_join_element_wise(seq_rid, pc.cast(pa.array(level), pa.string()), "/"),
        "rollout_id": seq_rid,
        "segment": pa.array(level),
        "split_reason": pa.array(np.where(level == 0, "start", "history_rewrite"), pa.string()),
        "first_call_index": pa.array(ci[seg_first].astype(np.int32)),
        "num_calls": pa.array((seg_last - seg_first + 1).astype(np.int32)),
        "prompt_len": pa.array(prompt_len.astype(np.int32)),
        "num_generated": pa.array(num_generated.astype(np.int32)),
        **_join_rollouts(seq_rid, rollouts),
        "min_policy_version": pa.array(np.minimum.reduceat(versions, seg_first)),
        "max_policy_version": pa.array(np.maximum.reduceat(versions, seg_first)),
    }
    return SequencePlan(
        pieces=pieces,
        piece_start=piece_start,
        piece_count=piece_count,
        lengths=seg_len,
        # The read's own buffers: tokens are copied once, when micro-batches are packed.
        store_ids=RunStore([*suffix[2], *gen[2]]),
        store_lp=RunStore([*glp[2], pa.array(np.zeros(widest, np.float32))]),
        n_suffix=n_suffix_vals,
        widest=widest,
        values=values,
    )


# -- helpers ----------------------------------------------------------------------------------


def _np(col: pa.ChunkedArray | pa.Array, dtype: type) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _list(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, list[pa.Array]]:
    """(starts, lengths, values) of a list column, without copying its values.

    ``values`` are the slices of each chunk's values that its rows reference; ``starts`` index
    their concatenation, which the caller builds once together with whatever else shares the
    buffer (a Parquet read gives a chunk per row group: combining them first would copy every
    stored token once more).
    """
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    starts, lengths, values = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], []
    base = 0
    for chunk in chunks:
        offsets = chunk.offsets.to_numpy().astype(np.int64)
        lo, hi = int(offsets[0]), int(offsets[-1])
        starts.append(offsets[:-1] - lo + base)
        lengths.append(np.diff(offsets))
        values.append(chunk.values.slice(lo, hi - lo))
        base += hi - lo
    return np.concatenate(starts), np.concatenate(lengths), values


def _codes(col: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Integer code per row and the dictionary, codes ordered like the strings (sorted dictionary)."""
    enc = pc.dictionary_encode(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
    dictionary = enc.dictionary
    rank = np.empty(len(dictionary), dtype=np.int64)
    sort = pc.sort_indices(dictionary).to_numpy()
    rank[sort] = np.arange(sort.size)
    return rank[enc.indices.to_numpy()], dictionary.take(pa.array(sort))


def _keep_usable_calls(calls: pa.Table, rollouts: pa.Table, include_open: bool) -> pa.Table:
    """Drop calls of rollouts that cannot give a sequence (token_status not ok; open ones if asked)."""
    if calls.num_rows == 0:
        return calls
    rid = calls["rollout_id"]
    bad_calls = pc.not_equal(calls["token_status"], "ok")
    bad_rids = pc.unique(pc.filter(rid, bad_calls))
    if rollouts.num_rows:
        bad_rollouts = pc.filter(rollouts["rollout_id"], pc.not_equal(rollouts["token_status"], "ok"))
        bad_rids = pa.concat_arrays([bad_rids.cast(pa.string()), bad_rollouts.combine_chunks()])
    keep = pc.invert(pc.is_in(rid, value_set=bad_rids))
    if not include_open:
        keep = pc.and_(keep, pc.is_in(rid, value_set=rollouts["rollout_id"].combine_chunks()))
    return calls.filter(keep) if not pc.all(keep).as_py() else calls


def _check_calls(
    calls: pa.Table,
    order: np.ndarray,
    new_rollout: np.ndarray,
    ci: np.ndarray,
    prefix: np.ndarray,
    plen: np.ndarray,
    s_len: np.ndarray,
    prev_ctx: np.ndarray,
    rid_dict: pa.Array,
    rid: np.ndarray,
) -> None:
    """Refuse calls whose prompts cannot be rebuilt exactly (a missing or duplicated call)."""
    expected_ci = np.arange(ci.size) - np.maximum.accumulate(np.where(new_rollout, np.arange(ci.size), 0))
    bad = (ci != expected_ci) | (prefix > prev_ctx) | (prefix + s_len != plen)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        where = f"rollout {rid_dict[int(rid[i])].as_py()} call {int(ci[i])}"
        if ci[i] != expected_ci[i]:
            raise TapeError(
                f"{where}: call indices of the rollout are not 0, 1, 2, ... (a call is missing or recorded "
                "twice); its prompts cannot be rebuilt. Run `gymtape check` on the tape, or leave the rollout "
                "out (rollout_ids=...)"
            )
        if prefix[i] > prev_ctx[i]:
            raise TapeError(
                f"{where}: prefix_len {int(prefix[i])} exceeds the previous context ({int(prev_ctx[i])} tokens); "
                "a call of this rollout is missing from the tape"
            )
        raise TapeError(f"{where}: prompt_len {int(plen[i])} != prefix_len + suffix length; the tape is corrupt")


def _join_rollouts(seq_rid: pa.Array, rollouts: pa.Table) -> dict[str, pa.Array]:
    names = ["reward", "group_key", "env", "task_index", "rollout_index", "status"]
    if rollouts.num_rows == 0:
        out = {c: pa.nulls(len(seq_rid), SEQUENCE_SCHEMA.field(c).type) for c in names}
        out["status"] = pa.array([OPEN_STATUS] * len(seq_rid), pa.string())
        return out
    idx = pc.index_in(seq_rid, value_set=rollouts["rollout_id"].combine_chunks())
    out = {c: rollouts[c].combine_chunks().take(idx).cast(SEQUENCE_SCHEMA.field(c).type) for c in names}
    out["status"] = pc.fill_null(out["status"], OPEN_STATUS)
    return out
