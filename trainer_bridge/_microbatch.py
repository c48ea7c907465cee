"""Micro-batches: sequences (C1 rows) packed under a token budget, with per-token training arrays.

Both the epoch-based :class:`~trainer_bridge.TapeDataset` and the asynchronous
:class:`~trainer_bridge.TapeFollower` end here, so a training step consumes the same object
whichever feeds it. Bins come from C2's :func:`~trainer_bridge.plan_bins`; each bin becomes the
:class:`~trainer_bridge.PackedBatch` that C2's :func:`~trainer_bridge.pack` would build.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from itertools import pairwise

import numpy as np
import pyarrow as pa
import torch

from ._packing import Bins, PackedBatch, pack, plan_bins
from ._runs import Fill, RunStore, copy_runs
from ._sequences import _GEN, SequencePlan

#: Per-token arrays every micro-batch carries in ``extras`` (each ``[1, T]``).
EXTRA_KEYS = ("loss_mask", "behaviour_logprobs", "advantages", "weights")


@dataclass
class MicroBatch(PackedBatch):
    """A :class:`PackedBatch` (so ``packed_token_logprobs`` takes it directly) plus bookkeeping.

    ``extras`` holds ``loss_mask`` (bool, true on generated tokens), ``behaviour_logprobs``
    (sampling logprobs, 0.0 off the mask), ``advantages`` (the sequence's advantage on each of
    its tokens) and ``weights`` (1.0, or the follower's staleness down-weight), all ``[1, T]``,
    the last three float32. The loader hands out these compact dtypes (int32 IDs, bool mask)
    because they are what crosses worker processes and the host-to-device copy; the loss
    helpers take them as they are.
    Per-sequence lists/tensors follow ``index`` order (packed order). The tensors may be views
    of a larger buffer (all-ones ``weights`` a broadcast view): treat them as read-only and
    ``.clone()`` before writing in place.
    """

    sequence_ids: list[str] = field(default_factory=list)
    group_keys: list[str | None] = field(default_factory=list)
    rewards: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    seq_advantages: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    seq_weights: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    #: Epoch (dataset) or batch number (follower) the micro-batch belongs to.
    epoch: int = 0
    #: Which loader shard produced it: ``(rank, world_size, worker_id, num_workers)``.
    shard: tuple[int, int, int, int] = (0, 1, 0, 1)
    #: Position of this micro-batch in its shard's epoch stream (what resume counts).
    batch_index: int = 0

    def to(self, device: torch.device | str) -> MicroBatch:
        moved = super().to(device)
        return MicroBatch(moved.input_ids, moved.position_ids, moved.cu_seqlens, moved.index, moved.extras,
                          self.sequence_ids, self.group_keys, self.rewards, self.seq_advantages, self.seq_weights,
                          self.epoch, self.shard, self.batch_index)

    @property
    def num_generated(self) -> int:
        return int(self.extras["loss_mask"].sum().item())


#: Per-sequence bookkeeping a training step does not read: cut for a packed micro-batch when first read.
_LAZY_FIELDS = frozenset({"sequence_ids", "group_keys", "rewards", "seq_advantages", "seq_weights"})


class _PackedMicroBatch(MicroBatch):
    """A :class:`MicroBatch` from :func:`packed_windows`: the same fields and values, but its
    per-sequence bookkeeping (``sequence_ids``, ``group_keys``, ``rewards``, ``seq_advantages``,
    ``seq_weights``) is cut from the epoch's arrays when first read (a training step reads the
    token tensors and ``cu_seqlens``, so the loader does not make three tensors and two lists
    per micro-batch for it). Pickles (DataLoader workers) and copies as a plain MicroBatch."""

    def __getattr__(self, name: str) -> object:  # only for attributes not set yet
        if name not in _LAZY_FIELDS or "_book" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        book, m0, m1 = self.__dict__["_book"]
        value = self.__dict__[name] = book.cut(name, m0, m1)
        return value

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return MicroBatch, tuple(getattr(self, f.name) for f in fields(MicroBatch))


class _Bookkeeping:
    """One packed epoch's per-sequence values, in micro-batch order (see :class:`_PackedMicroBatch`)."""

    def __init__(self, plan: SequencePlan, order: np.ndarray, advantages: np.ndarray, weights: np.ndarray) -> None:
        self._plan, self._order = plan, order
        self._arrays = {"seq_advantages": advantages, "seq_weights": weights}
        self._lists: dict[str, list] = {}

    def cut(self, name: str, m0: int, m1: int) -> object:
        if name in ("sequence_ids", "group_keys"):
            values = self._lists.get(name)
            if values is None:  # all of them at once: one conversion, then slices
                column = self._plan.values["sequence_id" if name == "sequence_ids" else "group_key"]
                values = self._lists[name] = column.take(self._order).to_pylist()
            return values[m0:m1]
        arr = self._arrays.get(name)
        if arr is None:
            reward = self._plan.values["reward"].to_numpy(zero_copy_only=False).astype(np.float64)
            arr = self._arrays[name] = reward[self._order]
        return torch.from_numpy(arr[m0:m1])


