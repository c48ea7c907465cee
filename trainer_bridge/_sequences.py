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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recorder import Tape, TapeError

from ._errors import BridgeValueError
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
        is_prev = np.zeros(copy_len.size, dtype=bool)
        is_prev[targets - 1] = True
        take = is_prev[self.seg]
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
        # Merge (both are sorted by segment): a segment's copy pieces go just before its own.
        at = np.searchsorted(self.seg, copies.seg, side="left")
        copy_to = at + np.arange(at.size)
        own_to = np.arange(self.seg.size) + np.cumsum(np.bincount(at, minlength=self.seg.size + 1))[:self.seg.size]
        merged = {}
        for f in ("seg", "kind", "src", "len", "call"):
            mine, theirs = getattr(self, f), getattr(copies, f)
            out = merged[f] = np.empty(mine.size + theirs.size, dtype=mine.dtype)
            out[copy_to], out[own_to] = theirs, mine
        return _Pieces(**merged)


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
    values: Mapping[str, pa.Array]  # per-sequence columns of SEQUENCE_SCHEMA (not the token lists)
    rollout_row: np.ndarray  # each sequence's row in the rollouts table planned with (-1: none, an open rollout)

    @property
    def num_sequences(self) -> int:
        return self.lengths.size

    def gather(self, seqs: np.ndarray) -> tuple[pa.Array, pa.Array, np.ndarray, np.ndarray]:
        """The sequences ``seqs`` back to back, in that order: (input_ids int32, behaviour_logprobs
        float32, and per piece whether it is generated and its length: the loss mask is
        ``np.repeat(is_gen, piece_len)``)."""
        rows, _ = self.piece_rows(seqs)
        p = self.pieces
        src, length, is_gen = p.src[rows], p.len[rows], p.kind[rows] == _GEN
        ids = self.store_ids.gather(src, length)
        lp = self.store_lp.gather(self.lp_sources(src, is_gen), length)
        return ids, lp, is_gen, length

    def piece_rows(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pieces of the sequences ``seqs``, back to back (rows of :attr:`pieces`), and where
        each sequence's pieces start among them (``seqs.size + 1`` bounds)."""
        seqs = np.asarray(seqs, dtype=np.int64)
        count = self.piece_count[seqs]
        bounds = np.zeros(seqs.size + 1, dtype=np.int64)
        np.cumsum(count, out=bounds[1:])
        rows = np.arange(int(bounds[-1]), dtype=np.int64) + np.repeat(self.piece_start[seqs] - bounds[:-1], count)
        return rows, bounds

    def lp_sources(self, src: np.ndarray, is_gen: np.ndarray) -> np.ndarray:
        """Where in :attr:`store_lp` each piece's logprobs start: its generation's, or zeros."""
        return np.where(is_gen, src - self.n_suffix, len(self.store_lp) - self.widest)

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


def plan_sequences(calls: pa.Table, rollouts: pa.Table, *, include_open: bool = True,
                   rows: np.ndarray | None = None) -> SequencePlan | None:
    """The :class:`SequencePlan` of already-read tables (None when no call gives a sequence).

    ``rows``: plan only the rollouts at these rows of ``rollouts`` (with ``include_open=False``:
    a loader shard's share of a selection, without taking those rows out of the table first).
    """
    if calls.num_rows == 0:
        return None
    if rows is not None and include_open:
        raise BridgeValueError("plan_sequences(rows=...) plans rows of `rollouts`: pass include_open=False")
    # Rollout IDs are hashed once: each call gets the code of its rollout, each code its rollout
    # row (the first, as first_row_per_rollout keeps), and which rollouts can give a sequence is
    # a flag per code. Unusable calls are left out by index, never by filtering the table (which
    # would copy every token of the kept calls).
    rid_codes, rid_dict, row_of_code = _codes(calls["rollout_id"], rollouts)
    usable = _usable_rollouts(calls, rid_codes, rollouts, row_of_code, include_open)
    if rows is not None:
        wanted = np.zeros(rollouts.num_rows + 1, dtype=bool)  # the last: no row
        wanted[np.asarray(rows, dtype=np.int64)] = True
        usable &= wanted[row_of_code]
    keep = usable[rid_codes]
    kept = None if keep.all() else np.flatnonzero(keep)
    if kept is not None and kept.size == 0:
        return None
    call_index = _np(calls["call_index"], np.int64)
    # Calls in (rollout, call index) order: a compacted tape stores them so already.
    key = rid_codes * (int(call_index.max()) + 1) + call_index if call_index.size else call_index
    if kept is not None:
        key = key[kept]
    order = np.argsort(key, kind="stable")
    if kept is not None:
        order = kept[order]
    rid = rid_codes[order]
    ci = call_index[order]
    prefix = _np(calls["prefix_len"], np.int64)[order]
    plen = _np(calls["prompt_len"], np.int64)[order]
    suffix = _list(calls["prompt_suffix_ids"])
    gen = _list(calls["generation_ids"])
    glp = _list(calls["generation_logprobs"])
    s_start, s_len = suffix[0][order], suffix[1][order]
    g_start, g_len = gen[0][order], gen[1][order]
    if not np.array_equal(g_len, glp[1][order]):
        raise TapeError("a call's generation_logprobs is not as long as its generation_ids; the tape is corrupt")
    if any(v.null_count for v in (*suffix[2], *gen[2], *glp[2])) and _null_in_kept(calls, order):
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
    def num_generated() -> np.ndarray:
        return np.add.reduceat(g_len, seg_first)

    def prompt_len() -> np.ndarray:
        first_gen_at = np.minimum.reduceat(np.where(g_len > 0, plen, np.iinfo(np.int64).max), seg_first)
        return np.where(num_generated() > 0, first_gen_at, seg_len)

    seq_codes = rid[seg_first]
    seq_row = row_of_code[seq_codes]
    level = seg_level.astype(np.int32)
    versions = calls["policy_version"]
    # Per-sequence columns, each made when first read: the loader reads three of them,
    # :meth:`SequencePlan.table` all.
    values = _LazyColumns({
        "sequence_id": lambda: pc.binary_join_element_wise(
            values["rollout_id"], pc.cast(pa.array(level), pa.string()), "/"),
        "rollout_id": lambda: rid_dict.take(pa.array(seq_codes)),
        "segment": lambda: pa.array(level),
        "split_reason": lambda: pc.if_else(pa.array(level == 0), "start", "history_rewrite"),
        "first_call_index": lambda: pa.array(ci[seg_first].astype(np.int32)),
        "num_calls": lambda: pa.array((seg_last - seg_first + 1).astype(np.int32)),
        "prompt_len": lambda: pa.array(prompt_len().astype(np.int32)),
        "num_generated": lambda: pa.array(num_generated().astype(np.int32)),
        **_joined_columns(seq_row, rollouts),
        "min_policy_version": lambda: pa.array(np.minimum.reduceat(_np(versions, np.int64)[order], seg_first)),
        "max_policy_version": lambda: pa.array(np.maximum.reduceat(_np(versions, np.int64)[order], seg_first)),
    })
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
        rollout_row=seq_row,
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


def _codes(col: pa.ChunkedArray, rollouts: pa.Table) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """Integer code per call, the dictionary (codes ordered like the strings: sorted), and each
    code's row in ``rollouts`` (its first row with that rollout_id; -1 when it has none)."""
    enc = pc.dictionary_encode(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
    dictionary = enc.dictionary
    codes = enc.indices.to_numpy(zero_copy_only=False)
    n = len(dictionary)
    if n < 2 or pc.all(pc.less(dictionary.slice(0, n - 1), dictionary.slice(1))).as_py():
        ordered = dictionary  # first-seen order is string order: calls stored by rollout (compacted)
    else:
        sort = pc.sort_indices(dictionary).to_numpy()
        rank = np.empty(n, dtype=np.int64)
        rank[sort] = np.arange(n)
        codes, ordered = rank[codes], dictionary.take(pa.array(sort))
    if rollouts.num_rows:
        rids = rollouts["rollout_id"].combine_chunks()
        if ordered.equals(rids):  # the rollouts are the calls' rollouts, in order (a loader's selection)
            row_of_code = np.arange(n, dtype=np.int64)
        else:
            row = pc.index_in(ordered, value_set=rids)  # first occurrence
            row_of_code = pc.fill_null(row, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        row_of_code = np.full(len(ordered), -1, dtype=np.int64)
    return codes.astype(np.int64, copy=False), ordered, row_of_code


def _usable_rollouts(calls: pa.Table, codes: np.ndarray, rollouts: pa.Table, row_of_code: np.ndarray,
                     include_open: bool) -> np.ndarray:
    """Per rollout code: can it give a sequence? Not when any of its calls, or its (first)
    rollout row, has a token_status other than ``ok``; not without a rollout row unless
    ``include_open``."""
    usable = np.ones(row_of_code.size, dtype=bool)
    bad_calls = _flag(pc.not_equal(calls["token_status"], "ok"))
    usable[codes[bad_calls]] = False
    has_row = row_of_code >= 0
    if rollouts.num_rows:
        bad_rows = _flag(pc.not_equal(rollouts["token_status"], "ok"))
        usable[has_row] &= ~bad_rows[row_of_code[has_row]]
    if not include_open:
        usable &= has_row
    return usable


def _flag(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A boolean column as numpy, null as False (as ``filter`` reads it)."""
    return _np(pc.fill_null(mask, False), bool)


def _null_in_kept(calls: pa.Table, order: np.ndarray) -> bool:
    """Whether a null token value belongs to one of the calls ``order`` (not to a call left out)."""
    kept = calls.take(pa.array(order)).select(["prompt_suffix_ids", "generation_ids", "generation_logprobs"])
    return any(pc.list_flatten(kept[c]).null_count for c in kept.column_names)


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


def _joined_columns(seq_row: np.ndarray, rollouts: pa.Table) -> dict[str, Callable[[], pa.Array]]:
    """Makers of the rollout row's columns for each sequence (null, status ``open``, without a row)."""
    names = ["reward", "group_key", "env", "task_index", "rollout_index", "status"]
    if rollouts.num_rows == 0:
        out = {c: partial(pa.nulls, len(seq_row), SEQUENCE_SCHEMA.field(c).type) for c in names}
        out["status"] = lambda: pa.array([OPEN_STATUS] * len(seq_row), pa.string())
        return out
    rows = pa.array(seq_row, mask=seq_row < 0)

    def column(name: str) -> pa.Array:
        col = rollouts[name].combine_chunks().take(rows).cast(SEQUENCE_SCHEMA.field(name).type)
        return pc.fill_null(col, OPEN_STATUS) if name == "status" else col

    return {c: partial(column, c) for c in names}


class _LazyColumns(Mapping[str, pa.Array]):
    """Named columns, each made by its maker when first read, then kept."""

    def __init__(self, makers: dict[str, Callable[[], pa.Array]]) -> None:
        self._makers = makers
        self._made: dict[str, pa.Array] = {}

    def __getitem__(self, name: str) -> pa.Array:
        col = self._made.get(name)
        if col is None:
            col = self._made[name] = self._makers[name]()
        return col

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)
