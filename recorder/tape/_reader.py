"""Tape: read a tape (a local folder or a URL) as polars LazyFrames, pyarrow tables, or full prompts.

Only published shards are read; hidden temporary files of crashed or running writers are
never touched. Every shard's footer, format version and schema are checked before its rows are
used, and its pages' checksums as they are read (``recorder.tape._shards``, the one place): any
failure is a :class:`~recorder.CorruptShardError` naming the shard, never a foreign exception
or silently different rows. The lazy frames (:meth:`Tape.calls`, :meth:`Tape.rollouts`) read
through the same path, a polars IO source with projection pushdown. Shards that a compacted
shard replaces are skipped, so a reader sees every row once while a compactor works.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads

from .._errors import CorruptShardError, TapeError
from ._layout import CALLS_DIR, ROLLOUTS_DIR, TABLES, WAL_DIR, WRITERS_DIR, is_temp_file
from ._meta import TapeMeta, read_meta
from ._prompts import rebuild_prompts
from ._schema import SCHEMAS
from ._shards import READ_OPTIONS, ShardCatalog, ShardInfo, ShardListing, ShardVanished
from ._storage import TapeStorage


class ListColumn:
    """Zero-copy numpy view of an Arrow list column: ``col[i]`` is row i's values."""

    def __init__(self, arr: pa.ChunkedArray | pa.Array, dtype: Any) -> None:
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        arr = arr.cast(pa.list_(pa.from_numpy_dtype(dtype))) if arr.type.value_type != pa.from_numpy_dtype(dtype) else arr
        offsets = arr.offsets.to_numpy()
        self.values = arr.values.to_numpy(zero_copy_only=False)
        self.starts = offsets[:-1]
        self.ends = offsets[1:]

    def __len__(self) -> int:
        return self.starts.size

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.starts[i] : self.ends[i]]

    def lengths(self) -> np.ndarray:
        return self.ends - self.starts


class Tape:
    """A tape opened for reading: a local folder, a shared mount, or object storage.

    >>> tape = Tape("runs/tape")                       # doctest: +SKIP
    >>> tape = Tape("s3://bucket/run1")                # doctest: +SKIP
    >>> tape.calls().select("rollout_id", "prompt_len").collect()   # doctest: +SKIP

    Args:
        location: a local path or a URL (``s3://``, ``gs://``, ``az://``, ``file://``).
        filesystem: a ``pyarrow.fs.FileSystem`` or fsspec filesystem holding ``location``.

    :meth:`read` (and everything built on it) returns every row exactly once even while a
    compactor replaces shards. :meth:`calls`, :meth:`rollouts` and :meth:`dataset` are lazy:
    they read the shards of one listing when collected, so collect them promptly on a tape
    that is being compacted (a shard deleted in between raises ``FileNotFoundError``).
    A damaged shard raises :class:`~recorder.CorruptShardError` naming it, from every one.
    """

    def __init__(self, location: str | os.PathLike[str] | TapeStorage, filesystem: Any = None) -> None:
        self.storage = TapeStorage.of(location, filesystem)
        #: The tape as the user named it: a local path or a URL.
        self.location: str = self.storage.location
        self.meta: TapeMeta = read_meta(self.storage)
        self.catalog = ShardCatalog(self.storage)

    def __repr__(self) -> str:
        return f"Tape({self.location!r})"

    # -- shards --------------------------------------------------------------------------

    def shards(self, table: str) -> list[ShardInfo]:
        """The live shards of ``calls`` or ``rollouts`` (published, checked, not superseded), in name order."""
        return list(self.catalog.settled_listing(table).live)

    def listing(self, table: str) -> ShardListing:
        """One listing of ``table``: live shards and superseded ones awaiting deletion."""
        return self.catalog.settled_listing(table)

    def temp_files(self) -> list[str]:
        """Hidden temporary files (paths relative to the tape): in-flight flushes, or leftovers of crashed writers."""
        folders = (*TABLES, WRITERS_DIR, *(f"{WAL_DIR}/{t}" for t in TABLES))
        return [f"{folder}/{e.name}" for folder in folders for e in self.storage.list(folder) if is_temp_file(e.name)]

    def writers(self) -> dict[str, dict[str, Any]]:
        """Manifests of writers that closed cleanly, by writer id."""
        out = {}
        for e in self.storage.list(WRITERS_DIR):
            if e.name.endswith(".json") and not e.name.startswith("."):
                try:
                    m = orjson.loads(self.storage.read_bytes(WRITERS_DIR, e.name))
                except FileNotFoundError:
                    continue
                out[m["writer_id"]] = m
        return out

    # -- tables --------------------------------------------------------------------------

    def calls(self) -> pl.LazyFrame:
        """All calls as a polars LazyFrame (one row per model call)."""
        return self._scan(CALLS_DIR)

    def rollouts(self) -> pl.LazyFrame:
        """All rollouts as a polars LazyFrame (one row per episode)."""
        return self._scan(ROLLOUTS_DIR)

    def dataset(self, table: str) -> pads.Dataset:
        """A pyarrow dataset over one table's live shards (not the write-ahead log: use
        :meth:`read` or :meth:`calls` for every committed row)."""
        return self._dataset(table, self.shards(table))

    def read(self, table: str, columns: list[str] | None = None, *,
             unreadable: list[CorruptShardError] | None = None) -> pa.Table:
        """Read a whole table eagerly, every row exactly once (see the class doc); a shard that
        fails to decode is named in the error.

        ``unreadable``: a list that collects the shards that cannot be read (their rows are
        left out) instead of raising for the first; ``gymtape check`` reports them all."""
        return self.catalog.read(table, columns, unreadable=unreadable)

    def _scan(self, table: str) -> pl.LazyFrame:
        """A LazyFrame over one settled listing and the log rows it does not cover, read shard by
        shard through the catalog (checked, checksums verified) when collected: only the columns
        the query uses, its filter applied per shard."""
        from polars.io.plugins import register_io_source

        listing, log = self.catalog.snapshot(table)
        shards = list(listing.live)
        catalog = self.catalog
        schema = pl.from_arrow(SCHEMAS[table].empty_table()).schema  # type: ignore[union-attr]
        key = SCHEMAS[table].names[0]

        def batches(with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None,
                    _batch_size: int | None) -> Iterator[pl.DataFrame]:
            names = list(schema) if with_columns is None else list(with_columns)
            wanted = [*names, *(predicate.meta.root_names() if predicate is not None else ())]
            need = list(dict.fromkeys(wanted)) or [key]  # at least one column: a row count needs one
            left = n_rows
            for part in [*shards, None]:
                if left is not None and left <= 0:
                    return
                if part is None:
                    rows = log.select(need)
                else:
                    try:
                        rows = catalog.read_shard(part, need)
                    except ShardVanished as e:  # a compactor deleted it since the listing (see the class doc)
                        raise FileNotFoundError(f"{self.storage.url(e.path)} was deleted while the lazy frame was "
                                                "collected (a compaction); collect again") from None
                df = pl.from_arrow(rows.replace_schema_metadata(None))
                assert isinstance(df, pl.DataFrame)
                if predicate is not None:
                    df = df.filter(predicate)
                df = df.select(names or need)
                if left is not None:
                    df = df.head(left)
                    left -= df.height
                yield df

        return register_io_source(batches, schema=schema, explain_name="gymtape",
                                  explain_detail=f"{self.location} {table}: {len(shards)} shard(s)")

    def log_rows(self, table: str) -> int:
        """Rows committed to the write-ahead log and not yet sealed into a shard."""
        return self.catalog.snapshot(table, ["rollout_id"])[1].num_rows

    def _dataset(self, table: str, shards: list[ShardInfo]) -> pads.Dataset:
        verified = pads.ParquetFileFormat(
            default_fragment_scan_options=pads.ParquetFragmentScanOptions(**READ_OPTIONS))  # type: ignore[arg-type]
        return pads.dataset([s.path for s in shards], schema=SCHEMAS[table], format=verified,
                            filesystem=self.storage.fs)

    # -- prompts -------------------------------------------------------------------------

    def calls_by_rollout(self, extra_columns: tuple[str, ...] = ()) -> CallsByRollout:
        """Index the calls by rollout; prompts are rebuilt per rollout on demand."""
        return CallsByRollout(self, extra_columns)

    def iter_rollout_calls(self, extra_columns: tuple[str, ...] = ()) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(rollout_id, calls)`` for every rollout that has calls (see CallsByRollout.get)."""
        index = self.calls_by_rollout(extra_columns)
        for rid in index.rollout_ids():
            yield rid, index.get(rid)

    def prompts(self) -> dict[str, np.ndarray]:
        """Every call's full prompt, by ``call_id`` (small tapes; stream with iter_rollout_calls)."""
        out = {}
        for _, calls in self.iter_rollout_calls(("call_id",)):
            out.update(zip(calls["call_id"], calls["prompt_ids"]))
        return out


