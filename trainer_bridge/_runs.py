"""Runs of stored tokens copied back to back: one ``memcpy`` per run, the per-run cost kept near zero.

Every packed sequence is a concatenation of runs of the tape's stored columns (per call its
prompt suffix, then its generation; a rewritten segment's copied prefix), about 7 runs per
sequence of a 4-call rollout. A delta-encoded rollout stores ``suffix(0), gen(0), suffix(1),
gen(1), ...`` in two columns, so even when its calls are stored contiguously (a compacted tape)
the runs of the two columns interleave: making them one run per sequence would first need the
interleaved copy itself (measured: it costs more than the runs it saves).

So what a gather costs is the kernel's fixed cost per run. Arrow's ``list_flatten`` of a
list-view makes an array object per run and concatenates them (about 0.5 us per run, more than
the bytes); per-token index arrays (``take``) cost more than the copy itself. A binary-view
array whose views point at the runs, cast to plain binary, copies each run in a tight loop
(under 0.1 us per run), straight from the read's own buffers (a read's row-group chunks need no
concatenating first): this module builds those views.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from ._errors import BridgeValueError

#: Widths this module moves (4-byte token IDs, logprobs, positions).
_ITEM = 4
#: Binary-view offsets are int32: a buffer larger than this is addressed through sub-buffers
#: starting every ``_STRIDE`` bytes, each up to ``_VIEW_MAX`` bytes long.
_VIEW_MAX = (1 << 31) - 1
_STRIDE = 1 << 30
#: Runs of at most this many bytes live inside their view (the binary-view layout).
_INLINE = 12


class RunStore:
    """Arrays of one 4-byte type, addressed as if concatenated; :meth:`gather` copies runs of them.

    Nothing is copied at construction: the arrays' own buffers are the sources.
    """

    def __init__(self, parts: Sequence[pa.Array]) -> None:
        if not parts:
            raise BridgeValueError("a RunStore needs at least one array")
        self.type = parts[0].type
        if (any(p.type != self.type for p in parts) or not pa.types.is_primitive(self.type)
                or self.type.bit_width != 8 * _ITEM):
            types = sorted({str(p.type) for p in parts})
            raise BridgeValueError(f"a RunStore holds arrays of one 4-byte type, got {types}")
        if any(p.null_count for p in parts):
            raise BridgeValueError("a RunStore's arrays must not hold nulls")
        sizes = np.fromiter((len(p) for p in parts), np.int64, len(parts))
        self.bounds = np.zeros(len(parts) + 1, dtype=np.int64)  # virtual start of each part
        np.cumsum(sizes, out=self.bounds[1:])
        # Virtual index + shift = element index inside the part's buffer.
        self._shift = np.fromiter((p.offset for p in parts), np.int64, len(parts)) - self.bounds[:-1]
        self._parts = list(parts)
        # Variadic buffers of the views: each part's buffer, cut in sub-buffers when larger than
        # int32 offsets reach.
        self._buffers: list[pa.Buffer] = []
        self._first_buffer = np.zeros(len(parts), dtype=np.int64)
        for i, p in enumerate(parts):
            self._first_buffer[i] = len(self._buffers)
            buf = p.buffers()[1] if len(p) else pa.py_buffer(b"")
            start = 0
            while True:
                self._buffers.append(buf.slice(start, min(buf.size - start, _VIEW_MAX)))
                start += _STRIDE
                if start >= buf.size:
                    break
        self._cut = len(self._buffers) > len(parts)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def gather(self, starts: np.ndarray, lengths: np.ndarray) -> pa.Array:
        """``concat(store[s : s + n] for s, n in zip(starts, lengths))`` as one fresh array.

        Runs out of the part they start in raise IndexError. The work besides the copy is a few
        numpy operations over the runs (it is paid per micro-batch window).
        """
        starts = np.asarray(starts, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size and lengths.min() <= 0:
            keep = lengths > 0
            starts, lengths = starts[keep], lengths[keep]
        total = int(lengths.sum())
        if total == 0:
            return pa.array(np.zeros(0, self.type.to_pandas_dtype()), self.type)
        if len(self._parts) == 1:
            part = np.zeros(starts.size, dtype=np.int64)
        else:
            part = np.searchsorted(self.bounds, starts, side="right") - 1
        if starts.min() < 0 or (starts + lengths > self.bounds[part + 1]).any():
            raise IndexError("a run reaches outside the array it starts in")
        if int(lengths.max()) * _ITEM > _VIEW_MAX - _STRIDE:
            most = (_VIEW_MAX - _STRIDE) // _ITEM
            raise BridgeValueError(f"a run of {int(lengths.max()):,} stored values (one call's prompt suffix or "
                                   f"generation) is longer than {most:,}, the most one copy takes")
        elem = starts + self._shift[part]  # element index inside the part's buffer
        # Binary views, 16 bytes each: length, then either the bytes themselves (runs of up to
        # 12 bytes) or a 4-byte prefix, buffer index and offset. The prefix is left zero: these
        # views live only until the cast, which copies runs through buffer and offset alone.
        views = np.zeros((starts.size, 4), dtype=np.int32)
        views[:, 0] = lengths * _ITEM
        byte = elem * _ITEM
        if self._cut:
            sub = byte // _STRIDE
            views[:, 2] = self._first_buffer[part] + sub
            views[:, 3] = byte - sub * _STRIDE
        else:
            views[:, 2] = part  # one buffer per part
            views[:, 3] = byte
        short = np.flatnonzero(lengths * _ITEM <= _INLINE)
        if short.size:
            views[short, 1:] = self._inline(part[short], elem[short], lengths[short])
        runs = pa.Array.from_buffers(pa.binary_view(), starts.size, [None, pa.py_buffer(views), *self._buffers])
        flat = runs.cast(pa.large_binary() if total * _ITEM > _VIEW_MAX else pa.binary())
        return pa.Array.from_buffers(self.type, total, [None, flat.buffers()[2]])

    def _inline(self, part: np.ndarray, elem: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The values of short runs (up to 3), zero-padded to 3 words: what their views hold."""
        out = np.zeros((part.size, 3), dtype=np.int32)
        for p in np.unique(part).tolist():
            rows = np.flatnonzero(part == p)
            arr = self._parts[p]
            words = np.frombuffer(arr.buffers()[1], np.int32, count=arr.offset + len(arr))
            at = elem[rows, None] + np.arange(3)
            out[rows] = np.where(np.arange(3) < lengths[rows, None], words[np.minimum(at, words.size - 1)], 0)
        return out
