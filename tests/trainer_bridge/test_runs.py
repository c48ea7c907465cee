"""RunStore: runs of several Arrow arrays copied back to back, equal to numpy's concatenation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from trainer_bridge import _runs
from trainer_bridge._errors import BridgeValueError
from trainer_bridge._runs import RunStore


def _reference(parts: list[np.ndarray], starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    flat = np.concatenate(parts)
    return np.concatenate([flat[s:s + n] for s, n in zip(starts, lengths)] + [flat[:0]])


def _random_runs(rng: np.random.Generator, parts: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs inside one part each: short ones (stored inside the view), long ones, empty ones."""
    bounds = np.cumsum([0] + [p.size for p in parts])
    which = rng.integers(0, len(parts), n)
    size = np.diff(bounds)[which]
    lengths = np.minimum(rng.choice([0, 1, 2, 3, 4, 5, 40, 300], n), size)
    starts = bounds[which] + (rng.random(n) * (size - lengths + 1)).astype(np.int64)
    return starts, lengths


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_runs_of_sliced_parts_equal_numpy_concatenation(dtype: type) -> None:
    rng = np.random.default_rng(0)
    raw = [rng.integers(-(2**31), 2**31 - 1, size, dtype=np.int64).astype(np.int32).view(dtype)
           for size in (1000, 7, 0, 513, 3)]
    # Arrow slices with non-zero offsets, as a Parquet read's chunk values are.
    arrays = [pa.array(np.concatenate([rng.random(11).astype(dtype), part])).slice(11) for part in raw]
    store = RunStore(arrays)
    assert len(store) == sum(p.size for p in raw)
    for _ in range(5):
        starts, lengths = _random_runs(rng, raw, 400)
        got = store.gather(starts, lengths)
        assert got.type == pa.from_numpy_dtype(dtype) and got.null_count == 0
        got.validate(full=True)
        want = _reference(raw, starts, lengths)
        assert got.to_numpy().view(np.int32).tolist() == want.view(np.int32).tolist()  # bit-exact, NaNs too


def test_a_run_may_not_cross_into_the_next_part() -> None:
    store = RunStore([pa.array(np.arange(10, dtype=np.int32)), pa.array(np.arange(5, dtype=np.int32))])
    assert store.gather(np.array([8, 10]), np.array([2, 5])).to_pylist() == [8, 9, 0, 1, 2, 3, 4]
    with pytest.raises(IndexError, match="outside"):
        store.gather(np.array([8]), np.array([3]))
    with pytest.raises(IndexError):
        store.gather(np.array([-1]), np.array([1]))


def test_empty_gather_and_mixed_types_are_handled() -> None:
    store = RunStore([pa.array(np.arange(4, dtype=np.float32))])
    empty = store.gather(np.array([1, 2]), np.array([0, 0]))
    assert empty.type == pa.float32() and len(empty) == 0
    with pytest.raises(BridgeValueError, match="4-byte"):
        RunStore([pa.array([1, 2], pa.int32()), pa.array([1.0], pa.float32())])
    with pytest.raises(BridgeValueError, match="4-byte"):
        RunStore([pa.array([1, 2], pa.int64())])
    with pytest.raises(BridgeValueError, match="4-byte"):
        RunStore([pa.array(["ab"], pa.string())])
    with pytest.raises(BridgeValueError, match="null"):
        RunStore([pa.array([1, None], pa.int32())])


