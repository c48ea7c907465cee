"""TapeWriter: buffers call and rollout rows and publishes them as immutable Parquet shards.

Guarantees, in the order they matter:

* A shard becomes visible only complete: on POSIX it is written under a hidden temporary name,
  fsynced, then linked to its final name; a crash (even SIGKILL) leaves at most a hidden
  temporary file readers skip. On object storage it is serialised in memory and PUT once to its
  final name (``recorder.tape._storage``). Live capture (`gymtape serve`, `gymtape record`)
  writes to POSIX only; ingest and compaction write anywhere.
* Several writers may share one tape without coordination: shard names carry the writer id and
  a sequence number, and ``tape.json`` is created with a no-clobber link (on object storage: an
  exists-check then a put, read back; best effort).
* Within one flush the calls shard is published before the rollouts shard, so a visible rollout
  row of this writer always has its calls visible too.
* A *durable* writer (``durable=True``: live capture) first appends rows to its write-ahead
  log (``recorder.tape._wal``): :meth:`TapeWriter.commit` returns once every row added before
  it is fsynced and readable by any process that opens the tape, concurrent commits sharing one
  fsync. Log segments are sealed into shards of the same name later (size, age, close). A
  failed commit (disk full, permissions) raises :class:`~recorder.TapeWriteError` and discards
  the rows it could not make durable, with the writer's per-rollout state restored, so the
  caller can answer "not recorded" and a retry starts clean; the next commit tries again.
* Every value is checked against its column when it is added (:class:`TapeValueError` naming
  the field), so one bad value can never fail a whole flush or commit.
* ``close()`` publishes what is buffered and then the writer's manifest
  (``writers/<id>.json``); SIGTERM/SIGINT call ``close()``. When an exception escapes a
  ``with`` block the buffer is dropped and no manifest is written, so an interrupted run never
  looks complete; shards flushed before the error stay (each holds whole rows).
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import os
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from . import _signals
from .._errors import TapeError, TapeValueError, TapeWriteError, WriterClosedError, WriterIdConflictError
from ._shards import ROW_GROUP_ROWS, ShardCatalog, ShardVanished, parquet_options, seq_of, writer_of  # noqa: F401
from ._storage import TapeStorage, require_posix
from . import _wal
from ._layout import (
    CALLS_DIR,
    FORMAT_VERSION,
    ROLLOUTS_DIR,
    SHARD_TABLE_KEY,
    SHARD_VERSION_KEY,
    WRITER_MANIFEST_TEMPLATE,
    WRITERS_DIR,
    WAL_DIR,
    COMPACTOR_PREFIX,
    is_published_shard,
    layout_dict,
    shard_name,
)
from ._meta import TapeMeta, TokenizerIdentity, open_or_create_meta
from ._prompts import common_prefix_len
from ._records import CALL_STATUSES, LOGPROBS_KINDS, ROLLOUT_STATUSES, ROLLOUT_TOKEN_STATUSES, CallRecord, RolloutRecord
from ._schema import CALL_COLUMNS, CALLS_SCHEMA, ROLLOUT_COLUMNS, ROLLOUTS_SCHEMA, Column

#: Open rollouts whose last context the writer keeps for delta encoding. Past this the oldest
#: is forgotten and its next call is stored with its full prompt (correct, just larger).
MAX_OPEN_ROLLOUTS = 65536
#: ... and at most this many bytes of their contexts (a long-running server never sees its
#: rollouts end: without a byte bound, 65,536 contexts of 4k-32k tokens would hold 1-8 GB).
#: A rollout forgotten here loses nothing: its next call is stored whole, not delta-encoded.
MAX_OPEN_CONTEXT_BYTES = 256 * 2**20


def _json(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def default_writer_id() -> str:
    host = socket.gethostname().split(".")[0] or "host"
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in host)
    return f"{safe}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _TableBuffer:
    """Column-wise row buffer; token lists stay numpy arrays until the flush.

    ``notes``: bytes that travel with rows to the write-ahead log (a durable writer puts them,
    joined, in the batch's custom metadata), taken and discarded with the rows."""

    def __init__(self, columns: tuple[Column, ...], schema: pa.Schema) -> None:
        self.columns = columns
        self.schema = schema
        self.values: dict[str, list[Any]] = {c.name: [] for c in columns}
        self._checks = [(c, None if c.name in _TOKEN_COLUMNS else _CHECKS.get(c.type, _check_via_arrow)) for c in columns]
        self.rows = 0
        self.nbytes = 0
        self.first_at: float | None = None
        self.notes: list[bytes] = []
        self._names = [c.name for c in columns]
        self._struct = pa.struct(list(schema))

    def append(self, row: dict[str, Any], nbytes: int, owner: str, note: bytes | None = None) -> None:
        for col, check in self._checks:
            value = row[col.name]
            if value is None:
                if not col.nullable:
                    raise TapeValueError(f"{owner}: {col.name} must not be null")
            elif check is not None:
                row[col.name] = check(value, col, owner)
        for name, values in self.values.items():
            values.append(row[name])
        if note:
            self.notes.append(note)
        self.rows += 1
        self.nbytes += nbytes
        if self.first_at is None:
            self.first_at = time.monotonic()

    def take(self) -> _TableBuffer:
        """Hand over the buffered rows, leaving this buffer empty."""
        taken = copy.copy(self)
        taken.values, taken.rows, taken.nbytes, taken.first_at = self.values, self.rows, self.nbytes, self.first_at
        taken.notes = self.notes
        self.values = {c.name: [] for c in self.columns}
        self.rows, self.nbytes, self.first_at = 0, 0, None
        self.notes = []
        return taken

    def to_batch(self) -> pa.RecordBatch:
        """The buffered rows as one batch. A group commit's few rows are converted as one struct
        array (one Arrow call, one Python object: ~4x cheaper than an array per column, whose
        fixed cost is most of a small batch); a shard's many rows column by column. Token
        columns hold int32/float32 numpy arrays, which Arrow takes as list values directly."""
        if self.rows <= _STRUCT_ROWS:
            rows = [dict(zip(self._names, row)) for row in zip(*(self.values[n] for n in self._names))]
            return pa.RecordBatch.from_struct_array(pa.array(rows, type=self._struct))
        return pa.RecordBatch.from_arrays([pa.array(self.values[c.name], type=c.type) for c in self.columns],
                                          schema=self.schema)

    def to_table(self) -> pa.Table:
        return pa.Table.from_batches([self.to_batch()], schema=self.schema)


#: Up to this many rows, :meth:`_TableBuffer.to_batch` converts them as one struct array.
_STRUCT_ROWS = 256


def _check_int(bits: int) -> Any:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1

    def check(value: Any, col: Column, owner: str) -> int:
        if isinstance(value, bool) or isinstance(value, float):
            raise TapeValueError(f"{owner}: {col.name} must be an integer, got {value!r}")
        try:
            v = operator.index(value)
        except TypeError:
            raise TapeValueError(f"{owner}: {col.name} must be an integer, got {value!r}") from None
        if not lo <= v <= hi:
            raise TapeValueError(f"{owner}: {col.name}={v} does not fit the tape's {col.type} column "
                                 f"({lo}..{hi})")
        return v
    return check


def _check_float(value: Any, col: Column, owner: str) -> float:
    if isinstance(value, bool):
        raise TapeValueError(f"{owner}: {col.name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise TapeValueError(f"{owner}: {col.name} must be a number, got {value!r}") from None


def _check_str(value: Any, col: Column, owner: str) -> str:
    if not isinstance(value, str):
        raise TapeValueError(f"{owner}: {col.name} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TapeValueError(f"{owner}: {col.name} is not valid text ({e.reason})") from None
    return value


def _check_via_arrow(value: Any, col: Column, owner: str) -> Any:
    """Rare columns (lists of indices and keys, timestamps): let Arrow judge the one value.
    A plain UTC or naive ``datetime`` always fits a timestamp column (every call has one)."""
    if type(value) is datetime and (value.tzinfo is None or value.tzinfo is timezone.utc) and pa.types.is_timestamp(col.type):
        return value
    try:
        pa.array([value], type=col.type)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
        raise TapeValueError(f"{owner}: {col.name} does not fit the tape's {col.type} column ({e})") from None
    return value


#: Per column type, the check a value passes when it is added (token lists are checked apart).
_CHECKS: dict[pa.DataType, Any] = {
    pa.int32(): _check_int(32), pa.int64(): _check_int(64),
    pa.float32(): _check_float, pa.float64(): _check_float, pa.string(): _check_str,
}
#: Token columns, checked (and converted) by ``_as_ids`` before they reach a buffer.
_TOKEN_COLUMNS = frozenset({"prompt_suffix_ids", "generation_ids", "generation_logprobs"})


@dataclass
class _OpenRollout:
    """What the writer remembers of a rollout between its calls."""

    context: np.ndarray
    messages: list[Any] | None
    tools_json: str | None
    num_calls: int = 0
    nonempty_calls: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    versions: list[int] = field(default_factory=list)


_INT32_MAX = int(np.iinfo(np.int32).max)


def _as_ids(values: Any, what: str, call_id: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise TapeValueError(f"call {call_id}: {what} must be a list of integers ({e})") from e
    if arr.ndim != 1:
        raise TapeValueError(f"call {call_id}: {what} must be a flat list of integers, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > _INT32_MAX):
        raise TapeValueError(f"call {call_id}: {what} holds IDs outside 0..2^31-1")
    return arr.astype(np.int32)


class TapeWriter:
    """Append calls and rollouts to a tape (created if needed): a local folder or a URL.

    Use as a context manager, or call :meth:`close`. Thread-safe.

    Args:
        path: the tape: a local folder, or a URL (``s3://bucket/run1``) for batch writes
            (ingest, compaction); ``filesystem`` as for :class:`~recorder.Tape`.
        writer_id: names this writer's shards; default ``host-pid-random``. Reusing an id
            continues its sequence numbers.
        tokenizer: identity recorded in ``tape.json`` (checked against an existing tape).
        flush_rows: publish a shard once this many rows are buffered in a table.
        flush_bytes: ... or once the buffered token data reaches this many bytes.
        flush_seconds: ... or once the oldest buffered row is this old (checked by a
            background thread); None disables the time trigger.
        handle_signals: close on SIGTERM/SIGINT (installed from the main thread only).
        durable: write through the write-ahead log (local and shared POSIX folders only):
            :meth:`commit` makes rows durable and visible; ``flush_rows``/``flush_bytes``/
            ``flush_seconds`` then say when a log segment is sealed into a shard.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        writer_id: str | None = None,
        tokenizer: TokenizerIdentity | None = None,
        created_by: str = "",
        flush_rows: int = 16384,
        flush_bytes: int = 64 << 20,
        flush_seconds: float | None = 30.0,
        handle_signals: bool = True,
        filesystem: Any = None,
        durable: bool = False,
    ) -> None:
        if durable:
            require_posix(path if not isinstance(path, TapeStorage) else path.location, "a durable TapeWriter")
        self.storage = TapeStorage.of(path, filesystem)
        self.location = self.storage.location
        #: The tape folder when it is local, else None.
        self.path: Path | None = self.storage.local
        self.writer_id = writer_id or default_writer_id()
        if not self.writer_id.replace("-", "").replace("_", "").isalnum():
            raise TapeValueError(f"writer_id {self.writer_id!r} may hold only letters, digits, '-' and '_'")
        self.meta = open_or_create_meta(self.storage, TapeMeta(tokenizer=tokenizer, created_by=created_by))
        self.storage.makedirs(CALLS_DIR, ROLLOUTS_DIR, WRITERS_DIR)
        self.durable = durable
        if durable:
            self.storage.makedirs(WAL_DIR, f"{WAL_DIR}/{CALLS_DIR}", f"{WAL_DIR}/{ROLLOUTS_DIR}")
            self.meta = _upgrade_meta(self.storage, self.meta)
        self.flush_rows = flush_rows
        self.flush_bytes = flush_bytes
        self.flush_seconds = flush_seconds
        self._seq = self._next_seq()
        self._calls = _TableBuffer(CALL_COLUMNS, self._with_meta(CALLS_SCHEMA, CALLS_DIR))
        self._rollouts = _TableBuffer(ROLLOUT_COLUMNS, self._with_meta(ROLLOUTS_SCHEMA, ROLLOUTS_DIR))
        self._open: OrderedDict[str, _OpenRollout] = OrderedDict()
        self._open_bytes = 0  # bytes of the remembered contexts
        # Durable mode: rows added (a running count), rows durable, rows discarded by a failed
        # commit; the undo log of rows not yet durable (rollout id, state before the row, is a call).
        self._added = 0
        self._durable_upto = 0
        self._failed_upto = 0
        self._undo: list[tuple[str, _OpenRollout | None, bool]] = []
        self._segments: dict[str, _wal.Segment] = {}
        self._segment_born: dict[str, float] = {}
        self._commit_lock = threading.Lock()
        #: Called before a log segment with rows is sealed (its batches' notes stop being in the
        #: log then): `gymtape serve` makes its call-key index file durable there.
        self.before_seal: Callable[[], None] | None = None
        #: The last write failure (commit or seal), None once a commit succeeds again.
        self.last_error: str | None = None
        #: Write failures so far (failed commits and seals).
        self.write_errors = 0
        self._lock = threading.RLock()
        self._busy = 0
        self._close_requested = False
        self._closed = False
        self.shards: list[str] = []
        self.rows_written = {CALLS_DIR: 0, ROLLOUTS_DIR: 0}
        if durable:  # segments of dead writers (a crash): seal them into their shards
            for table, schema in ((CALLS_DIR, self._calls.schema), (ROLLOUTS_DIR, self._rollouts.schema)):
                _wal.recover(self.storage, table, schema, **parquet_options(table))
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if flush_seconds is not None:
            self._ticker = threading.Thread(target=self._tick, name=f"gymtape-flush-{self.writer_id}", daemon=True)
            self._ticker.start()
        if handle_signals:
            _signals.register(self)

    # -- public API ---------------------------------------------------------------------

    def add_call(self, rec: CallRecord, *, log_note: bytes | None = None) -> str:
        """Buffer one call; returns its call id. A durable writer puts ``log_note`` in the custom
        metadata of the log batch that makes the row durable (all the batch's notes, joined, under
        ``gymtape:keys``: `gymtape serve`'s call-key index entries, ``recorder.tape._keys``)."""
        call_id = rec.call_id or f"{rec.rollout_id}-{rec.call_index}"
        prompt = _as_ids(rec.prompt_ids, "prompt_ids", call_id)
        gen = _as_ids(rec.generation_ids, "generation_ids", call_id)
        logprobs = np.asarray(rec.generation_logprobs, dtype=np.float32)
        if logprobs.shape != gen.shape:
            raise TapeValueError(
                f"call {call_id}: generation_ids has {gen.size} entries but generation_logprobs "
                f"{logprobs.size}; they must be the same length"
            )
        token_status = rec.token_status or ("ok" if prompt.size or gen.size else "empty")
        _check_choice(token_status, CALL_STATUSES, "token_status", call_id)
        if rec.logprobs_kind is not None:
            _check_choice(rec.logprobs_kind, LOGPROBS_KINDS, "logprobs_kind", call_id)
        tools_json = _json(rec.tools)
        with self._critical():
            state = self._open.get(rec.rollout_id)
            before = copy.copy(state) if state is not None else None
            if state is None:
                state = _OpenRollout(context=np.empty(0, np.int32), messages=None, tools_json=None)
                stored_tools = tools_json
            else:
                self._open.move_to_end(rec.rollout_id)
                stored_tools = None if tools_json == state.tools_json else tools_json
            prefix_len = common_prefix_len(state.context, prompt)
            msg_prefix, new_messages = _message_delta(state.messages, rec.messages)
            row = {
                "call_id": call_id,
                "rollout_id": rec.rollout_id,
                "call_index": rec.call_index,
                "prefix_len": prefix_len,
                "prompt_suffix_ids": prompt[prefix_len:],
                "prompt_len": prompt.size,
                "generation_ids": gen,
                "generation_logprobs": logprobs,
                "token_status": token_status,
                "finish_reason": rec.finish_reason,
                "policy_version": rec.policy_version,
                "temperature": rec.temperature,
                "top_p": rec.top_p,
                "top_k": rec.top_k,
                "max_tokens": rec.max_tokens,
                "seed": rec.seed,
                "logprobs_kind": rec.logprobs_kind,
                "engine": rec.engine,
                "model": rec.model,
                "started_at": rec.started_at,
                "latency_s": rec.latency_s,
                "messages_prefix_len": msg_prefix,
                "new_messages_json": _json(new_messages),
                "tools_json": stored_tools,
                "output_json": _json(rec.output),
            }
            nbytes = 4 * (prompt.size - prefix_len + 2 * gen.size) + 64
            for k in ("new_messages_json", "tools_json", "output_json"):
                if row[k] is not None:
                    nbytes += len(row[k])
            self._calls.append(row, nbytes, f"call {call_id}", log_note)
            if before is None:
                self._remember(rec.rollout_id, state)
            if self.durable:
                self._undo.append((rec.rollout_id, before, True))
                self._added += 1
            context = np.concatenate([prompt, gen]) if gen.size else prompt
            self._open_bytes += context.nbytes - state.context.nbytes  # the state is in _open
            state.context = context
            state.messages = rec.messages
            state.tools_json = tools_json
            state.num_calls += 1
            state.nonempty_calls += token_status == "ok"
            state.prompt_tokens += prompt.size
            state.generation_tokens += gen.size
            state.versions = [*state.versions, rec.policy_version]
            self._evict()
            self._maybe_flush()
        return call_id

    def continue_from(self, rollout_id: str, context: Any) -> None:
        """Delta-encode the rollout's next call against ``context`` (the previous call's prompt
        followed by its generation), or store it whole when ``context`` is None.

        For a rollout whose previous call another writer stored (another process, another
        replica): this writer's memory of it is then stale, and a prompt encoded against it
        would not rebuild."""
        with self._critical():
            if context is None:
                self._forget(rollout_id)
                return
            ctx = _as_ids(context, "context", rollout_id)
            state = self._open.get(rollout_id)
            if state is None:
                self._remember(rollout_id, _OpenRollout(context=ctx, messages=None, tools_json=None))
            else:
                self._remember(rollout_id, dataclasses.replace(state, context=ctx, messages=None))

    def add_rollout(self, rec: RolloutRecord) -> None:
        """Buffer one rollout row; the rollout's delta state is released."""
        _check_choice(rec.status, ROLLOUT_STATUSES, "status", rec.rollout_id)
        with self._critical():
            state = self._open.get(rec.rollout_id)
            seen = state or _OpenRollout(context=np.empty(0, np.int32), messages=None, tools_json=None)
            token_status = rec.token_status or _rollout_token_status(seen)
            _check_choice(token_status, ROLLOUT_TOKEN_STATUSES, "token_status", rec.rollout_id)
            row = {
                "rollout_id": rec.rollout_id,
                "env": rec.env,
                "task_index": rec.task_index,
                "rollout_index": rec.rollout_index,
                "group_key": rec.group_key,
                "reward": rec.reward,
                "status": rec.status,
                "status_reason": rec.status_reason,
                "token_status": token_status,
                "num_calls": _pick(rec.num_calls, seen.num_calls),
                "prompt_tokens": _pick(rec.prompt_tokens, seen.prompt_tokens),
                "generation_tokens": _pick(rec.generation_tokens, seen.generation_tokens),
                "min_policy_version": _pick(rec.min_policy_version, min(seen.versions, default=None)),
                "max_policy_version": _pick(rec.max_policy_version, max(seen.versions, default=None)),
                "input_json": _json(rec.input),
                "response_json": _json(rec.response),
                "extras_json": _json(rec.extras),
                "call_item_indices": rec.call_item_indices,
                "gym_keys": rec.gym_keys,
                "source": rec.source,
                "created_at": rec.created_at or datetime.now(timezone.utc),
            }
            nbytes = 128 + sum(len(row[k]) for k in ("input_json", "response_json", "extras_json") if row[k])
            self._rollouts.append(row, nbytes, f"rollout {rec.rollout_id}")
            self._forget(rec.rollout_id)
            if self.durable:
                self._undo.append((rec.rollout_id, state, False))
                self._added += 1
            self._maybe_flush()

    def flush(self) -> None:
        """Publish everything buffered now (calls first, then rollouts)."""
        with self._critical():
            self._flush_locked()

    def commit(self, *, then: Callable[[], None] | None = None, seal: bool = True) -> None:
        """Make every row added so far durable and visible to every reader of the tape.

        Durable writers append the rows to the write-ahead log and fsync (concurrent callers
        share one fsync); others publish a shard (:meth:`flush`). Raises
        :class:`~recorder.TapeWriteError` when the rows could not be written: they are
        discarded (never half-recorded) and the next commit starts clean.

        ``then`` runs once the rows are durable, before any log segment can be sealed (what
        `gymtape serve` writes to its call-key index goes there; an exception from it is
        raised as it is, the rows stay committed). ``seal=False`` leaves sealing the segments
        that are due to :meth:`seal_due`, so a caller can answer first.
        """
        if not self.durable:
            self.flush()
            if then is not None:
                then()
            return
        with self._critical():
            target = self._added
        with self._commit_lock:
            if self._durable_upto < target:  # else another thread's commit took these rows
                if self._failed_upto >= target:
                    raise TapeWriteError(f"{self.location}: rows were not recorded: {self.last_error}")
                self._commit_locked()
            if then is not None:
                then()
            if seal:
                self._seal_all(force=False)

    def seal_due(self) -> None:
        """Seal the log segments that are big or old enough into shards (a durable writer seals
        after each :meth:`commit` unless told not to, and on its timer). Failures are recorded
        (``last_error``) and retried; the rows stay durable in the log meanwhile."""
        if not self.durable:
            return
        with self._commit_lock:
            if not self._closed:
                self._seal_all(force=False)

    def close(self) -> None:
        """Publish the buffer and this writer's manifest. Idempotent.

        A durable writer commits what is buffered and seals its log segments; a segment that
        cannot be sealed stays (durable, read as it is) for the next writer to seal."""
        with self._commit_lock, self._lock:  # always in this order (commit() takes them so)
            if self._closed:
                return
            if self.durable:
                try:
                    if self._added > self._durable_upto:
                        self._commit_locked()
                    self._seal_all(force=True)
                finally:
                    self._release_segments()
            else:
                self._flush_locked()
            try:
                self._write_manifest()
            except OSError as e:  # the rows are on the tape; only the summary of this writer is missing
                self._failed(f"could not write this writer's manifest: {_reason(e)}")
            self._shutdown()

    def abort(self) -> None:
        """Drop the buffer and stop, publishing nothing more (no manifest). Rows a durable
        writer already committed were acknowledged: they stay, and are sealed if possible."""
        with self._commit_lock, self._lock:
            if self._closed:
                return
            self._calls = _TableBuffer(self._calls.columns, self._calls.schema)
            self._rollouts = _TableBuffer(self._rollouts.columns, self._rollouts.schema)
            if self.durable:
                self._seal_all(force=True)
                self._release_segments()
            self._shutdown()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> TapeWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- internals -----------------------------------------------------------------------

    def _with_meta(self, schema: pa.Schema, table: str) -> pa.Schema:
        return schema.with_metadata({SHARD_VERSION_KEY: str(FORMAT_VERSION).encode(), SHARD_TABLE_KEY: table.encode()})

    def _next_seq(self) -> int:
        """One past this writer id's highest sequence number, counting shards compacted away
        (compacted shards record it): a reused name would be hidden from readers that remember
        names. Only compacted shards' footers are read."""
        catalog = ShardCatalog(self.storage)
        seq = -1
        for table in (CALLS_DIR, ROLLOUTS_DIR):
            for entry in self.storage.list(f"{WAL_DIR}/{table}"):
                if _wal.is_segment(entry.name) and writer_of(_wal.shard_name_of(entry.name)) == self.writer_id:
                    seq = max(seq, seq_of(_wal.shard_name_of(entry.name)))
            for entry in self.storage.list(table):
                if not is_published_shard(entry.name):
                    continue
                if writer_of(entry.name) == self.writer_id:
                    seq = max(seq, seq_of(entry.name))
                elif entry.name.startswith(f"{COMPACTOR_PREFIX}-"):
                    try:
                        seq = max(seq, catalog.check(table, entry).writers.get(self.writer_id, -1))
                    except (ShardVanished, TapeError):  # deleted meanwhile, or unreadable: readers report it
                        continue
        return seq + 1

    def _remember(self, rollout_id: str, state: _OpenRollout) -> None:
        """Remember (or replace) a rollout's delta state, as the most recently used."""
        self._forget(rollout_id)
        self._open[rollout_id] = state
        self._open_bytes += state.context.nbytes
        self._evict()

    def _forget(self, rollout_id: str) -> None:
        old = self._open.pop(rollout_id, None)
        if old is not None:
            self._open_bytes -= old.context.nbytes

    def _evict(self) -> None:
        """Forget the least recently used rollouts past the count and byte bounds (the most
        recent one stays, however large)."""
        while len(self._open) > 1 and (len(self._open) > MAX_OPEN_ROLLOUTS
                                       or self._open_bytes > MAX_OPEN_CONTEXT_BYTES):
            _, old = self._open.popitem(last=False)
            self._open_bytes -= old.context.nbytes

    class _Critical:
        def __init__(self, w: TapeWriter) -> None:
            self.w = w

        def __enter__(self) -> None:
            self.w._lock.acquire()
            if self.w._closed:
                self.w._lock.release()
                raise WriterClosedError(f"writer {self.w.writer_id} of {self.w.location} is closed")
            self.w._busy += 1

        def __exit__(self, *exc: Any) -> None:
            w = self.w
            w._busy -= 1
            honour = w._busy == 0 and w._close_requested and exc[0] is None
            w._lock.release()  # close() takes the commit lock first, then this one
            if honour:
                try:
                    w.close()
                finally:
                    _signals.busy_writer_finished()

    def _critical(self) -> TapeWriter._Critical:
        return TapeWriter._Critical(self)

    def _close_from_signal(self) -> bool:
        """Signal handler entry: close now, or ask for a close when the writer is busy."""
        if self._busy:
            self._close_requested = True
            return False
        self.close()
        return True

    def _commit_locked(self) -> None:
        """Append the buffered rows to the log, calls before rollouts (a rollout row is never
        durable without its calls). Holds ``_commit_lock``."""
        with self._lock:
            upto = self._added
            taken = {CALLS_DIR: self._calls.take(), ROLLOUTS_DIR: self._rollouts.take()}
            undo, self._undo = self._undo, []
        for table in (CALLS_DIR, ROLLOUTS_DIR):
            buf = taken[table]
            if not buf.rows:
                continue
            try:
                batch = buf.to_batch()
                self._segment(table).append(batch, {_wal.KEYS_METADATA: b"".join(buf.notes)} if buf.notes else None)
            except Exception as e:
                self._discard(undo, keep_calls=table == ROLLOUTS_DIR)
                self._failed(f"could not write {buf.rows} {table} row(s) to the log: {_reason(e)}")
                raise TapeWriteError(f"{self.location}: {self.last_error}") from e
            self.rows_written[table] += buf.rows
        self._durable_upto = upto
        self.last_error = None

    def _discard(self, undo: list[tuple[str, _OpenRollout | None, bool]], *, keep_calls: bool) -> None:
        """Forget every row not durable (the failed ones and any added since) and restore the
        rollouts' delta state as it was before them, newest first."""
        with self._lock:
            pending = undo + self._undo
            self._undo = []
            self._calls.take()
            self._rollouts.take()
            for rollout_id, before, is_call in reversed(pending):
                if is_call and keep_calls:
                    continue
                if before is None:
                    self._forget(rollout_id)
                else:
                    self._remember(rollout_id, before)
            self._failed_upto = self._added

    def _failed(self, message: str) -> None:
        self.write_errors += 1
        self.last_error = message
        print(f"gymtape: {self.location}: {message}", file=sys.stderr)

    def _segment(self, table: str) -> _wal.Segment:
        seg = self._segments.get(table)
        if seg is not None and seg.broken:
            self._seal(table)  # what it holds is whole; the next rows go to a new segment
            seg = self._segments.get(table)
        if seg is None:
            seq = self._seq
            self._seq += 1
            buf = self._calls if table == CALLS_DIR else self._rollouts
            path = Path(self.storage.path(_wal.segment_rel(table, shard_name(self.writer_id, seq)[: -len(".parquet")])))
            try:
                seg = _wal.Segment(path, buf.schema)
            except _wal.SegmentExists:
                _raise_exists(str(path))
            self._segments[table] = seg
            self._segment_born[table] = time.monotonic()
        return seg

    def _seal_all(self, *, force: bool) -> None:
        """Seal segments that are big or old enough (all, with ``force``). Failures are recorded
        and retried later: a segment's rows are durable whether or not it is sealed."""
        now = time.monotonic()
        for table, seg in list(self._segments.items()):
            old = self.flush_seconds is not None and now - self._segment_born[table] >= self.flush_seconds
            big = seg.rows >= self.flush_rows or seg.size >= self.flush_bytes
            if force or old or big or seg.broken:
                try:
                    self._seal(table)
                except Exception as e:  # kept: durable in the log; the next tick or close retries
                    self._failed(f"could not seal {seg.path.name} into a shard (its rows stay in the log): {_reason(e)}")

    def _seal(self, table: str) -> None:
        seg = self._segments[table]
        if seg.rows:
            if self.before_seal is not None:  # e.g. sync the index entries the segment's batches carry
                self.before_seal()
            _wal.seal(self.storage, table, seg.path.name, seg.table(), **parquet_options(table))
            self.shards.append(f"{table}/{_wal.shard_name_of(seg.path.name)}")
        else:
            seg.path.unlink(missing_ok=True)
        seg.close()
        del self._segments[table]

    def _release_segments(self) -> None:
        """Close the segments left (their lock goes with them): readers read them as they are."""
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()

    def _maybe_flush(self) -> None:
        if self.durable:  # rows wait for commit(); sealing follows the segment's size and age
            return
        for buf in (self._calls, self._rollouts):
            if buf.rows >= self.flush_rows or buf.nbytes >= self.flush_bytes:
                self._flush_locked()
                return

    def _tick(self) -> None:
        """Time-based flushing (sealing, for a durable writer). Never dies: a failure is
        recorded (``last_error``, ``write_errors``) and tried again at the next tick."""
        assert self.flush_seconds is not None
        interval = max(0.01, self.flush_seconds / 4)
        while not self._stop.wait(interval):
            try:
                if self.durable:
                    with self._commit_lock:
                        if not self._closed:
                            self._seal_all(force=False)
                    continue
                with self._critical():
                    firsts = [b.first_at for b in (self._calls, self._rollouts) if b.first_at is not None]
                    if firsts and time.monotonic() - min(firsts) >= self.flush_seconds:
                        self._flush_locked()
            except WriterClosedError:
                return
            except Exception as e:  # the buffer stays; the next tick retries
                self._failed(f"timed flush failed (retrying): {_reason(e)}")

    def _flush_locked(self) -> None:
        if not (self._calls.rows or self._rollouts.rows):
            return
        seq = self._seq
        self._seq += 1
        for table, attr in ((CALLS_DIR, "_calls"), (ROLLOUTS_DIR, "_rollouts")):
            buf: _TableBuffer = getattr(self, attr)
            if not buf.rows:
                continue
            self._write_shard(table, seq, buf.to_table())
            self.rows_written[table] += buf.rows
            setattr(self, attr, _TableBuffer(buf.columns, buf.schema))

    def _write_shard(self, table_dir: str, seq: int, table: pa.Table) -> None:
        rel = f"{table_dir}/{shard_name(self.writer_id, seq)}"
        try:
            self.storage.write_parquet(rel, table, **parquet_options(table_dir))
        except FileExistsError:
            _raise_exists(self.storage.describe(rel))
        self.shards.append(rel)

    def _write_manifest(self) -> None:
        manifest = {
            "writer_id": self.writer_id,
            "closed_at": datetime.now(timezone.utc).isoformat(),
            "format_version": FORMAT_VERSION,
            "rows": self.rows_written,
            "shards": self.shards,
        }
        rel = f"{WRITERS_DIR}/{WRITER_MANIFEST_TEMPLATE.format(writer=self.writer_id)}"
        self.storage.write_bytes(rel, orjson.dumps(manifest, option=orjson.OPT_INDENT_2), overwrite=True)

    def _shutdown(self) -> None:
        self._closed = True
        self._stop.set()
        _signals.unregister(self)  # the ticker thread sees _stop and ends by itself


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({e.filename or type(e).__name__})"
    return f"{type(e).__name__}: {e}"


def _upgrade_meta(storage: TapeStorage, meta: TapeMeta) -> TapeMeta:
    """A durable writer on a v1 tape marks it v2 (only the log is new): v1 readers would not
    see the log's rows, so they must refuse the tape rather than read it short."""
    if meta.format_version == FORMAT_VERSION:
        return meta
    upgraded = dataclasses.replace(meta, format_version=FORMAT_VERSION, layout=layout_dict())
    storage.write_bytes("tape.json", orjson.dumps(upgraded.to_dict(), option=orjson.OPT_INDENT_2), overwrite=True)
    return upgraded


def _raise_exists(final: str) -> None:
    raise WriterIdConflictError(f"{final} already exists; two writers share the writer id, give each its own")


def _check_choice(value: str, allowed: tuple[str, ...], what: str, owner: str) -> None:
    if value not in allowed:
        raise TapeValueError(f"{owner}: {what} is {value!r}; expected one of {', '.join(allowed)}")


def _pick(given: Any, seen: Any) -> Any:
    return seen if given is None else given


def _rollout_token_status(state: _OpenRollout) -> str:
    if state.num_calls == 0:
        return "missing"
    if state.nonempty_calls == state.num_calls:
        return "ok"
    return "empty" if state.nonempty_calls == 0 else "partial"


def _message_delta(previous: list[Any] | None, current: list[Any] | None) -> tuple[int, list[Any] | None]:
    if current is None:
        return 0, None
    if not previous:
        return 0, list(current)
    n = 0
    for a, b in zip(previous, current):
        if a != b:
            break
        n += 1
    return n, list(current[n:])