class CallsByRollout:
    """The calls table sorted by (rollout, call index), with each rollout's row range.

    Holds only what is stored (delta-encoded), so memory is O(unique tokens); full prompts are
    rebuilt one rollout at a time by :meth:`get`.
    """

    _BASE = ("rollout_id", "call_index", "prefix_len", "prompt_suffix_ids", "prompt_len", "generation_ids")

    def __init__(self, tape: Tape, extra_columns: tuple[str, ...] = ()) -> None:
        cols = list(self._BASE) + [c for c in extra_columns if c not in self._BASE]
        t = tape.read(CALLS_DIR, cols).sort_by([("rollout_id", "ascending"), ("call_index", "ascending")])
        self._lists = {
            c: ListColumn(t.column(c), np.float32 if c == "generation_logprobs" else np.int32)
            for c in cols
            if pa.types.is_list(t.schema.field(c).type)
        }
        self._plain = {c: t.column(c).to_pylist() for c in cols if c not in self._lists}
        rids = self._plain["rollout_id"]
        self._ranges: dict[str, tuple[int, int]] = {}
        start = 0
        for i in range(1, len(rids) + 1):
            if i == len(rids) or rids[i] != rids[start]:
                self._ranges[rids[start]] = (start, i)
                start = i

    def rollout_ids(self) -> list[str]:
        return list(self._ranges)

    def __contains__(self, rollout_id: str) -> bool:
        return rollout_id in self._ranges

    def get(self, rollout_id: str) -> dict[str, Any]:
        """One rollout's calls, column name → per-call list, plus ``prompt_ids`` (full prompts)."""
        a, b = self._ranges.get(rollout_id, (0, 0))
        calls: dict[str, Any] = {c: v[a:b] for c, v in self._plain.items()}
        for c, lc in self._lists.items():
            calls[c] = [lc[i] for i in range(a, b)]
        prompts = list(rebuild_prompts(calls["prefix_len"], calls["prompt_suffix_ids"], calls["generation_ids"], rollout_id=rollout_id))
        for k, p in enumerate(prompts):
            if p.size != calls["prompt_len"][k]:
                raise TapeError(f"rollout {rollout_id} call {k}: rebuilt prompt has {p.size} tokens, prompt_len says {calls['prompt_len'][k]}")
        calls["prompt_ids"] = prompts
        return calls
