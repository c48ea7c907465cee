"""Compaction: merge a tape's small shards into large ones, safely beside readers and writers.

`gymtape serve` and `gymtape record` flush every few seconds, so a tape is many small shards:
each costs a footer, a file open (a request on object storage) and poor compression.
:func:`compact_tape` rewrites them as few large shards, in place or as a copy elsewhere
(``to=``: record on a GPU node, publish to ``s3://`` for the laptop).

How it stays exactly-once for everyone else (the rules readers follow are in ``_shards.py``):

1. A compacted shard holds the rows of its sources and names them in its Parquet metadata
   (``gymtape.replaces``), together with the still-present shards its sources themselves
   replaced, so deleting an intermediate never resurrects an ancestor. Readers drop every
   listed shard a listed shard replaces: before the compacted shard is published they read
   the sources, after it the compacted shard, never both.
2. Sources are deleted only after the compacted shard is published (write-once, whole), and
   only ``retention`` seconds after (default 0: external tools that glob ``calls/*.parquet``
   would count superseded rows twice while they remain, and gymtape's own readers re-list
   when a shard vanishes; raise it for long-lived lazy readers, like Delta Lake's VACUUM).
3. Writers are never stopped: shards published during a compaction are simply not sources.
   An exception publishes nothing partial: a compacted shard is whole or absent, and a shard
   published before the exception supersedes its sources as in rule 1.
4. One compactor per tape: an ``flock`` on ``_compact.lock`` on POSIX, a lock object on
   object storage (best effort: exists-check then put); a second one gets
   :class:`~recorder.CompactionBusyError`.

Calls are written sorted by (``rollout_id``, ``call_index``), stably, so each rollout's calls
are contiguous within a compacted shard: a sequence's runs of stored tokens then lie side by
side, which is what lets a streaming loader copy them cheaply (the delta-encoded columns still
interleave suffixes and generations, so it is a few runs per sequence, not one); rollouts keep
their order. Row groups are :data:`~recorder.tape._shards.ROW_GROUP_ROWS` rows, as the writer
writes them.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pyarrow as pa

from .._errors import CompactionBusyError, StorageError, TapeError, TapeValueError
from ._layout import (
    CALLS_DIR,
    COMPACT_LOCK,
    COMPACTOR_PREFIX,
    FORMAT_VERSION,
    META_FILE,
    ROLLOUTS_DIR,
    RUNS_DIR,
    SHARD_COMPACTED_AT_KEY,
    SHARD_REPLACES_KEY,
    SHARD_TABLE_KEY,
    SHARD_VERSION_KEY,
    SHARD_WRITERS_KEY,
    TABLES,
    WRITERS_DIR,
    is_published_shard,
    is_temp_file,
    shard_name,
)
from ._meta import read_meta
from ._schema import SCHEMAS
from ._shards import READ_ATTEMPTS, ShardCatalog, ShardInfo, ShardListing, ShardVanished, parquet_options
from ._storage import TapeStorage

#: Source bytes (compressed, as stored) merged into one compacted shard. A compacted shard at
#: least half this size is left alone by later compactions.
DEFAULT_SHARD_BYTES = 128 << 20
#: Seconds a superseded shard stays after its replacement is published (see the module doc).
DEFAULT_RETENTION = 0.0
#: The order calls are written in by compaction (stable: ties keep their order).
CALLS_SORT = (("rollout_id", "ascending"), ("call_index", "ascending"))

Progress = Callable[[str, int, int], None]


@dataclass
class TableCompaction:
    """What compaction did to one table."""

    table: str
    #: Live shards merged, and the compacted shards written from them.
    shards_in: int = 0
    shards_out: int = 0
    rows: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    #: Superseded shards deleted (this run's sources and earlier runs' leftovers).
    deleted: int = 0
    #: Superseded shards kept because their replacement is younger than the retention period.
    retained: int = 0


@dataclass
class CompactReport:
    """What :func:`compact_tape` did."""

    tape: str
    to: str | None
    tables: dict[str, TableCompaction] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def shards_in(self) -> int:
        return sum(t.shards_in for t in self.tables.values())

    @property
    def shards_out(self) -> int:
        return sum(t.shards_out for t in self.tables.values())

    @property
    def bytes_in(self) -> int:
        return sum(t.bytes_in for t in self.tables.values())

    @property
    def bytes_out(self) -> int:
        return sum(t.bytes_out for t in self.tables.values())

    def to_dict(self) -> dict[str, Any]:
        return {"tape": self.tape, "to": self.to, "seconds": self.seconds,
                "tables": {k: asdict(v) for k, v in self.tables.items()}}


def compact_tape(
    tape: str | os.PathLike[str],
    *,
    to: str | None = None,
    filesystem: Any = None,
    to_filesystem: Any = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    retention: float = DEFAULT_RETENTION,
    progress: Progress | None = None,
) -> CompactReport:
    """Merge the small shards of ``tape`` into large ones, in place or into a copy at ``to``.

    Args:
        tape: the tape, a local folder or a URL; it may be written to meanwhile.
        to: publish a compacted copy there instead (a local folder or a URL that holds no tape
            yet); the source is left untouched. ``tape.json`` is written last, so the copy is a
            tape only once it is complete.
        filesystem, to_filesystem: pyarrow or fsspec filesystems holding ``tape`` / ``to``.
        shard_bytes: source bytes merged into one compacted shard.
        retention: in place, seconds a superseded shard is kept after its replacement appears
            (0: deleted right away; see the module doc).
        progress: called with (table, shards done, shards to do).

    Raises:
        CompactionBusyError: another compactor is working on the tape.
        StorageError: ``to`` already holds a tape, or shards of an interrupted copy.
    """
    if shard_bytes < 1:
        raise TapeValueError(f"shard_bytes must be positive, got {shard_bytes}")
    if retention < 0:
        raise TapeValueError(f"retention must be >= 0 seconds, got {retention}")
    t0 = time.perf_counter()
    src = TapeStorage.of(tape, filesystem)
    read_meta(src)  # refuse what is not a tape, or a tape of another format version, up front
    catalog = ShardCatalog(src)
    report = CompactReport(tape=src.location, to=None)
    if to is None:
        with _compaction_lock(src):
            out = _Output(src)
            for table in TABLES:
                report.tables[table] = _compact_in_place(catalog, out, table, shard_bytes, retention, progress)
    else:
        dst = TapeStorage.of(to, to_filesystem)
        report.to = dst.location
        dst.makedirs(*TABLES, WRITERS_DIR)
        with _compaction_lock(dst):  # two copies racing to one place would both write shards
            _check_empty_destination(dst)
            out = _Output(dst)
            for table in TABLES:
                report.tables[table] = _copy_table(catalog, out, table, shard_bytes, progress)
            for folder in (WRITERS_DIR, RUNS_DIR):
                for e in src.list(folder):
                    if not is_temp_file(e.name) and not e.name.startswith("."):
                        dst.write_bytes(f"{folder}/{e.name}", src.read_bytes(folder, e.name), overwrite=True)
            dst.write_bytes(META_FILE, src.read_bytes(META_FILE), overwrite=False)  # last: now it is a tape
    report.seconds = time.perf_counter() - t0
    return report


# -- in place ----------------------------------------------------------------------------------


def _compact_in_place(catalog: ShardCatalog, out: _Output, table: str, shard_bytes: int,
                      retention: float, progress: Progress | None) -> TableCompaction:
    stats = TableCompaction(table)
    # One compactor at a time and writers never delete: nothing vanishes under this listing,
    # so it misses no present shard (shards being published meanwhile are just not sources).
    listing = catalog.listing(table)
    candidates = [s for s in listing.live if not (s.compacted and s.bytes >= shard_bytes // 2)]
    if len(candidates) > 1 or any(not s.compacted for s in candidates):
        batches = list(_batches(candidates, shard_bytes))
        done = 0  # progress counts source shards merged
        for batch in batches:
            if len(batch) == 1 and batch[0].compacted:  # rewriting it alone would change nothing
                continue
            try:
                _merge(catalog, out, table, batch, listing, stats)
            except ShardVanished as e:
                raise TapeError(
                    f"{catalog.storage.url(e.path)} was deleted during compaction, but only the compactor deletes "
                    "shards: is another compactor running without the lock (a copy of the tape, another host "
                    "on object storage)?"
                ) from e
            done += len(batch)
            if progress:
                progress(table, done, len(candidates))
    _delete_superseded(catalog, table, retention, stats)
    return stats


def _delete_superseded(catalog: ShardCatalog, table: str, retention: float, stats: TableCompaction) -> None:
    """Delete shards a published compacted shard replaces, once it is ``retention`` seconds old."""
    listing = catalog.listing(table)
    published: dict[str, datetime] = {}
    for s in listing.shards:
        if s.compacted_at is None:
            continue
        at = _parse_time(s.compacted_at)
        for name in s.replaces:
            published[name] = min(at, published.get(name, at))
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=retention)
    for s in listing.superseded:
        at = published.get(s.name)  # None: replaced by a shard without a publication time (kept)
        if at is not None and at <= cutoff:
            stats.deleted += catalog.storage.delete(s.path)
        else:
            stats.retained += 1


# -- a copy elsewhere ----------------------------------------------------------------------------


def _check_empty_destination(dst: TapeStorage) -> None:
    if dst.exists(META_FILE):
        raise StorageError(
            f"{dst.location} already holds a tape; compact it in place (`gymtape compact {dst.location}`) "
            "or choose a new location for the copy"
        )
    leftovers = [e for t in TABLES for e in dst.list(t) if is_published_shard(e.name)]
    if leftovers:
        raise StorageError(
            f"{dst.location} holds {len(leftovers)} shard(s) but no {META_FILE}: an interrupted copy? "
            f"Delete {dst.location} (or choose a new location) and run the copy again"
        )


def _copy_table(catalog: ShardCatalog, out: _Output, table: str, shard_bytes: int,
                progress: Progress | None) -> TableCompaction:
    """Every live row of ``table`` once, compacted into ``out``. The copy is not a tape until its
    tape.json is written, so on a shard vanishing (an in-place compactor at the source) the
    copy of this table is dropped and started again."""
    for _ in range(READ_ATTEMPTS):
        stats = TableCompaction(table)
        listing = catalog.listing(table)
        written = len(out.paths)
        try:
            done = 0
            for batch in _batches(list(listing.live), shard_bytes):
                _merge(catalog, out, table, batch, None, stats)
                done += len(batch)
                if progress:
                    progress(table, done, len(listing.live))
            if not catalog.listing(table).missed_by(listing):
                return stats
        except ShardVanished:
            pass
        for path in out.paths[written:]:
            out.storage.delete(path)
        del out.paths[written:]
    raise TapeError(f"{catalog.storage.describe(table)}: the shards changed under the copy {READ_ATTEMPTS} times; "
                    "copy when the in-place compaction is done")


# -- merging -------------------------------------------------------------------------------------


class _Output:
    """Names and writes compacted shards: ``compact-<utc>-<random>-<seq>.parquet``, write-once."""

    def __init__(self, storage: TapeStorage) -> None:
        self.storage = storage
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.id = f"{COMPACTOR_PREFIX}-{stamp}-{uuid.uuid4().hex[:6]}"
        self.seq = 0
        self.paths: list[str] = []

    def write(self, table: str, data: pa.Table, replaces: set[str], writers: dict[str, int]) -> int:
        meta = {
            SHARD_VERSION_KEY: str(FORMAT_VERSION).encode(),
            SHARD_TABLE_KEY: table.encode(),
            SHARD_REPLACES_KEY: orjson.dumps(sorted(replaces)),
            SHARD_WRITERS_KEY: orjson.dumps(writers, option=orjson.OPT_SORT_KEYS),
            SHARD_COMPACTED_AT_KEY: datetime.now(timezone.utc).isoformat().encode(),
        }
        rel = f"{table}/{shard_name(self.id, self.seq)}"
        self.seq += 1
        size = self.storage.write_parquet(rel, data.cast(SCHEMAS[table]).replace_schema_metadata(meta),
                                          **parquet_options(table))
        self.paths.append(self.storage.path(rel))
        return size


def _batches(shards: list[ShardInfo], shard_bytes: int) -> Iterator[list[ShardInfo]]:
    """Consecutive runs of shards (name order) of about ``shard_bytes`` stored bytes each."""
    batch: list[ShardInfo] = []
    size = 0
    for s in shards:
        if batch and size + s.bytes > shard_bytes:
            yield batch
            batch, size = [], 0
        batch.append(s)
        size += s.bytes
    if batch:
        yield batch


def _merge(catalog: ShardCatalog, out: _Output, table: str, batch: list[ShardInfo],
           listing: ShardListing | None, stats: TableCompaction) -> None:
    """Write one compacted shard holding every row of ``batch`` (calls sorted, see the module doc).

    In place (``listing`` given) it replaces the batch and what the batch replaced that is still
    present; a copy (``listing`` None) replaces nothing."""
    parts = [catalog.read_shard(s) for s in batch]
    data = pa.concat_tables(parts) if parts else SCHEMAS[table].empty_table()
    if table == CALLS_DIR and data.num_rows:
        data = data.sort_by(list(CALLS_SORT))
    replaces: set[str] = set()
    if listing is not None:
        for s in batch:
            replaces |= {s.name} | (s.replaces & listing.names)
    writers: dict[str, int] = {}
    for s in batch:
        for w, seq in s.writers.items():
            writers[w] = max(seq, writers.get(w, -1))
    stats.bytes_out += out.write(table, data, replaces, writers)
    stats.shards_in += len(batch)
    stats.shards_out += 1
    stats.rows += data.num_rows
    stats.bytes_in += sum(s.bytes for s in batch)


def _parse_time(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return datetime.now(timezone.utc)  # unreadable: count as just published (kept, never lost)
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


# -- one compactor per tape ------------------------------------------------------------------------


@contextmanager
def _compaction_lock(storage: TapeStorage) -> Iterator[None]:
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": datetime.now(timezone.utc).isoformat(),
             "token": uuid.uuid4().hex}
    if storage.local is not None:
        import fcntl

        path = storage.path(COMPACT_LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                raise CompactionBusyError(
                    f"{storage.location} is being compacted by another process ({holder}); "
                    "wait for it to finish: one compactor per tape"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, orjson.dumps(owner), 0)
            yield
        finally:
            os.close(fd)  # releases the flock
        return
    if not storage.write_bytes(COMPACT_LOCK, orjson.dumps(owner), overwrite=False) or \
            orjson.loads(storage.read_bytes(COMPACT_LOCK)).get("token") != owner["token"]:
        try:
            holder = storage.read_bytes(COMPACT_LOCK).decode(errors="replace")
        except FileNotFoundError:
            holder = "unknown"
        raise CompactionBusyError(
            f"{storage.location} is being compacted by another process ({holder}): one compactor per tape. "
            f"If none is running (it crashed), delete {storage.describe(COMPACT_LOCK)} and try again"
        )
    try:
        yield
    finally:
        storage.delete(storage.path(COMPACT_LOCK))
