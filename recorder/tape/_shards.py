"""Shards: listing, the checks every shard passes, supersession by compaction, consistent reads.

Every reader of a tape (``Tape``, ``TapeFollower``, the compactor) learns which shards exist
here, on any storage (:class:`~recorder.tape._storage.TapeStorage`), and nowhere else:

* **Checks, in one place.** Before a shard's rows are used its footer is read and it must be a
  gymtape shard (``gymtape.format_version``) of a version this gymtape reads, with every
  column of the table's schema at its type. Any failure names the shard.
* **Supersession.** A compacted shard names, in its Parquet key-value metadata
  (``gymtape.replaces``), the shards whose rows it holds. One listing is one view of the
  tape: its *live* shards are the listed ones no listed shard replaces. Since a compactor
  deletes a shard only after publishing its replacement, every row is in exactly one live
  shard of any listing.
* **The write-ahead log.** Rows a durable writer committed but has not sealed into a shard
  live in ``wal/<table>/<stem>.arrows`` (``recorder.tape._wal``). A read lists the log
  before the shards, then reads every segment whose shard (same stem) the listing does not
  cover: a segment sealed in between shows up as its shard, and one deleted before it is read
  sends the read round again. So log rows are seen once, in the log or in their shard.
* **Consistent reads.** A listing is not a snapshot: a compactor may publish a replacement and
  delete its sources while the listing runs, and the listing may then show neither. So a read
  lists again afterwards; a new shard that replaces a name the first listing did not cover
  means a shard was missed, and the read starts over (as it does when a listed shard vanishes
  before it is read). Both are bounded by :data:`READ_ATTEMPTS`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import orjson
import pyarrow as pa

from .._errors import CorruptShardError, TapeError, TapeValueError
from ._layout import (
    CALLS_DIR,
    SHARD_COMPACTED_AT_KEY,
    SHARD_REPLACES_KEY,
    SHARD_SUFFIX,
    SHARD_WRITERS_KEY,
    TABLES,
    WAL_DIR,
    is_published_shard,
)
from . import _wal
from ._meta import check_file_schema
from ._schema import SCHEMAS
from ._storage import Entry, TapeStorage

#: Rows per Parquet row group: small enough to stream, large enough to compress well.
ROW_GROUP_ROWS = 4096
#: How many times a read starts over because shards changed under it before giving up.
READ_ATTEMPTS = 20


#: How every shard is opened for reading: each page's CRC-32 (written by :func:`parquet_options`)
#: is checked, so a flipped bit in a data page is a named error, not silently different rows.
#: Shards written without checksums (before gymtape 0.13) are read as before.
READ_OPTIONS: dict[str, object] = {"page_checksum_verification": True}

#: What a damaged file raises from pyarrow: its own errors, OSError (a failed checksum, a short
#: read), ValueError (UnicodeDecodeError from mangled footer metadata, a bad number).
_DECODE_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)


def parquet_options(table: str) -> dict[str, object]:
    """How every shard is written, by the writer and the compactor alike.

    Every page carries a CRC-32 of its bytes (``write_page_checksum``; about 0.1% of the file),
    which readers verify (:data:`READ_OPTIONS`)."""
    if table != CALLS_DIR:
        return {"compression": "zstd", "row_group_size": ROW_GROUP_ROWS, "write_page_checksum": True}
    # Token IDs and logprobs are plain-encoded (a dictionary over a 150k-token vocabulary only
    # adds a page of indices), logprobs byte-stream-split (exponent bytes together compress
    # well); both encodings every Parquet reader knows. pyarrow names a list's values by the
    # leaf path: "generation_logprobs" alone would set nothing.
    return {
        "compression": "zstd",
        "row_group_size": ROW_GROUP_ROWS,
        "use_dictionary": [c for c in SCHEMAS[CALLS_DIR].names if c not in _LIST_COLUMNS],
        "use_byte_stream_split": ["generation_logprobs.list.element"],
        "write_page_checksum": True,
    }


_LIST_COLUMNS = frozenset({"prompt_suffix_ids", "generation_ids", "generation_logprobs"})


class ShardVanished(Exception):
    """A listed shard was deleted (by a compactor) before it was read: list again.

    Internal: every public read catches it and starts over; it never reaches a user."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