class SequenceArrays:
    """Zero-copy numpy views of a C1 sequence table's token columns and per-sequence values."""

    def __init__(self, table: pa.Table, advantages: np.ndarray, weights: np.ndarray) -> None:
        ids = table["input_ids"].combine_chunks()
        offsets = ids.offsets.to_numpy().astype(np.int64)
        self.starts = offsets[:-1] - offsets[0]
        self.lengths = np.diff(offsets)
        self.ids = _values(table["input_ids"])
        self.mask = _values(table["loss_mask"])
        self.logprobs = _values(table["behaviour_logprobs"])
        self.sequence_ids = table["sequence_id"].to_pylist()
        self.group_keys = table["group_key"].to_pylist()
        self.rewards = table["reward"].to_numpy(zero_copy_only=False).astype(np.float64)
        self.advantages = np.asarray(advantages, dtype=np.float32)
        self.weights = np.asarray(weights, dtype=np.float32)

    def __len__(self) -> int:
        return self.lengths.size

    def plan(self, token_budget: int, max_seqs: int | None = None) -> list[np.ndarray]:
        """Bins of sequence indices (C2 first-fit-decreasing); empty sequences are left out."""
        nonempty = np.flatnonzero(self.lengths > 0)
        return [nonempty[b] for b in plan_bins(self.lengths[nonempty], token_budget, max_seqs=max_seqs)]

    def micro_batch(self, members: np.ndarray, *, epoch: int = 0, shard: tuple[int, int, int, int] = (0, 1, 0, 1),
                    batch_index: int = 0) -> MicroBatch:
        """Pack the sequences ``members`` (rows of the table) into one micro-batch.

        Built by C2's :func:`pack` from views of the flat columns. The follower and
        :func:`micro_batches` pack this way; the epoch loader packs whole windows at once
        (:func:`packed_windows`, a test holds it equal to this).
        """
        members = np.asarray(members, dtype=np.int64)
        pieces = [slice(int(a), int(a + n)) for a, n in zip(self.starts[members], self.lengths[members])]
        batch = pack([self.ids[p] for p in pieces], index=members, extras={
            "loss_mask": [self.mask[p].astype(bool) for p in pieces],
            "behaviour_logprobs": [self.logprobs[p] for p in pieces],
            "advantages": [np.full(p.stop - p.start, self.advantages[m], np.float32) for p, m in zip(pieces, members)],
            "weights": [np.full(p.stop - p.start, self.weights[m], np.float32) for p, m in zip(pieces, members)],
        })
        return MicroBatch(
            batch.input_ids, batch.position_ids, batch.cu_seqlens, members, batch.extras,
            sequence_ids=[self.sequence_ids[i] for i in members.tolist()],
            group_keys=[self.group_keys[i] for i in members.tolist()],
            rewards=torch.from_numpy(self.rewards[members]),
            seq_advantages=torch.from_numpy(self.advantages[members]),
            seq_weights=torch.from_numpy(self.weights[members]),
            epoch=epoch, shard=shard, batch_index=batch_index,
        )


