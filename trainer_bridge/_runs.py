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
(about 10 ns per run), straight from the read's own buffers (a read's row-group chunks need no
concatenating first): this module builds those views.

The copy does not care where a run comes from, so a micro-batch window's every per-token array
is one copy: views into the stored tokens, into a 0, 1, 2, ... ramp (positions) and into small
sources of repeated values (:class:`Fill`: advantages, loss-mask bytes), each array a region of
one output buffer. That is one pass over the window's bytes, at memory speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from ._errors import BridgeValueError

#: Widths this module moves in bytes: 4 (token IDs, positions, logprobs, advantages) and 1
#: (loss-mask bytes).
_ITEMS = (4, 1)
#: Binary-view offsets are int32: a buffer larger than this is addressed through sub-buffers
#: starting every ``_STRIDE`` bytes, each up to ``_VIEW_MAX`` bytes long.
_VIEW_MAX = (1 << 31) - 1
_STRIDE = 1 << 30
#: Runs of at most this many bytes live inside their view (the binary-view layout).
_INLINE = 12


class RunStore:
    """Arrays of one 4-byte (or 1-byte) type, addressed as if concatenated; :meth:`gather`
    copies runs of them.

    Nothing is copied at construction: the arrays' own buffers are the sources.
    """

    def __init__(self, parts: Sequence[pa.Array]) -> None:
        if not parts:
            raise BridgeValueError("a RunStore needs at least one array")
        self.type = parts[0].type
        if (any(p.type != self.type for p in parts) or not pa.types.is_primitive(self.type)
                or self.type.bit_width not in [8 * n for n in _ITEMS]):
            types = sorted({str(p.type) for p in parts})
            raise BridgeValueError(f"a RunStore holds arrays of one 4-byte (or 1-byte) type, got {types}")
        self.itemsize = self.type.bit_width // 8
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

    @property
    def buffers(self) -> list[pa.Buffer]:
        """What the views of :meth:`views` point into (their buffer index counts from the first)."""
        return self._buffers

    def gather(self, starts: np.ndarray, lengths: np.ndarray) -> pa.Array:
        """``concat(store[s : s + n] for s, n in zip(starts, lengths))`` as one fresh array.

        Runs out of the part they start in raise IndexError. The work besides the copy is a few
        numpy operations over the runs (it is paid per micro-batch window).
        """
        views = self.views(starts, lengths)
        nbytes = int(views[:, 0].sum()) if views.size else 0
        data = copy_runs(views, self._buffers, nbytes)
        return pa.Array.from_buffers(self.type, nbytes // self.itemsize, [None, data])

    def views(self, starts: np.ndarray, lengths: np.ndarray, *, buffer_base: int = 0) -> np.ndarray:
        """The binary views (``[n, 4]`` int32, one per run, empty runs included) that
        :func:`copy_runs` copies: the runs ``store[s : s + n]``.

        ``buffer_base``: where :attr:`buffers` start in the buffer list the views will be copied
        with (views of several stores copied in one go, see :func:`copy_runs`).
        Runs out of the part they start in raise IndexError.
        """
        starts = np.asarray(starts, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        views = np.zeros((starts.size, 4), dtype=np.int32)  # an empty run's view is all zeros
        if starts.size == 0:
            return views
        shortest = int(lengths.min())
        if shortest <= 0:
            if shortest < 0:
                raise IndexError("a run has a negative length")
            keep = np.flatnonzero(lengths)
            views[keep] = self.views(starts[keep], lengths[keep], buffer_base=buffer_base)
            return views
        ends = starts + lengths
        if len(self._parts) == 1:
            part = np.zeros(starts.size, dtype=np.int64)
            outside = int(ends.max()) > self.bounds[1]
        else:
            part = np.searchsorted(self.bounds, starts, side="right") - 1
            outside = bool((ends > self.bounds[part + 1]).any())
        if outside or int(starts.min()) < 0:
            raise IndexError("a run reaches outside the array it starts in")
        item = self.itemsize
        if int(lengths.max()) * item > _VIEW_MAX - _STRIDE:
            most = (_VIEW_MAX - _STRIDE) // item
            raise BridgeValueError(f"a run of {int(lengths.max()):,} stored values (one call's prompt suffix or "
                                   f"generation) is longer than {most:,}, the most one copy takes")
        elem = starts + self._shift[part]  # element index inside the part's buffer
        # Binary views, 16 bytes each: length, then either the bytes themselves (runs of up to
        # 12 bytes) or a 4-byte prefix, buffer index and offset. The prefix is left zero: these
        # views live only until the cast, which copies runs through buffer and offset alone.
        views[:, 0] = lengths * item
        byte = elem * item
        if self._cut:
            sub = byte // _STRIDE
            views[:, 2] = self._first_buffer[part] + sub + buffer_base
            views[:, 3] = byte - sub * _STRIDE
        else:
            views[:, 2] = part + buffer_base  # one buffer per part
            views[:, 3] = byte
        if shortest * item <= _INLINE:
            short = np.flatnonzero(lengths * item <= _INLINE)
            views[short, 1:] = self._inline(part[short], byte[short], lengths[short] * item)
        return views

    def _inline(self, part: np.ndarray, byte: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        """The bytes of short runs (up to 12), zero-padded to 3 words: what their views hold."""
        out = np.zeros((part.size, _INLINE), dtype=np.uint8)
        for p in np.unique(part).tolist():
            rows = np.flatnonzero(part == p)
            arr = self._parts[p]
            data = np.frombuffer(arr.buffers()[1], np.uint8, count=(arr.offset + len(arr)) * self.itemsize)
            at = byte[rows, None] + np.arange(_INLINE)
            out[rows] = np.where(np.arange(_INLINE) < nbytes[rows, None], data[np.minimum(at, data.size - 1)], 0)
        return out.view(np.int32)


def copy_runs(views: np.ndarray, buffers: list[pa.Buffer], nbytes: int) -> pa.Buffer:
    """The runs ``views`` describe (from :meth:`RunStore.views`, pointing into ``buffers``),
    copied back to back into one fresh, writable buffer of ``nbytes`` bytes.

    One cast of a binary-view array to plain binary: a tight copy loop per run, in Arrow's
    memory pool (which keeps freed pages for the next call).
    """
    if nbytes == 0:
        return pa.py_buffer(bytearray())
    runs = pa.Array.from_buffers(pa.binary_view(), len(views), [None, pa.py_buffer(views), *buffers])
    flat = runs.cast(pa.large_binary() if nbytes > _VIEW_MAX else pa.binary())
    return flat.buffers()[2]


class Fill:
    """Runs that repeat a value, ``distinct[which[i]]`` ``counts[i]`` times for i in order, as views.

    A run of one value is a copy from a small source holding each distinct value ``chunk``
    times (a run longer than that takes several views), so filling goes through the same copy
    as the stored tokens: :func:`copy_runs` of many regions in one go. The source stays small
    (about ``source_bytes``), so in cache.
    """

    def __init__(self, distinct: np.ndarray, which: np.ndarray, counts: np.ndarray, *,
                 source_bytes: int = 1 << 18) -> None:
        distinct = np.ascontiguousarray(distinct)
        counts = np.asarray(counts, dtype=np.int64)
        fit = source_bytes // max(distinct.size * distinct.itemsize, 1)
        chunk = 1 << min(max(fit.bit_length() - 1, 4), 16)  # a power of two in [16, 65536]
        source = np.repeat(distinct, chunk)
        self.store = RunStore([pa.Array.from_buffers(pa.from_numpy_dtype(source.dtype), source.size,
                                                     [None, pa.py_buffer(source)])])
        views_per = (counts + chunk - 1) // chunk
        #: Where each run's views start among :meth:`views` (``len(counts) + 1`` bounds).
        self.bounds = np.zeros(counts.size + 1, dtype=np.int64)
        np.cumsum(views_per, out=self.bounds[1:])
        if (views_per == 1).all():  # every run is one view: no run empty or longer than a chunk
            self._starts, self._lengths = np.asarray(which, dtype=np.int64) * chunk, counts
            return
        owner = np.repeat(np.arange(counts.size), views_per)
        k = np.arange(int(self.bounds[-1]), dtype=np.int64) - self.bounds[:-1][owner]
        self._starts = np.asarray(which, dtype=np.int64)[owner] * chunk  # every view of a run: the block start
        self._lengths = np.minimum(chunk, counts[owner] - k * chunk)

    @classmethod
    def of(cls, values: np.ndarray, counts: np.ndarray, **kwargs: int) -> Fill:
        """The runs ``values[i]`` x ``counts[i]``; values are told apart by their bits (so -0.0
        and each NaN stay exactly as they are)."""
        values = np.ascontiguousarray(values)
        distinct, which = np.unique(values.view(f"u{values.itemsize}"), return_inverse=True)
        return cls(distinct.view(values.dtype), which.reshape(-1), counts, **kwargs)

    def views(self, *, buffer_base: int = 0) -> np.ndarray:
        return self.store.views(self._starts, self._lengths, buffer_base=buffer_base)