@dataclass(frozen=True)
class ShardInfo:
    """One published shard, checked."""

    table: str
    #: Path on the tape's filesystem (a local path for local tapes).
    path: str
    rows: int
    bytes: int
    #: Writer id in the shard's name (for a compacted shard: the compactor's).
    writer_id: str
    #: Shard names (same folder) this compacted shard replaces; empty for a writer's shard.
    replaces: frozenset[str] = frozenset()
    #: Writer id -> highest sequence number among its shards whose rows this shard holds. Kept
    #: by compaction even when it forgets replaced names, so a writer that reuses its id never
    #: reuses a name (readers that remember names, like the follower, would skip it).
    writers: Mapping[str, int] = field(default_factory=dict, hash=False)
    #: When a compacted shard was published (ISO-8601 UTC); None for a writer's shard.
    compacted_at: str | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def compacted(self) -> bool:
        return self.compacted_at is not None


@dataclass(frozen=True)
class ShardListing:
    """One listing of a table's folder, with supersession applied."""

    table: str
    #: Every published shard listed, in name order.
    shards: tuple[ShardInfo, ...]
    #: The shards a reader reads: those no listed shard replaces (in name order).
    live: tuple[ShardInfo, ...]
    #: Listed shards that a live (or superseded) compacted shard replaces: awaiting deletion.
    superseded: tuple[ShardInfo, ...]
    names: frozenset[str] = field(default_factory=frozenset)
    #: Names whose rows the live shards hold: their own and every name they replace.
    coverage: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, table: str, shards: Iterable[ShardInfo]) -> ShardListing:
        shards = tuple(sorted(shards, key=lambda s: s.name))
        replaced: set[str] = set()
        for s in shards:
            replaced |= s.replaces
        live = tuple(s for s in shards if s.name not in replaced)
        superseded = tuple(s for s in shards if s.name in replaced)
        coverage = {s.name for s in live}
        for s in live:
            coverage |= s.replaces
        return cls(table, shards, live, superseded, frozenset(s.name for s in shards), frozenset(coverage))

    def missed_by(self, earlier: ShardListing) -> bool:
        """Whether this later listing shows that ``earlier`` missed a shard: a shard new since
        ``earlier`` replaces a name whose rows ``earlier``'s live shards do not hold."""
        return any(s.replaces - earlier.coverage for s in self.shards if s.name not in earlier.names)


def writer_of(name: str) -> str:
    """Writer id in a shard name ``<writer>-<seq>.parquet``."""
    return name[: -len(SHARD_SUFFIX)].rsplit("-", 1)[0]


def seq_of(name: str) -> int:
    """Sequence number in a shard name ``<writer>-<seq>.parquet`` (-1 if it has none)."""
    tail = name[: -len(SHARD_SUFFIX)].rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


