"""Tape: read a tape directory as polars LazyFrames, pyarrow datasets, or full prompts.

Only published shards are read; hidden temporary files of crashed or running writers are
never touched. Every shard's footer, format version and schema are checked before its rows are
used, and any failure names the shard file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .._errors import CorruptShardError, TapeError
from ._layout import CALLS_DIR, ROLLOUTS_DIR, SHARD_VERSION_KEY, TABLES, WRITERS_DIR, is_published_shard, is_temp_file
from ._meta import TapeMeta, check_version, read_meta
from ._prompts import rebuild_prompts
from ._schema import SCHEMAS


@dataclass(frozen=True)
class ShardInfo:
    table: str
    path: Path
    rows: int
    bytes: int
    writer_id: str


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
    """A tape on disk, opened for reading.

    >>> tape = Tape("runs/tape")                       # doctest: +SKIP
    >>> tape.calls().select("rollout_id", "prompt_len").collect()   # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.meta: TapeMeta = read_meta(self.path)
        self._checked: dict[Path, ShardInfo] = {}

    def __repr__(self) -> str:
        return f"Tape({str(self.path)!r})"

    # -- shards --------------------------------------------------------------------------

    def shards(self, table: str) -> list[ShardInfo]:
        """The published shards of ``calls`` or ``rollouts``, checked, in name order."""
        if table not in TABLES:
            raise ValueError(f"table must be one of {TABLES}, got {table!r}")
        d = self.path / table
        names = sorted(n for n in os.listdir(d) if is_published_shard(n)) if d.is_dir() else []
        return [self._check(table, d / n) for n in names]

    def temp_files(self) -> list[Path]:
        """Hidden temporary files: in-flight flushes, or leftovers of crashed writers."""
        out: list[Path] = []
        for table in (*TABLES, WRITERS_DIR):
            d = self.path / table
            if d.is_dir():
                out += [d / n for n in sorted(os.listdir(d)) if is_temp_file(n)]
        return out

    def writers(self) -> dict[str, dict[str, Any]]:
        """Manifests of writers that closed cleanly, by writer id."""
        d = self.path / WRITERS_DIR
        out = {}
        if d.is_dir():
            for n in sorted(os.listdir(d)):
                if n.endswith(".json") and not n.startswith("."):
                    m = orjson.loads((d / n).read_bytes())
                    out[m["writer_id"]] = m
        return out

    def _check(self, table: str, path: Path) -> ShardInfo:
        info = self._checked.get(path)
        if info is not None:
            return info
        try:
            md = pq.read_metadata(path)
            schema = md.schema.to_arrow_schema()
        except (pa.ArrowException, OSError) as e:
            raise CorruptShardError(str(path), str(e)) from e
        version = (schema.metadata or {}).get(SHARD_VERSION_KEY)
        if version is None:
            raise CorruptShardError(str(path), "it is not a gymtape shard (no gymtape.format_version metadata)")
        try:
            check_version(int(version), str(path))
        except ValueError as e:
            raise CorruptShardError(str(path), f"bad format version {version!r}") from e
        expected = SCHEMAS[table]
        for f in expected:
            idx = schema.get_field_index(f.name)
            if idx < 0 or not schema.field(idx).type.equals(f.type):
                got = "missing" if idx < 0 else str(schema.field(idx).type)
                raise CorruptShardError(str(path), f"column {f.name} is {got}, expected {f.type}")
        writer_id = path.name[: -len(".parquet")].rsplit("-", 1)[0]
        info = ShardInfo(table, path, md.num_rows, path.stat().st_size, writer_id)
        self._checked[path] = info
        return info

    # -- tables --------------------------------------------------------------------------

    def calls(self) -> pl.LazyFrame:
        """All calls as a polars LazyFrame (one row per model call)."""
        return self._scan(CALLS_DIR)

    def rollouts(self) -> pl.LazyFrame:
        """All rollouts as a polars LazyFrame (one row per episode)."""
        return self._scan(ROLLOUTS_DIR)

    def dataset(self, table: str) -> pads.Dataset:
        """A pyarrow dataset over one table's published shards."""
        paths = [str(s.path) for s in self.shards(table)]
        return pads.dataset(paths, schema=SCHEMAS[table], format="parquet")

    def read(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """Read a whole table eagerly; a shard that fails to decode is named in the error."""
        parts = []
        for s in self.shards(table):
            try:
                parts.append(pq.read_table(s.path, columns=columns, schema=SCHEMAS[table]))
            except (pa.ArrowException, OSError) as e:
                raise CorruptShardError(str(s.path), str(e)) from e
        if not parts:
            schema = SCHEMAS[table]
            return schema.empty_table() if columns is None else pa.schema([schema.field(c) for c in columns]).empty_table()
        return pa.concat_tables(parts)

    def _scan(self, table: str) -> pl.LazyFrame:
        paths = [str(s.path) for s in self.shards(table)]
        if not paths:
            return pl.from_arrow(SCHEMAS[table].empty_table()).lazy()  # type: ignore[union-attr]
        return pl.scan_parquet(paths)

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