def test_buffers_beyond_int32_view_offsets_are_reached_through_sub_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Views address a buffer with int32 byte offsets; bigger buffers are cut in overlapping
    sub-buffers. The limits are shrunk here so a small buffer exercises the same arithmetic
    (and the large_binary output path) without allocating 2 GiB."""
    monkeypatch.setattr(_runs, "_VIEW_MAX", 4096 - 1)
    monkeypatch.setattr(_runs, "_STRIDE", 2048)
    rng = np.random.default_rng(1)
    raw = [rng.integers(0, 1000, 5000, dtype=np.int32), rng.integers(0, 1000, 300, dtype=np.int32)]
    store = RunStore([pa.array(r).slice(0) for r in raw])
    starts, lengths = _random_runs(rng, raw, 200)
    lengths = np.minimum(lengths, 200)  # a run must fit in a sub-buffer after its start
    got = store.gather(starts, lengths)
    assert got.to_pylist() == _reference(raw, starts, lengths).tolist()
    with pytest.raises(BridgeValueError, match="longer"):
        store.gather(np.array([0]), np.array([600]))



@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_one_byte_runs_equal_numpy_concatenation(dtype: type) -> None:
    rng = np.random.default_rng(2)
    raw = [rng.integers(0, 100, size).astype(dtype) for size in (500, 5, 0, 64)]
    store = RunStore([pa.array(np.concatenate([np.zeros(3, dtype), part])).slice(3) for part in raw])
    for _ in range(5):
        starts, lengths = _random_runs(rng, raw, 300)  # many of 12 bytes or fewer: inside the view
        got = store.gather(starts, lengths)
        got.validate(full=True)
        assert got.to_numpy().tolist() == _reference(raw, starts, lengths).tolist()


def _bits(a: np.ndarray) -> list[int]:
    return a.view(f"u{a.itemsize}").tolist()


@pytest.mark.parametrize("source_bytes", [1, 64, 1 << 18])
def test_fill_repeats_each_value_bit_for_bit(source_bytes: int) -> None:
    """Runs of a repeated value, longer than the source's block (several views each), empty
    ones, and values told apart by their bits (-0.0 and NaN are copied as they are)."""
    rng = np.random.default_rng(3)
    choices = np.array([0.5, -0.0, 0.0, np.nan, 1.25, -3.0], np.float32)
    for _ in range(20):
        n = int(rng.integers(0, 30))
        values = rng.choice(choices, n)
        counts = rng.choice([0, 1, 2, 3, 4, 15, 16, 17, 300, 5000], n)
        fill = _runs.Fill.of(values, counts, source_bytes=source_bytes)
        nbytes = int(counts.sum()) * 4
        got = np.frombuffer(_runs.copy_runs(fill.views(), fill.store.buffers, nbytes), np.float32)
        assert _bits(got) == _bits(np.repeat(values, counts))
        assert fill.bounds[-1] == fill.views().shape[0]


def test_one_copy_of_several_stores_is_their_regions_back_to_back() -> None:
    """Views of several stores (each offset by its place in the buffer list) copied in one go:
    what the loader does for a window's input IDs, positions, logprobs and mask."""
    rng = np.random.default_rng(4)
    ids = RunStore([pa.array(rng.integers(0, 1000, 700, dtype=np.int32)), pa.array(np.arange(50, dtype=np.int32))])
    ramp = RunStore([pa.array(np.arange(64, dtype=np.int32))])
    mask = _runs.Fill(np.array([0, 1], np.uint8), np.array([1, 0, 1]), np.array([5, 2, 40]))
    id_starts, id_lengths = np.array([3, 700, 10]), np.array([20, 2, 1])
    parts = [(ids, ids.views(id_starts, id_lengths, buffer_base=0)),
             (ramp, ramp.views(np.zeros(2, np.int64), np.array([7, 3]), buffer_base=len(ids.buffers))),
             (mask.store, mask.views(buffer_base=len(ids.buffers) + 1))]
    views = np.concatenate([v for _, v in parts])
    buffers = [b for store, _ in parts for b in store.buffers]
    data = np.frombuffer(_runs.copy_runs(views, buffers, (23 + 10) * 4 + 47), np.uint8)
    assert data[:92].view(np.int32).tolist() == ids.gather(id_starts, id_lengths).to_pylist()
    assert data[92:132].view(np.int32).tolist() == [*range(7), *range(3)]
    assert data[132:].tolist() == [1] * 5 + [0] * 2 + [1] * 40