class ShardCatalog:
    """The shards of one tape, on any storage: listings, checked shard infos, reads.

    Checked infos are cached by (path, size, mtime), so a shard's footer is read once per
    catalog however often the folder is listed (a loader reading the tape every epoch keeps one
    catalog: on object storage each footer check is a ranged GET). Thread-safe; pickles with
    its checks (DataLoader workers started by spawn).
    """

    def __init__(self, storage: TapeStorage) -> None:
        self.storage = storage
        self._checked: dict[tuple[str, int, int | None], ShardInfo] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        with self._lock:
            return {"storage": self.storage, "checked": dict(self._checked)}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["storage"])  # type: ignore[misc, arg-type]
        self._checked.update(state["checked"])  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"ShardCatalog({self.storage.location!r})"

    # -- listings -------------------------------------------------------------------------------

    def listing(self, table: str, unreadable: list[CorruptShardError] | None = None) -> ShardListing:
        """List ``table``'s folder once and check every shard in it (re-listing, bounded, when a
        listed shard vanishes before its footer is read).

        ``unreadable``: a list that collects the shards failing the check (left out of the
        listing) instead of raising :class:`~recorder.CorruptShardError` for the first."""
        _check_table(table)
        for _ in range(READ_ATTEMPTS):
            bad: list[CorruptShardError] = []
            try:
                infos = []
                for e in self.storage.list(table):
                    if not is_published_shard(e.name):
                        continue
                    try:
                        infos.append(self.check(table, e))
                    except CorruptShardError as err:
                        if unreadable is None:
                            raise
                        bad.append(err)
                listing = ShardListing.of(table, infos)
            except ShardVanished:
                continue
            self._forget_unlisted(table, infos)
            if unreadable is not None:
                unreadable.extend(bad)
            return listing
        raise self._unsettled(table)

    def _forget_unlisted(self, table: str, listed: list[ShardInfo]) -> None:
        """Drop the checks of ``table``'s shards that are gone (compacted away): a catalog that
        follows a live tape for days would otherwise keep one per shard ever written."""
        keep = {(i.path, i.bytes) for i in listed}
        with self._lock:
            gone = [k for k, v in self._checked.items() if v.table == table and (k[0], k[1]) not in keep]
            for k in gone:
                del self._checked[k]

    def settled_listing(self, table: str) -> ShardListing:
        """A listing confirmed by a second one: no shard was missed (see the module doc)."""
        _check_table(table)
        for _ in range(READ_ATTEMPTS):
            first = self.listing(table)
            if not self.listing(table).missed_by(first):
                return first
        raise self._unsettled(table)

    def check(self, table: str, entry: Entry) -> ShardInfo:
        """The one shard check: footer readable, a gymtape shard of a readable version, the schema."""
        key = (entry.path, entry.size, entry.mtime_ns)
        with self._lock:
            info = self._checked.get(key)
        if info is not None:
            return info
        where = self.storage.url(entry.path)
        try:
            md = self.storage.parquet_file(entry.path).metadata
            schema = md.schema.to_arrow_schema()
            num_rows = md.num_rows
        except _DECODE_ERRORS as e:
            raise self._read_error(entry.path, e) from e
        meta = schema.metadata or {}
        check_file_schema(schema, SCHEMAS[table], where, "shard")
        if num_rows < 0:
            raise CorruptShardError(where, f"the footer says {num_rows} rows")
        try:
            replaces = frozenset(str(n) for n in orjson.loads(meta[SHARD_REPLACES_KEY])) \
                if SHARD_REPLACES_KEY in meta else frozenset()
            writers = {str(k): int(v) for k, v in orjson.loads(meta[SHARD_WRITERS_KEY]).items()} \
                if SHARD_WRITERS_KEY in meta else {}
            compacted_at = meta[SHARD_COMPACTED_AT_KEY].decode() if SHARD_COMPACTED_AT_KEY in meta else None
        except (orjson.JSONDecodeError, TypeError, AttributeError, ValueError) as e:
            raise CorruptShardError(where, f"unreadable compaction metadata ({e})") from e
        own = writer_of(entry.name)
        if compacted_at is None:
            writers = {own: seq_of(entry.name)}
        info = ShardInfo(table, entry.path, md.num_rows, entry.size, own, replaces, writers, compacted_at)
        with self._lock:
            self._checked[key] = info
        return info

    # -- reading ---------------------------------------------------------------------------------

    def read_shard(self, info: ShardInfo, columns: list[str] | None = None) -> pa.Table:
        """Read one checked shard (``ShardVanished`` if it was deleted since it was listed).

        Page checksums are verified, and the rows must come back as the footer promised (row
        count, the table's columns at their types and nullability): anything else is a
        :class:`~recorder.CorruptShardError` naming the shard."""
        try:
            table = self.storage.parquet_file(info.path, **READ_OPTIONS).read(columns=columns)
        except _DECODE_ERRORS as e:
            raise self._read_error(info.path, e) from e
        return _as_schema(table, info, columns, self.storage.url(info.path))

    def _read_error(self, path: str, error: Exception) -> Exception:
        """A shard that is gone vanished (object stores report a delete between the open and a
        ranged GET as a generic I/O error); one that is still there is corrupt."""
        if isinstance(error, FileNotFoundError) or not self.storage.exists_path(path):
            return ShardVanished(path)
        return CorruptShardError(self.storage.url(path), str(error))

    def try_read_shard(self, info: ShardInfo, columns: list[str] | None = None) -> pa.Table | None:
        """:meth:`read_shard`, or None when the shard was deleted since it was listed (for
        readers that deduplicate rows themselves and simply list again, like the follower)."""
        try:
            return self.read_shard(info, columns)
        except ShardVanished:
            return None

    def read(self, table: str, columns: list[str] | None = None, *,
             unreadable: list[CorruptShardError] | None = None) -> pa.Table:
        """Every row of ``table`` exactly once, as of one settled listing (see the module doc):
        the live shards' rows, then the log's.

        ``unreadable``: a list that collects the shards that cannot be read (their rows left
        out) instead of raising :class:`~recorder.CorruptShardError` for the first: for
        ``gymtape check``, which reports every damaged shard and checks the rest."""
        _check_table(table)
        tolerant = unreadable is not None
        # Shard names are write-once, so a shard read by a failed attempt holds the same rows in
        # the next: a retry reads only what is new, which keeps its window short enough to settle
        # beside a writer and a compactor that never pause.
        done: dict[tuple[str, int], pa.Table] = {}
        for _ in range(READ_ATTEMPTS):
            bad: list[CorruptShardError] = []
            try:
                log = self.log_entries(table)
                listing = self.listing(table, bad if tolerant else None)
                parts = []
                for s in listing.live:
                    try:
                        key = (s.path, s.bytes)
                        if key not in done:
                            done[key] = self.read_shard(s, columns)
                        parts.append(done[key])
                    except CorruptShardError as e:
                        if not tolerant:
                            raise
                        bad.append(e)
                if self.listing(table, [] if tolerant else None).missed_by(listing):
                    continue
                parts += [r.table for r in self.read_log(table, log, listing, columns)]
            except ShardVanished:
                continue
            if unreadable is not None:
                unreadable.extend(bad)
            return _concat(table, parts, columns)
        raise self._unsettled(table)

    def snapshot(self, table: str, columns: list[str] | None = None) -> tuple[ShardListing, pa.Table]:
        """A settled listing and the log rows it does not cover (for lazy readers of the shards)."""
        _check_table(table)
        for _ in range(READ_ATTEMPTS):
            try:
                log = self.log_entries(table)
                listing = self.settled_listing(table)
                rows = self.read_log(table, log, listing, columns)
            except ShardVanished:
                continue
            return listing, _concat(table, [r.table for r in rows], columns)
        raise self._unsettled(table)

    # -- the log -------------------------------------------------------------------------------

    def log_entries(self, table: str) -> list[Entry]:
        """Log segments of ``table`` (list them before the shards: see the module doc)."""
        if self.storage.local is None:
            return []  # live capture writes POSIX only; object stores hold no log
        return [e for e in self.storage.list(f"{WAL_DIR}/{table}") if _wal.is_segment(e.name)]

    def try_read_segment(self, table: str, entry: Entry, columns: list[str] | None = None) -> pa.Table | None:
        """One log segment's committed rows, or None when it was sealed and deleted since it was
        listed (its rows are in its shard, :func:`segment_shard` names it)."""
        try:
            return _wal.read_segment(self.storage, table, entry, SCHEMAS[table], columns).table
        except FileNotFoundError:
            return None

    def read_log(self, table: str, entries: list[Entry], listing: ShardListing,
                 columns: list[str] | None = None) -> list[_wal.SegmentRows]:
        """The rows of the segments ``listing`` does not cover (``ShardVanished`` when one was
        sealed and deleted since it was listed: read again)."""
        out = []
        for e in entries:
            if _wal.shard_name_of(e.name) in listing.coverage:
                continue
            try:
                out.append(_wal.read_segment(self.storage, table, e, SCHEMAS[table], columns))
            except FileNotFoundError:
                raise ShardVanished(e.path) from None
        return out

    def _unsettled(self, table: str) -> TapeError:
        return TapeError(
            f"{self.storage.describe(table)}: the shards changed under the reader {READ_ATTEMPTS} times in a row "
            "(a compactor deleting shards as they were read); try again, or read after the compaction"
        )


