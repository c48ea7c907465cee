"""Micro-batches: sequences (C1 rows) packed under a token budget, with per-token training arrays.

Both the epoch-based :class:`~trainer_bridge.TapeDataset` and the asynchronous
:class:`~trainer_bridge.TapeFollower` end here, so a training step consumes the same object
whichever feeds it. Bins come from C2's :func:`~trainer_bridge.plan_bins`; each bin becomes the
:class:`~trainer_bridge.PackedBatch` that C2's :func:`~trainer_bridge.pack` would build.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ._packing import PackedBatch, pack, plan_bins
from ._runs import RunStore
from ._sequences import SequencePlan

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
    bins: list[np.ndarray],
    advantages: np.ndarray,
    weights: np.ndarray,
    *,
    epoch: int = 0,
    shard: tuple[int, int, int, int] = (0, 1, 0, 1),
    first_index: int = 0,
    window_tokens: int = 1 << 20,
) -> Iterator[MicroBatch]:
    """Micro-batches for ``bins`` (sequence rows of ``plan``), packed straight from the stored columns.

    Bins are processed in windows of about ``window_tokens`` tokens: the window's sequences are
    gathered back to back in one pass per column (one copy per run of stored tokens), and each
    micro-batch is a slice of the window's arrays. Equal to :meth:`SequenceArrays.micro_batch`
    on the same bins (a test holds them equal). Everything per micro-batch is a slice; the
    per-token work is per window.
    """
    if not bins:
        return
    ids_col = plan.values["sequence_id"].to_pylist()
    groups_col = plan.values["group_key"].to_pylist()
    rewards_col = plan.values["reward"].to_numpy(zero_copy_only=False).astype(np.float64)
    advantages = np.asarray(advantages, dtype=np.float32)
    weights = np.asarray(weights, dtype=np.float32)
    sizes = np.fromiter((b.size for b in bins), np.int64, len(bins))
    every = np.concatenate(bins)
    seq_end = np.cumsum(sizes)
    tokens = np.add.reduceat(plan.lengths[every], seq_end - sizes) if every.size else np.zeros(len(bins), np.int64)
    # Windows: runs of whole bins of about window_tokens each (a bin larger than that is one window).
    window_of = (np.cumsum(tokens) - tokens) // window_tokens
    cuts = np.flatnonzero(np.diff(window_of)) + 1
    edges = [0, *cuts.tolist(), len(bins)]
    ones = torch.ones(1, 1)
    for start, stop in pairwise(edges):
        order = every[int(seq_end[start] - sizes[start]):int(seq_end[stop - 1])]
        lengths = plan.lengths[order]
        ids, lp, is_gen, piece_len = plan.gather(order)
        bin_sizes = sizes[start:stop]
        bin_tokens = tokens[start:stop].tolist()
        # Window-wide [1, T] tensors, cut into micro-batches by torch.split (views, no copies).
        # Built in Arrow's memory pool, which keeps freed pages: fresh numpy arrays of this size
        # would be page-faulted in anew for every window.
        per_token = [
            _tensor(ids),
            _tensor(_ramp(int(lengths.max())).gather(np.zeros(order.size, np.int64), lengths)),
            _tensor(_repeat(is_gen.view(np.uint8), piece_len)).view(torch.bool),
            _tensor(lp),
            _tensor(_repeat(advantages[order], lengths)),
        ]
        w = weights[order]
        if (w == 1.0).all():  # the dataset's case: a broadcast view per micro-batch, no memory
            cut_w = torch.split(ones.expand(1, int(lengths.sum())), bin_tokens, dim=1)
        else:
            cut_w = torch.split(torch.from_numpy(np.repeat(w, lengths))[None], bin_tokens, dim=1)
        ids_t, pos_t, mask_t, lp_t, adv_t = (torch.split(v, bin_tokens, dim=1) for v in per_token)
        # cu_seqlens of every bin, back to back: 0, then each member's end relative to its bin's start.
        bounds = np.zeros(bin_sizes.size + 1, dtype=np.int64)
        np.cumsum(bin_sizes, out=bounds[1:])
        seq_off = np.zeros(order.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=seq_off[1:])
        bin_start = np.repeat(seq_off[bounds[:-1]], bin_sizes)
        ends = (seq_off[1:] - bin_start).astype(np.int32)
        cu = torch.split(torch.from_numpy(np.insert(ends, bounds[:-1], 0)), (bin_sizes + 1).tolist())
        split_sizes = bin_sizes.tolist()
        rew, adv, wts = (torch.split(torch.from_numpy(v[order]), split_sizes) for v in (rewards_col, advantages, weights))
        rows = order.tolist()
        seq_ids = [ids_col[i] for i in rows]
        keys = [groups_col[i] for i in rows]
        for j, (s0, s1) in enumerate(pairwise(bounds.tolist())):
            yield MicroBatch(
                ids_t[j], pos_t[j], cu[j], order[s0:s1],
                {"loss_mask": mask_t[j], "behaviour_logprobs": lp_t[j], "advantages": adv_t[j], "weights": cut_w[j]},
                sequence_ids=seq_ids[s0:s1], group_keys=keys[s0:s1],
                rewards=rew[j], seq_advantages=adv[j], seq_weights=wts[j],
                epoch=epoch, shard=shard, batch_index=first_index + start + j,
            )
        # Let go of this window before gathering the next: once its micro-batches are consumed,
        # one window's arrays are alive at a time, not two.
        del ids, lp, per_token, ids_t, pos_t, mask_t, lp_t, adv_t, cut_w


def _tensor(arr: pa.Array) -> torch.Tensor:
    """``[1, n]`` tensor over a freshly built Arrow array's memory (no copy)."""
    return torch.from_numpy(_writable(arr))[None]


def _repeat(values: np.ndarray, counts: np.ndarray) -> pa.Array:
    """``np.repeat(values, counts)`` computed by Arrow (run-end decoding), in Arrow's memory pool."""
    keep = counts > 0
    ends = np.cumsum(counts[keep]).astype(np.int32)
    return pc.run_end_decode(pa.RunEndEncodedArray.from_arrays(pa.array(ends), pa.array(values[keep])))


def _writable(arr: pa.Array) -> np.ndarray:
    """A writable numpy view of a freshly built Arrow array (torch refuses read-only memory);
    copies only when Arrow does not hand out its buffer as mutable."""
    buf = arr.buffers()[1]
    if arr.null_count == 0 and buf is not None and buf.is_mutable:
        dtype = arr.type.to_pandas_dtype()
        return np.frombuffer(buf, dtype=dtype)[arr.offset: arr.offset + len(arr)]
    return arr.to_numpy(zero_copy_only=False).copy()


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
