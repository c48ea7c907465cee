"""The write-ahead log: rows durable and visible to every reader before a writer acknowledges them.

A Parquet shard is written whole, so rows wait in memory until a flush; a crash in between
loses them. Live capture cannot afford that (an answered call must be on the tape), so a
durable writer first appends each group of rows to a log segment, one per writer and table:

    wal/<table>/<writer>-<seq>.arrows

An Arrow IPC *stream*: the table's schema message, then one record-batch message per commit,
fsynced (``fdatasync``) before the commit returns. Concurrent requests share one commit
(group commit), so the fsync is paid per group, not per row. A reader opening the segment sees
every committed batch; a batch being written (or torn by a crash) is an incomplete message at
the end of the stream and is ignored: it was never acknowledged.

Segments become shards: once a segment holds enough rows (or is old enough, or its writer
closes) its rows are written as the Parquet shard ``<table>/<writer>-<seq>.parquet`` (same
stem, atomically published) and the segment is deleted. A reader that sees both prefers the
shard; compaction covers segments through the shard names it replaces. So every row is read
exactly once, wherever it is.

Crash recovery: a live writer holds an exclusive ``flock`` on each segment it appends to. A
segment nobody holds belongs to a dead writer; readers read it as it is (nothing is lost), and
the next durable writer to open the tape seals it into its shard (:func:`recover`).
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from .._errors import CorruptShardError
from ._layout import SHARD_SUFFIX, WAL_DIR, WAL_SUFFIX, is_temp_file, temp_name
from ._meta import check_file_schema
from ._storage import Entry, TapeStorage, fsync_dir, publish


def segment_rel(table: str, stem: str) -> str:
    return f"{WAL_DIR}/{table}/{stem}{WAL_SUFFIX}"


def shard_name_of(segment_name: str) -> str:
    """The shard a segment becomes: same stem."""
    return segment_name[: -len(WAL_SUFFIX)] + SHARD_SUFFIX


def is_segment(name: str) -> bool:
    return name.endswith(WAL_SUFFIX) and not is_temp_file(name) and not name.startswith(".")


class SegmentExists(FileExistsError):
    """A segment of that name exists: two writers share a writer id."""


class Segment:
    """One writer's open log segment for one table: append a batch, fsync, remember it.

    Created under a temporary name, locked, given its schema message, fsynced and only then
    linked to its final name: a visible segment always starts with a whole schema, and is
    locked from its first moment (recovery never takes a live segment for a dead one).
    """

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self.batches: list[pa.RecordBatch] = []
        self.rows = 0
        self.broken = False
        tmp = path.with_name(temp_name(path.name))
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            header = schema.serialize()
            _write_all(fd, header)
            if not publish(tmp, path, overwrite=False):
                raise SegmentExists(str(path))
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self.fd = fd
        self.size = header.size

    def append(self, batch: pa.RecordBatch) -> None:
        """Append and fsync; on failure the segment is cut back to its last whole batch (or,
        when even that fails, marked broken so the writer starts a new one). The file is opened
        ``O_APPEND``: after a cut, the next batch lands right after the last whole one."""
        data = batch.serialize()
        try:
            _write_all(self.fd, data)
            os.fdatasync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, self.size)
                os.fdatasync(self.fd)
            except OSError:
                self.broken = True
            raise
        self.size += data.size
        self.batches.append(batch)
        self.rows += batch.num_rows

    def table(self) -> pa.Table:
        return pa.Table.from_batches(self.batches, schema=self.schema)

    def close(self) -> None:
        """Release the file (and its lock): after sealing, or when the writer stops."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _write_all(fd: int, data: pa.Buffer | bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


@dataclass(frozen=True)
class SegmentRows:
    """What a reader got from one segment: its committed rows, and whether a torn batch followed."""

    name: str
    table: pa.Table
    torn_bytes: int = 0


def read_segment(storage: TapeStorage, table_name: str, entry: Entry, schema: pa.Schema,
                 columns: list[str] | None = None) -> SegmentRows:
    """Every whole batch of a segment (``FileNotFoundError`` when it was sealed and deleted).

    A segment that does not start with a readable gymtape schema is corrupt (named); bytes after
    the last whole batch are a write in progress or a torn, never acknowledged one.
    """
    data = storage.read_bytes(WAL_DIR, table_name, entry.name)
    where = storage.url(entry.path)
    stream = pa.BufferReader(data)
    try:
        messages = pa.ipc.MessageReader.open_stream(stream)
        got = pa.ipc.read_schema(messages.read_next_message())
    except (pa.ArrowInvalid, OSError, StopIteration) as e:
        raise CorruptShardError(where, f"not an Arrow IPC log segment ({e})") from e
    check_file_schema(got, schema, where, "log segment")
    batches = []
    torn = 0
    while True:
        at = stream.tell()
        try:
            message = messages.read_next_message()
        except StopIteration:
            break
        except (pa.ArrowInvalid, OSError):  # an incomplete last message: in progress, or torn
            torn = len(data) - at
            break
        try:
            batches.append(pa.ipc.read_record_batch(message, got))
        except (pa.ArrowInvalid, OSError) as e:
            raise CorruptShardError(where, f"batch at byte {at} cannot be decoded ({e})") from e
    out = pa.Table.from_batches(batches, schema=got) if batches else got.empty_table()
    if columns is not None:
        out = out.select(columns)
    return SegmentRows(entry.name, out.replace_schema_metadata(None), torn)


def held_by_live_writer(path: Path) -> bool:
    """Whether a writer holds this segment (its flock); False when it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def seal(storage: TapeStorage, table_name: str, segment_name: str, rows: pa.Table, **parquet_options: object) -> None:
    """Publish a segment's rows as its shard (unless a shard of that name exists), then delete the
    segment. Crash-safe at every step: until the delete, readers prefer the shard."""
    shard_rel = f"{table_name}/{shard_name_of(segment_name)}"
    if not storage.exists(shard_rel):
        try:
            storage.write_parquet(shard_rel, rows, **parquet_options)
        except FileExistsError:
            pass  # sealed concurrently (a recovering writer): same rows, same name
    assert storage.local is not None
    seg = Path(storage.path(WAL_DIR, table_name, segment_name))
    seg.unlink(missing_ok=True)
    fsync_dir(seg.parent)


def recover(storage: TapeStorage, table_name: str, schema: pa.Schema, **parquet_options: object) -> list[str]:
    """Seal the segments of dead writers (nobody holds their lock); returns their names.

    Unreadable segments are left where they are for a person to look at (readers name them)."""
    assert storage.local is not None
    done = []
    for entry in storage.list(f"{WAL_DIR}/{table_name}"):
        if not is_segment(entry.name) or held_by_live_writer(Path(entry.path)):
            continue
        try:
            rows = read_segment(storage, table_name, entry, schema)
        except (FileNotFoundError, CorruptShardError):
            continue
        seal(storage, table_name, entry.name, rows.table.replace_schema_metadata(schema.metadata), **parquet_options)
        done.append(entry.name)
    return done