def segment_shard(segment_name: str) -> str:
    """The name of the shard a log segment is sealed into (same stem, same rows in the same order)."""
    return _wal.shard_name_of(segment_name)


def _as_schema(table: pa.Table, info: ShardInfo, columns: list[str] | None, where: str) -> pa.Table:
    """``table`` as read from a shard, held to what the table's schema and the footer promise."""
    schema = SCHEMAS[info.table]
    want = schema if columns is None else pa.schema([schema.field(c) for c in columns])
    if table.num_rows != info.rows:
        raise CorruptShardError(where, f"{table.num_rows} rows read, the footer says {info.rows}")
    got = table.schema
    if got.names == want.names and all(g.type.equals(w.type) and g.nullable == w.nullable for g, w in zip(got, want)):
        return table
    if not set(want.names) <= set(got.names):
        raise CorruptShardError(where, f"columns {sorted(set(want.names) - set(got.names))} are missing")
    for f in want:
        col = table.column(f.name)
        if not col.type.equals(f.type):
            raise CorruptShardError(where, f"column {f.name} reads as {col.type}, expected {f.type}")
        if not f.nullable and col.null_count:
            raise CorruptShardError(where, f"column {f.name} holds {col.null_count} nulls; it may hold none")
    return pa.Table.from_arrays([table.column(f.name) for f in want], schema=want.with_metadata(got.metadata))


def _concat(table: str, parts: list[pa.Table], columns: list[str] | None) -> pa.Table:
    schema = SCHEMAS[table]
    if not parts:
        return schema.empty_table() if columns is None else pa.schema([schema.field(c) for c in columns]).empty_table()
    return pa.concat_tables([p.replace_schema_metadata(None) for p in parts])


def _check_table(table: str) -> None:
    if table not in TABLES:
        raise TapeValueError(f"table must be one of {TABLES}, got {table!r}")