def _values(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks()
    base = arr.offsets[0].as_py() if len(arr) else 0
    return arr.values.to_numpy(zero_copy_only=False)[base:]


def packed_windows(
    plan: SequencePlan,
    bins: list[np.ndarray] | Bins,
    advantages: np.ndarray,
    weights: np.ndarray,
    *,
    epoch: int = 0,
    shard: tuple[int, int, int, int] = (0, 1, 0, 1),
    first_index: int = 0,
    window_tokens: int = 1 << 18,
) -> Iterator[MicroBatch]:
    """Micro-batches for ``bins`` (sequence rows of ``plan``), packed straight from the stored columns.

    Equal to :meth:`SequenceArrays.micro_batch` on the same bins (a test holds them equal).
    What is per run of stored tokens, per sequence or per bin is worked out once for all bins
    (numpy over the runs, never over tokens). Tokens move in windows of about
    ``window_tokens`` tokens (whole bins): ONE copy per window writes the window's input IDs,
    positions, logprobs, advantages (weights) and loss mask into one buffer, run by run
    (:func:`~trainer_bridge._runs.copy_runs`); each micro-batch's tensors are slices of it.
    Per micro-batch that leaves seven tensor views and an object; its per-sequence bookkeeping
    is cut when first read (:class:`_PackedMicroBatch`). Once a window's micro-batches are
    consumed only the next window's buffer is alive, and a window small enough to stay in
    cache is cheaper per token to write than a large one.
    """
    if not isinstance(bins, Bins):
        bins = Bins.of(bins)
    n_bins = len(bins)
    if n_bins == 0:
        return
    sizes = bins.sizes
    order = bins.members  # every sequence, in micro-batch order
    lengths = plan.lengths[order]
    seq_off = np.zeros(order.size + 1, dtype=np.int64)  # first token of each sequence
    np.cumsum(lengths, out=seq_off[1:])
    bin_seq = np.zeros(n_bins + 1, dtype=np.int64)  # first sequence of each bin
    np.cumsum(sizes, out=bin_seq[1:])
    bin_tok = seq_off[bin_seq]  # first token of each bin
    tokens = np.diff(bin_tok)
    # Windows: runs of whole bins of about window_tokens each (a bin larger than that is one window).
    cuts = np.flatnonzero(np.diff(bin_tok[:-1] // window_tokens)) + 1
    edges = [0, *cuts.tolist(), n_bins]

    # Every per-token array is runs of a source, each run a binary view into one buffer list:
    # token IDs (a run per stored piece), positions (a run of a 0, 1, 2, ... ramp per sequence),
    # logprobs (the generation's, or zeros, per piece), advantages (the sequence's value),
    # weights (unless all ones) and the loss mask (bytes: 1 on generated pieces). A window's
    # arrays are then one copy into one buffer.
    rows, seq_piece = plan.piece_rows(order)
    p = plan.pieces
    src, piece_len = p.src[rows], p.len[rows]
    is_gen = p.kind[rows] == _GEN
    advantages = np.asarray(advantages, dtype=np.float32)[order]
    weights = np.asarray(weights, dtype=np.float32)[order]
    all_ones = bool((weights == 1.0).all())
    ramp = _ramp(int(lengths.max()))
    adv_fill = Fill.of(advantages, lengths)
    w_fill = None if all_ones else Fill.of(weights, lengths)
    mask_fill = Fill(np.array([0, 1], np.uint8), is_gen, piece_len)
    stores = [plan.store_ids, ramp, plan.store_lp, adv_fill.store, *([w_fill.store] if w_fill else []),
              mask_fill.store]
    base = np.cumsum([0, *(len(st.buffers) for st in stores)]).tolist()
    buffers = [b for st in stores for b in st.buffers]
    # Region by region: the views, and where each sequence's views start (None: one view each).
    regions = [
        (plan.store_ids.views(src, piece_len, buffer_base=base[0]), seq_piece),
        (ramp.views(np.zeros(order.size, np.int64), lengths, buffer_base=base[1]), None),
        (plan.store_lp.views(plan.lp_sources(src, is_gen), piece_len, buffer_base=base[2]), seq_piece),
        (adv_fill.views(buffer_base=base[3]), adv_fill.bounds),
        *([(w_fill.views(buffer_base=base[4]), w_fill.bounds)] if w_fill else []),
        (mask_fill.views(buffer_base=base[-2]), mask_fill.bounds[seq_piece]),
    ]
    del rows, src, is_gen

    # cu_seqlens of every bin, back to back: 0, then each member's end relative to its bin's start.
    cu = np.zeros(order.size + n_bins, dtype=np.int32)
    member = np.arange(order.size) + np.repeat(np.arange(1, n_bins + 1), sizes)
    cu[member] = seq_off[1:] - np.repeat(bin_tok[:-1], sizes)
    cu_t = _cut(torch.from_numpy(cu), (sizes + 1).tolist())
    book = _Bookkeeping(plan, order, advantages, weights)
    bin_tokens = tokens.tolist()
    if all_ones:  # the dataset's case: a broadcast view per micro-batch, no memory
        ones_t = _cut(torch.ones(1, 1).expand(1, int(seq_off[-1])), bin_tokens, dim=1)
    starts = bin_seq.tolist()
    wide = 4 + (w_fill is not None)  # 4-byte regions before the mask bytes
    new = object.__new__

    for b0, b1 in pairwise(edges):
        s0, s1 = starts[b0], starts[b1]
        n = int(seq_off[s1] - seq_off[s0])
        views = np.concatenate([v[s0:s1] if at is None else v[int(at[s0]):int(at[s1])] for v, at in regions])
        data = np.frombuffer(copy_runs(views, buffers, (4 * wide + 1) * n), np.uint8)
        flat = torch.from_numpy(data[:4 * wide * n].view(np.int32))[None]
        cut = bin_tokens[b0:b1]
        ids = _cut(flat[:, :n], cut, dim=1)
        pos = _cut(flat[:, n:2 * n], cut, dim=1)
        lp = _cut(flat[:, 2 * n:3 * n].view(torch.float32), cut, dim=1)
        adv = _cut(flat[:, 3 * n:4 * n].view(torch.float32), cut, dim=1)
        wts = ones_t[b0:b1] if all_ones else _cut(flat[:, 4 * n:5 * n].view(torch.float32), cut, dim=1)
        mask = _cut(torch.from_numpy(data[4 * wide * n:].view(np.bool_))[None], cut, dim=1)
        del data, flat
        for j in range(b1 - b0):
            b = b0 + j
            m0, m1 = starts[b], starts[b + 1]
            mb = new(_PackedMicroBatch)
            mb.__dict__ = {
                "input_ids": ids[j], "position_ids": pos[j], "cu_seqlens": cu_t[b], "index": order[m0:m1],
                "extras": {"loss_mask": mask[j], "behaviour_logprobs": lp[j], "advantages": adv[j],
                           "weights": wts[j]},
                "epoch": epoch, "shard": shard, "batch_index": first_index + b, "_book": (book, m0, m1),
            }
            yield mb
        # Let go of this window before gathering the next: once its micro-batches are consumed,
        # one window's arrays are alive at a time, not two.
        del ids, pos, lp, mask, adv, wts


def _cut(t: torch.Tensor, sizes: list[int], dim: int = 0) -> tuple[torch.Tensor, ...]:
    """``torch.split`` without autograd's view tracking (about a fifth less per piece, and a
    micro-batch is ten pieces): these tensors never require grad and are handed out read-only."""
    return torch.unsafe_split_with_sizes(t, sizes, dim=dim)


_RAMP = RunStore([pa.array(np.arange(0, dtype=np.int32))])


def _ramp(n: int) -> RunStore:
    """0, 1, 2, ... of at least ``n`` values (each sequence's positions are a run of it)."""
    global _RAMP
    if len(_RAMP) < n:
        _RAMP = RunStore([pa.array(np.arange(max(n, 2 * len(_RAMP)), dtype=np.int32))])
    return _RAMP


def micro_batches(table: pa.Table, token_budget: int, *, advantages: np.ndarray | None = None,
                  weights: np.ndarray | None = None, max_seqs: int | None = None, epoch: int = 0) -> list[MicroBatch]:
    """Pack a whole C1 sequence table into micro-batches of at most ``token_budget`` tokens each."""
    n = table.num_rows
    adv = np.zeros(n, np.float32) if advantages is None else advantages
    w = np.ones(n, np.float32) if weights is None else weights
    arrays = SequenceArrays(table, adv, w)
    bins = arrays.plan(token_budget, max_seqs)
    return [arrays.micro_batch(b, epoch=epoch, batch_index=i) for i, b in enumerate(bins)]
