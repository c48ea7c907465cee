"""Token-budget packing: many sequences in one row, no padding, attention kept per sequence.

Padding a batch of skewed-length rollouts to its longest member wastes most of the compute
(half or more on typical RL data). Packing concatenates sequences into one ``[1, T]`` row and
restarts ``position_ids`` at 0 for each: transformers (5.x, sdpa/eager, no attention mask, no
cache) reads the restarts as sequence boundaries and builds a block-diagonal causal mask, so
no token attends across a boundary. :func:`plan_bins` groups sequences into such rows under a
token budget (first-fit-decreasing keeps rows full); :func:`pack` builds one row.

Token and position IDs are int32, as the tape stores tokens: embedding layers and rotary
position code take int32 as is, and a batch is half the bytes it would be in int64 through
DataLoader workers' shared memory and the host-to-device copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from ._errors import BridgeValueError

#: Up to this many open bins, first-fit scans them in Python (per-call numpy overhead dominates).
_PYTHON_SCAN_BINS = 64


def plan_bins(lengths: np.ndarray, token_budget: int, *, max_seqs: int | None = None) -> list[np.ndarray]:
    """Group sequence indices into bins of total length <= ``token_budget`` (first-fit-decreasing).

    A sequence longer than the budget gets a bin of its own. ``max_seqs`` caps sequences per bin.
    Bins come out in the order they were opened (longest sequences first); each bin's indices
    are in decreasing-length order. The loop is per sequence, never per token.
    """
    return packed_bins(lengths, token_budget, max_seqs=max_seqs).as_list()


def packed_bins(lengths: np.ndarray, token_budget: int, *, max_seqs: int | None = None) -> Bins:
    """:func:`plan_bins` as :class:`Bins` (what the loader works with: no array per bin)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if token_budget <= 0:
        raise BridgeValueError(f"token_budget must be positive, got {token_budget}")
    if max_seqs is not None and max_seqs <= 0:
        raise BridgeValueError(f"max_seqs must be positive, got {max_seqs}")
    order = np.argsort(-lengths, kind="stable")
    sizes = lengths[order].tolist()
    if not sizes:
        return Bins(np.zeros(0, np.int64), np.zeros(0, np.int64))
    smallest = sizes[-1]
    limit = max_seqs if max_seqs is not None else len(sizes) + 1
    bin_of = [0] * len(sizes)  # the bin of each sequence, in decreasing-length order
    room: list[int] = []  # free tokens per bin
    count: list[int] = []  # sequences per bin
    # Bins that can still take a sequence, in opening order. A bin with less room than the
    # shortest sequence (or full by count) never takes another, so first fit over this list
    # is first fit over all bins, and the scan stays short.
    open_bins: list[int] = []
    room_np: np.ndarray | None = None  # the same rooms, for scans over many open bins
    capped = max_seqs is not None
    for j, n in enumerate(sizes):
        b = -1
        if n <= token_budget:
            if len(open_bins) <= _PYTHON_SCAN_BINS:
                if capped:
                    for k in open_bins:
                        if room[k] >= n and count[k] < limit:
                            b = k
                            break
                else:  # no cap: the room alone decides (the loader's usual case, one test fewer per bin)
                    for k in open_bins:
                        if room[k] >= n:
                            b = k
                            break
            else:
                if room_np is None:
                    room_np = np.zeros(len(sizes), dtype=np.int64)
                    room_np[:len(room)] = room
                cand = np.asarray(open_bins)
                fits = cand[room_np[cand] >= n]
                fits = [k for k in fits.tolist() if count[k] < limit][:1]
                b = fits[0] if fits else -1
        if b < 0:
            b = len(room)
            room.append(token_budget)
            count.append(0)
            open_bins.append(b)
        bin_of[j] = b
        left = room[b] = room[b] - n
        if room_np is not None:
            room_np[b] = left
        c = count[b] = count[b] + 1
        if left < smallest or c >= limit:
            open_bins.remove(b)
    bins = np.asarray(bin_of, dtype=np.int64)
    # Each bin's members in the order they were placed (decreasing length), bins in opening order.
    return Bins(order[np.argsort(bins, kind="stable")], np.bincount(bins, minlength=len(room)))


