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

A batch may carry custom metadata (Arrow IPC's per-message key/value pairs, which readers of
the rows ignore): `gymtape serve` puts its calls' call-key index entries there
(``gymtape:keys``, ``recorder.tape._keys``), so the one fsync of the group makes the index
entries durable too, and the index file is only synced before its rows' segment is sealed.

Crash recovery: a live writer holds an exclusive ``flock`` on each segment it appends to. A
segment nobody holds belongs to a dead writer; readers read it as it is (nothing is lost), and
the next durable writer to open the tape seals it into its shard (:func:`recover`), first
writing again any index entry of its batches that the dead writer's index file lost.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from .._errors import CorruptShardError
from ._keys import LOG_METADATA_KEY, restore_from_log
from ._layout import SHARD_SUFFIX, WAL_DIR, WAL_SUFFIX, is_temp_file, temp_name
from ._meta import check_file_schema
from ._storage import Entry, TapeStorage, fsync_dir, publish


#: Custom-metadata key under which a batch carries its rows' notes (``TapeWriter.add_call(log_note=)``).
KEYS_METADATA = LOG_METADATA_KEY


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
        self._schema_bytes = header.size  # the schema message a stream writer starts with
        self._schema_header: pa.Buffer = header

    def append(self, batch: pa.RecordBatch, metadata: dict[bytes, bytes] | None = None) -> None:
        """Append (with ``metadata`` as the batch message's custom metadata) and fsync; on
        failure the segment is cut back to its last whole batch (or, when even that fails,
        marked broken so the writer starts a new one). The file is opened ``O_APPEND``: after a
        cut, the next batch lands right after the last whole one."""
        data = batch.serialize() if not metadata else self._message(batch, metadata)
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

    def _message(self, batch: pa.RecordBatch, metadata: dict[bytes, bytes]) -> pa.Buffer:
        """The batch's IPC message with custom metadata (``RecordBatch.serialize`` has none): a
        stream writer's output without the schema message it starts with (the same bytes as
        ``schema.serialize()``, checked)."""
        sink = pa.BufferOutputStream()
        writer = pa.ipc.new_stream(sink, self.schema)
        writer.write_batch(batch, custom_metadata=metadata)
        data = sink.getvalue()  # the stream is not closed: no end-of-stream marker
        if not data.slice(0, self._schema_bytes).equals(self._schema_header):
            raise RuntimeError("pyarrow's stream writer starts with other bytes than schema.serialize()")
        return data.slice(self._schema_bytes)

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


def batch_metadata(data: bytes, key: bytes) -> list[bytes]:
    """The ``key`` custom metadata of a segment's whole batches (``data``: the segment file), in
    order; a torn last batch has none. Raises nothing: an unreadable segment has none either."""
    out = []
    try:
        reader = pa.ipc.open_stream(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError):
        return out
    while True:
        try:
            got = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            break
        except (pa.ArrowInvalid, OSError):  # an incomplete last message: in progress, or torn
            break
        value = got.custom_metadata.get(key) if got.custom_metadata is not None else None
        if value is not None:
            out.append(value)
    return out


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
            keys = batch_metadata(storage.read_bytes(WAL_DIR, table_name, entry.name), LOG_METADATA_KEY)
        except (FileNotFoundError, CorruptShardError):
            continue
        if keys:  # the dead writer's call-key index entries of these rows: durable before the seal
            restore_from_log(storage.local, entry.name[: -len(WAL_SUFFIX)], b"".join(keys))
        seal(storage, table_name, entry.name, rows.table.replace_schema_metadata(schema.metadata), **parquet_options)
        done.append(entry.name)
    return done