class Bins(NamedTuple):
    """Bins of sequence indices as two arrays: every bin's members back to back, and each bin's
    size. What the loader plans and packs with: no array object per bin."""

    members: np.ndarray
    sizes: np.ndarray

    @classmethod
    def of(cls, bins: Sequence[np.ndarray]) -> Bins:
        sizes = np.fromiter(map(len, bins), np.int64, len(bins))
        members = np.concatenate(bins).astype(np.int64, copy=False) if bins else np.zeros(0, np.int64)
        return cls(members, sizes)

    def __len__(self) -> int:  # the number of bins
        return self.sizes.size

    def starts(self) -> np.ndarray:
        """Where each bin's members start in :attr:`members` (``len + 1`` bounds)."""
        bounds = np.zeros(self.sizes.size + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=bounds[1:])
        return bounds

    def as_list(self) -> list[np.ndarray]:
        return np.split(self.members, self.starts()[1:-1]) if self.sizes.size else []

    def reorder(self, which: np.ndarray) -> Bins:
        """The bins ``which`` (indices of bins), in that order."""
        which = np.asarray(which, dtype=np.int64)
        sizes = self.sizes[which]
        new = np.zeros(sizes.size, dtype=np.int64)
        np.cumsum(sizes[:-1], out=new[1:])
        at = np.arange(int(sizes.sum()), dtype=np.int64) + np.repeat(self.starts()[:-1][which] - new, sizes)
        return Bins(self.members[at], sizes)


@dataclass
class PackedBatch:
    """Sequences concatenated into one row, with what a forward pass and the scorer need."""

    #: ``[1, T]`` int32, the sequences back to back, no padding. Embedding layers take int32 as
    #: is; ``.long()`` it where torch wants an int64 index (``gather``, ``index_select``).
    input_ids: torch.Tensor
    #: ``[1, T]`` int32, restarting at 0 at each sequence start (the boundary signal).
    position_ids: torch.Tensor
    #: ``[n + 1]`` int32 boundaries: sequence j is ``[cu_seqlens[j], cu_seqlens[j + 1])``.
    cu_seqlens: torch.Tensor
    #: Which caller sequence each packed sequence is.
    index: np.ndarray
    #: Per-token arrays packed the same way, each ``[1, T]``.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_seqs(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch on ``device`` (``index`` stays a numpy array)."""
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.cu_seqlens.to(device),
                           self.index, {k: v.to(device) for k, v in self.extras.items()})

    def split(self, values: torch.Tensor | np.ndarray) -> list[np.ndarray]:
        """Cut a ``[T]`` per-token array back into one numpy array per packed sequence."""
        v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        v = v.reshape(-1)
        return np.split(v, self.cu_seqlens[1:-1].cpu().numpy())


def pack(
    seqs: Sequence[np.ndarray],
    *,
    index: np.ndarray | None = None,
    extras: dict[str, Sequence[np.ndarray]] | None = None,
) -> PackedBatch:
    """Concatenate ``seqs`` (1-D token ID arrays) into one :class:`PackedBatch`.

    ``index`` records which caller sequence each one is (default ``0..n-1``); every array in
    ``extras[name]`` must have the same length as its sequence and is packed alongside.
    """
    if len(seqs) == 0:
        raise BridgeValueError("pack needs at least one sequence")
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    if (lengths == 0).any():
        raise BridgeValueError(f"sequence {int(np.flatnonzero(lengths == 0)[0])} is empty; "
                               "drop empty sequences before packing")
    cu = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    total = int(cu[-1])
    ids = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
    # position = global offset - start of the token's own sequence
    starts = np.repeat(cu[:-1], lengths)
    pos = (np.arange(total, dtype=np.int64) - starts).astype(np.int32)
    packed_extras: dict[str, torch.Tensor] = {}
    for name, arrays in (extras or {}).items():
        if len(arrays) != len(seqs):
            raise BridgeValueError(f"extras[{name!r}] has {len(arrays)} arrays for {len(seqs)} sequences")
        got = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        bad = np.flatnonzero(got != lengths)
        if bad.size:
            j = int(bad[0])
            raise BridgeValueError(f"extras[{name!r}][{j}] has {got[j]} values, its sequence has {lengths[j]} tokens")
        packed_extras[name] = torch.from_numpy(np.ascontiguousarray(np.concatenate([np.asarray(a) for a in arrays])))[None]
    idx = np.arange(len(seqs), dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
    if idx.shape != (len(seqs),):
        raise BridgeValueError(f"index has shape {idx.shape}, expected ({len(seqs)},)")
    return PackedBatch(
        input_ids=torch.from_numpy(ids)[None],
        position_ids=torch.from_numpy(pos)[None],
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        index=idx,
        extras=packed_extras,
    )
