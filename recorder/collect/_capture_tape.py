"""NeMo Gym training-token capture on a tape: the tape side, on plain JSON dicts.

NeMo Gym 0.7 (``nemo_gym.token_id_capture``) says what a token-capture backend must do; the
Gym-facing classes (``_token_capture.py``: ``TapeSink``, ``TapeSource``, ``TapeLineage``) turn
Gym's ``TokenEntry`` into the JSON dict Gym itself would store (``model_dump(mode="json")``) and
call this module, which does the work without importing nemo_gym. ``gymtape ingest`` of Gym's
own reference store uses it too (``_capture_ingest.py``), so that works without nemo_gym.

Where an entry goes:

* **One call row per entry**, in the tape's ``calls`` table, through a durable
  :class:`~recorder.TapeWriter` (``commit()``: durable and readable by every process before a
  put returns; concurrent puts share one fsync). The token arrays go in the token columns, the
  prompt delta-encoded against the rollout's previous row as every tape row is, so ``Tape``,
  ``check``, ``replay`` and the trainer bridge read them like any call. Everything else of the
  entry (lineage and continuation fields, output items, ...) is kept, exactly, as JSON in
  ``output_json``: ``{"gym_capture": 1, "entry": {...}, "prompt_skip": n}``, where ``entry`` is
  the entry without its three token arrays, ``rollout_id`` and ``model_call_id`` (columns
  ``rollout_id`` and ``call_id`` = ``<rollout_id>/<model_call_id>`` hold those), ``prompt_skip``
  says how many leading tokens of the full prompt a delta entry (``prompt_is_delta``) left out,
  and ``entry.generation_log_probs`` is present only when the float32 column cannot hold the
  values exactly (vLLM's logprobs are float32, so it normally is not).
* **Per rollout, ``capture/<rollout_id>.events``**: what is not a row, as JSON lines fsynced
  before the call returns: ``["begin", call]`` (Gym's pre-dispatch intent), ``["incomplete",
  call]`` (``mark_incomplete``), ``["retired", snapshot_id, version]`` (a successful ``drop``).
  The file is also the rollout's lock (``flock``): puts, intents, marks, freezes and drops of
  one rollout take turns across processes; different rollouts never wait for each other.

What a snapshot is: a rollout's rows and events. ``version`` counts them (rows plus events
other than ``retired``) and ``snapshot_id`` hashes which they are, so a freeze writes nothing and
is idempotent across processes, and any put, intent or mark after a freeze changes both (Gym's
relaxed fence: a late write bumps the version, and a ``drop`` of the stale snapshot fails).
A ``drop`` of the exact current snapshot writes the rollout's row, then the ``retired`` event;
the rows stay on the tape (a tape is a record). ``mark_incomplete`` also writes a rollout row,
with ``token_status = "incomplete"``, so every tape reader leaves the rollout out.

Reading: every process keeps one :class:`CaptureIndex` per tape, a tail of the capture rows
other writers committed (log segments and shards, each read once; rows this process's writer
committed go in directly), with tokens for recently used rollouts (bounded; an evicted rollout
is read back from the tape when it is used again). Each put, freeze and resolve first brings the
tail up to date, so a row committed anywhere before the call started is seen.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from .._errors import CaptureConflictError, CaptureRetiredError, TapeError, TapeValueError, WriterClosedError
from ..tape import _wal
from ..tape._layout import CALLS_DIR, SHARD_SUFFIX, WAL_SUFFIX
from ..tape._prompts import common_prefix_len, rebuild_prompts
from ..tape._reader import ListColumn
from ..tape._records import CallRecord, RolloutRecord
from ..tape._schema import CALLS_SCHEMA
from ..tape._shards import READ_ATTEMPTS, ShardCatalog, ShardVanished, writer_of
from ..tape._storage import TapeStorage, fsync_dir, require_posix
from ..tape._writer import TapeWriter

#: Folder of the per-rollout event files (and locks), inside the tape.
CAPTURE_DIR = "capture"
EVENTS_SUFFIX = ".events"
#: How a capture row's ``output_json`` starts (orjson keeps key order): the tail's filter.
MARKER = '{"gym_capture":1,'
TOKEN_KEYS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")
_ID_KEYS = ("rollout_id", "model_call_id")
_COLUMNS = ["call_id", "rollout_id", "call_index", "prefix_len", "prompt_suffix_ids", "prompt_len",
            "generation_ids", "generation_logprobs", "output_json"]
_BEGIN, _INCOMPLETE, _RETIRED = "begin", "incomplete", "retired"
#: Log segments of a capture writer are sealed into shards at this size, so a tail re-reads at
#: most this many rows of a segment that grew (and shards stay large enough to compress well).
SEGMENT_ROWS = 1024
SEGMENT_BYTES = 8 << 20
SEGMENT_SECONDS = 10.0
#: Tokens (prompt suffixes plus generations) the index keeps in memory per process.
DEFAULT_CACHED_TOKENS = 32_000_000


def check_rollout_id(rollout_id: Any) -> str:
    """Gym's rule for rollout ids (``store.validate_rollout_id``): they name files."""
    if not isinstance(rollout_id, str) or not rollout_id or any(
            not (ch.isascii() and (ch.isalnum() or ch in "._-")) for ch in rollout_id):
        raise TapeValueError(f"rollout id {rollout_id!r} may hold only ASCII letters, digits, '.', '_' and '-' "
                             "(NeMo Gym's rule: it names the rollout's capture files)")
    return rollout_id


def canonical(entry: dict[str, Any]) -> bytes:
    """The bytes Gym's reference store writes for an entry (sorted keys): what a re-put compares."""
    return orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)


def call_id_of(rollout_id: str, model_call_id: str) -> str:
    return f"{rollout_id}/{model_call_id}"


# -- rows ------------------------------------------------------------------------------------


@dataclass(slots=True)
class CaptureRow:
    """One capture row as the tape holds it (prompt delta-encoded against the previous row)."""

    call_id: str
    model_call_id: str
    call_index: int
    prefix_len: int
    prompt_len: int
    suffix: np.ndarray
    gen: np.ndarray
    logprobs: np.ndarray
    output_json: str
    writer: str

    def tokens(self) -> int:
        return int(self.suffix.size + self.gen.size)

    def same_as(self, other: CaptureRow) -> bool:
        return (self.call_index == other.call_index and self.output_json == other.output_json
                and self.prompt_len == other.prompt_len and np.array_equal(self.gen, other.gen)
                and np.array_equal(self.logprobs, other.logprobs))


_GENERATIONS = itertools.count()


@dataclass
class RolloutRows:
    """A rollout's capture rows in call order, and what makes the rollout unsafe to train on."""

    rows: list[CaptureRow] = field(default_factory=list)
    by_call: dict[str, CaptureRow] = field(default_factory=dict)
    #: Rows that break a capture rule (two payloads for one call id, two rows at one index):
    #: a writer without working locks. They mask the rollout.
    conflicts: list[str] = field(default_factory=list)
    tokens: int = 0
    #: Changes when rows are rebuilt from the tape or a conflict appears: cursors start again.
    generation: int = field(default_factory=lambda: next(_GENERATIONS))
    _cached: tuple[int, np.ndarray] | None = field(default=None, repr=False)

    def add(self, row: CaptureRow) -> None:
        seen = self.by_call.get(row.model_call_id)
        if seen is not None:
            if not seen.same_as(row):
                self._conflict(row.model_call_id)
            return
        at = len(self.rows)
        while at and self.rows[at - 1].call_index >= row.call_index:
            at -= 1
        if at < len(self.rows) and self.rows[at].call_index == row.call_index:
            self._conflict(row.model_call_id)
            self._conflict(self.rows[at].model_call_id)
            return
        self.rows.insert(at, row)
        if self._cached is not None and self._cached[0] >= at:
            self._cached = None
        self.by_call[row.model_call_id] = row
        self.tokens += row.tokens()

    def _conflict(self, model_call_id: str) -> None:
        self.conflicts.append(model_call_id)
        self.generation = next(_GENERATIONS)

    def prompt(self, at: int) -> np.ndarray:
        """Full prompt of row ``at`` (a position in :attr:`rows`)."""
        r = self.rows[at]
        before = self.context(at - 1) if at else np.empty(0, np.int32)
        return np.concatenate([before[: r.prefix_len], r.suffix])

    def prompts(self) -> list[np.ndarray]:
        """Every row's full prompt."""
        return list(rebuild_prompts([r.prefix_len for r in self.rows], [r.suffix for r in self.rows],
                                    [r.gen for r in self.rows], rollout_id="?"))

    def context(self, upto: int) -> np.ndarray:
        """Prompt + generation of row ``upto`` (a position in :attr:`rows`); the last one asked for
        is kept, so a put after a put costs one step."""
        start, context = 0, np.empty(0, np.int32)
        if self._cached is not None and self._cached[0] <= upto:
            start, context = self._cached[0] + 1, self._cached[1]
        for r in self.rows[start: upto + 1]:
            if r.prefix_len > context.size:
                raise TapeValueError(f"capture row {r.call_id}: prefix_len {r.prefix_len} exceeds the previous "
                                     f"context ({context.size} tokens); a row of this rollout is missing")
            context = np.concatenate([context[: r.prefix_len], r.suffix, r.gen])
        self._cached = (upto, context)
        return context

    def next_index(self) -> int:
        return self.rows[-1].call_index + 1 if self.rows else 0


def rows_of_table(table: pa.Table, writer: str) -> Iterator[tuple[str, CaptureRow]]:
    """``(rollout_id, row)`` for every capture row of a calls table (other rows are skipped)."""
    keep = pc.fill_null(pc.starts_with(table["output_json"], MARKER), False)
    table = table.filter(keep)
    if not table.num_rows:
        return
    suffix = ListColumn(table["prompt_suffix_ids"], np.int32)
    gen = ListColumn(table["generation_ids"], np.int32)
    lps = ListColumn(table["generation_logprobs"], np.float32)
    cols = {c: table[c].to_pylist() for c in ("call_id", "rollout_id", "call_index", "prefix_len", "prompt_len",
                                               "output_json")}
    for i in range(table.num_rows):
        rid, cid = cols["rollout_id"][i], cols["call_id"][i]
        if not cid.startswith(rid + "/"):
            continue
        yield rid, CaptureRow(cid, cid[len(rid) + 1:], cols["call_index"][i], cols["prefix_len"][i],
                              cols["prompt_len"][i], suffix[i].copy(), gen[i].copy(), lps[i].copy(),
                              cols["output_json"][i], writer)


def encode(entry: dict[str, Any], *, strict: bool = False) -> tuple[dict[str, Any], np.ndarray]:
    """The ``entry`` object kept in ``output_json`` and the float32 logprobs for the column.
    ``strict``: the values may be JSON ints (raw JSON, not a TokenEntry), kept as they are."""
    meta = {k: v for k, v in entry.items() if k not in TOKEN_KEYS and k not in _ID_KEYS}
    given = entry["generation_log_probs"]
    lp = np.asarray(given, dtype=np.float64)
    lp32 = lp.astype(np.float32)
    if (strict and not all(type(x) is float for x in given)) or \
            not np.array_equal(lp32.astype(np.float64), lp, equal_nan=True):
        meta["generation_log_probs"] = given  # the column would round them: keep them exactly
    return meta, lp32


def decode(rollout_id: str, row: CaptureRow, full_prompt: np.ndarray) -> dict[str, Any]:
    """The entry dict a row was written from (exactly: same canonical bytes)."""
    wrapper = orjson.loads(row.output_json)
    entry = wrapper["entry"]
    entry["rollout_id"] = rollout_id
    entry["model_call_id"] = row.model_call_id
    entry["prompt_token_ids"] = full_prompt[int(wrapper.get("prompt_skip", 0)):].tolist()
    entry["generation_token_ids"] = row.gen.tolist()
    if "generation_log_probs" not in entry:
        entry["generation_log_probs"] = row.logprobs.astype(np.float64).tolist()
    return entry


_INT32_MAX = int(np.iinfo(np.int32).max)


def _token_ids(values: Any, what: str, where: str, *, strict: bool) -> np.ndarray:
    """Token IDs as int64 (the writer checks their range again when it takes the row)."""
    if not isinstance(values, list) or (strict and not all(type(v) is int for v in values)):
        raise TapeValueError(f"{where}: {what} must be a list of integers")
    try:
        arr = np.asarray(values, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise TapeValueError(f"{where}: {what} must be a list of integers below 2^63") from None
    if strict and arr.size and (arr.min() < 0 or arr.max() > _INT32_MAX):
        raise TapeValueError(f"{where}: {what} holds IDs outside 0..2^31-1, which a tape's int32 token "
                             "columns cannot hold")
    return arr


# -- the index ---------------------------------------------------------------------------------


class CaptureIndex:
    """One process's view of a tape's capture rows: a tail of what other writers committed.

    Thread-safe. ``own`` writer ids are skipped by the tail: their rows are added by
    :meth:`add_own` when they are committed.
    """

    def __init__(self, storage: TapeStorage, *, max_tokens: int = DEFAULT_CACHED_TOKENS) -> None:
        self.storage = storage
        self.catalog = ShardCatalog(storage)
        self.max_tokens = max_tokens
        self.own: set[str] = set()
        self._done: set[str] = set()                        # shards read (or own)
        self._segments: dict[str, tuple[int, int]] = {}     # segment -> (bytes, rows) read
        self._rollouts: OrderedDict[str, RolloutRows] = OrderedDict()
        self._evicted: set[str] = set()
        self._retired: set[str] = set()
        self._tokens = 0
        self._lock = threading.RLock()
        self._refresh_lock = threading.Lock()
        self._tickets = itertools.count()
        self._covered = -1

    def ticket(self) -> int:
        """Take before the point from which rows must be seen; pass to :meth:`refresh`."""
        return next(self._tickets)

    def refresh(self, ticket: int | None = None) -> None:
        """Read what other writers committed, unless a refresh that started after ``ticket`` already did."""
        ticket = self.ticket() if ticket is None else ticket
        with self._refresh_lock:
            if self._covered > ticket:
                return
            start = self.ticket()
            for _ in range(READ_ATTEMPTS):
                try:
                    self._tail()
                    break
                except ShardVanished:  # a compactor or a sealing writer moved rows: list again
                    continue
            else:
                raise TapeError(f"{self.storage.location}: the shards changed under the capture index "
                                f"{READ_ATTEMPTS} times in a row (a compactor deleting shards as they were read); "
                                "try again, or after the compaction")
            self._covered = start

    def _tail(self) -> None:
        log = self.catalog.log_entries(CALLS_DIR)  # the log before the shards (see recorder.tape._shards)
        listing = self.catalog.listing(CALLS_DIR)
        for info in listing.live:
            if info.name in self._done:
                continue
            if writer_of(info.name) in self.own or (info.replaces and all(
                    n in self._done or writer_of(n) in self.own for n in info.replaces)):
                self._done.add(info.name)
                continue
            table = self.catalog.read_shard(info, _COLUMNS)
            # A segment sealed into this shard: its first rows were read already.
            _, seen_rows = self._segments.pop(info.name[: -len(SHARD_SUFFIX)] + WAL_SUFFIX, (0, 0))
            self._ingest(table.slice(seen_rows) if seen_rows else table, info.writer_id)
            self._done.add(info.name)
        for entry in log:
            shard = _wal.shard_name_of(entry.name)
            writer = writer_of(shard)
            if writer in self.own or shard in listing.coverage:
                continue
            size, rows = self._segments.get(entry.name, (0, 0))
            if size == entry.size:
                continue
            try:
                table = _wal.read_segment(self.storage, CALLS_DIR, entry, CALLS_SCHEMA, _COLUMNS).table
            except FileNotFoundError:
                raise ShardVanished(entry.path) from None
            self._ingest(table.slice(rows), writer)
            self._segments[entry.name] = (entry.size, table.num_rows)

    def _ingest(self, table: pa.Table, writer: str) -> None:
        with self._lock:
            for rid, row in rows_of_table(table, writer):
                if rid in self._retired or rid in self._evicted:
                    continue  # an evicted rollout is read back whole when it is used again
                self._add(rid, row)
            self._evict()

    def _add(self, rid: str, row: CaptureRow) -> None:
        rows = self._rollouts.get(rid)
        if rows is None:
            rows = self._rollouts[rid] = RolloutRows()
        before = rows.tokens
        rows.add(row)
        self._tokens += rows.tokens - before

    def add_own(self, rid: str, row: CaptureRow) -> None:
        """A row this process's writer just committed."""
        with self._lock:
            self.rollout(rid)
            self._add(rid, row)
            self._evict(keep=rid)

    def rollout(self, rid: str) -> RolloutRows:
        """The rollout's rows as of the last refresh (read back from the tape if evicted)."""
        with self._lock:
            if rid in self._evicted:
                self._reload(rid)
            rows = self._rollouts.get(rid)
            if rows is None:
                rows = self._rollouts[rid] = RolloutRows()
            self._rollouts.move_to_end(rid)
            return rows

    def _reload(self, rid: str) -> None:
        table = self.catalog.read(CALLS_DIR, _COLUMNS)
        table = table.filter(pc.equal(table["rollout_id"], rid))
        self._evicted.discard(rid)
        rows = RolloutRows()
        for _, row in rows_of_table(table, ""):
            rows.add(row)
        self._rollouts[rid] = rows
        self._tokens += rows.tokens

    def _evict(self, keep: str | None = None) -> None:
        while self._tokens > self.max_tokens and len(self._rollouts) > 1:
            rid = next(iter(self._rollouts))
            if rid == keep:
                self._rollouts.move_to_end(rid)
                rid = next(iter(self._rollouts))
            self._tokens -= self._rollouts.pop(rid).tokens
            self._evicted.add(rid)

    def retire(self, rid: str) -> None:
        with self._lock:
            rows = self._rollouts.pop(rid, None)
            if rows is not None:
                self._tokens -= rows.tokens
            self._evicted.discard(rid)
            self._retired.add(rid)


# -- the per-rollout event file (and lock) ------------------------------------------------------


class _Events:
    """A rollout's event file, held under an exclusive ``flock`` for the ``with`` block."""

    def __init__(self, folder: Path, rollout_id: str) -> None:
        self.folder = folder
        self.path = folder / f"{check_rollout_id(rollout_id)}{EVENTS_SUFFIX}"
        self.fd = -1
        self.raw = b""
        self.events: list[list[Any]] = []

    def __enter__(self) -> _Events:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            data = _read_fd(self.fd)
            if data and not data.endswith(b"\n"):  # a torn append: never acknowledged
                data = data[: data.rfind(b"\n") + 1]
                os.ftruncate(self.fd, len(data))
            self.raw = data
            try:
                self.events = [orjson.loads(line) for line in data.splitlines() if line]
            except orjson.JSONDecodeError as e:
                raise TapeError(f"{self.path} is not a capture event file (a line is not JSON: {e}); move it "
                                "aside to read the rollout's rows without its events") from None
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)  # releases the lock

    def append(self, event: list[Any]) -> None:
        """Append one event and make it durable (the folder too, for the file's first event)."""
        self.extend([event])

    def extend(self, events: list[list[Any]]) -> None:
        """Append events with one fsync."""
        line = b"".join(orjson.dumps(e) + b"\n" for e in events)
        first = not self.raw
        try:
            _write_all(self.fd, line)
            os.fsync(self.fd)
            if first:
                fsync_dir(self.folder)
        except OSError:
            try:
                os.ftruncate(self.fd, len(self.raw))
            except OSError:
                pass
            raise
        self.raw += line
        self.events.extend(events)

    def retired(self) -> list[Any] | None:
        return next((e for e in self.events if e[0] == _RETIRED), None)

    def live(self) -> list[list[Any]]:
        return [e for e in self.events if e[0] != _RETIRED]


def _read_fd(fd: int) -> bytes:
    chunks, offset = [], 0
    while True:
        chunk = os.pread(fd, 1 << 16, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- snapshots ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A rollout's capture as of one moment: entry dicts, incompleteness, identity."""

    rollout_id: str
    entries: tuple[dict[str, Any], ...]
    incomplete: bool
    snapshot_id: str
    version: int
    reasons: tuple[str, ...] = ()


def _state_of(rid: str, rows: RolloutRows, events: _Events) -> tuple[str, int, list[str]]:
    live = events.live()
    h = hashlib.blake2b(digest_size=16)
    h.update(rid.encode() + b"\0")
    for r in rows.rows:
        h.update(f"{r.call_index}:{r.call_id}\n".encode())
    h.update(b"\0")
    for e in live:
        h.update(orjson.dumps(e) + b"\n")
    version = len(rows.rows) + len(rows.conflicts) + len(live)
    intents = [e[1] for e in live if e[0] == _BEGIN]
    reasons = [f"call {e[1] or '?'} marked incomplete" for e in live if e[0] == _INCOMPLETE]
    reasons += [f"call {c} began but has no entry" for c in dict.fromkeys(intents) if c not in rows.by_call]
    reasons += [f"call {c} has conflicting payloads" for c in rows.conflicts]
    return h.hexdigest(), version, reasons


# -- the capture tape --------------------------------------------------------------------------

#: Most puts the adder takes at once.
BATCH_PUTS = 256


@dataclass
class _Put:
    entry: dict[str, Any]
    rid: str
    mcid: str
    digest: Callable[[list[int]], str] | None
    future: Future[bool] = field(default_factory=Future)

    @classmethod
    def of(cls, entry: dict[str, Any], digest: Callable[[list[int]], str] | None) -> _Put:
        rid = check_rollout_id(entry.get("rollout_id"))
        mcid = entry.get("model_call_id")
        if not isinstance(mcid, str) or not mcid:
            raise TapeValueError(f"rollout {rid}: an entry's model_call_id must be a non-empty string, got {mcid!r}")
        return cls(entry, rid, mcid, digest)



class CaptureTape:
    """Gym token capture on one tape: put, intents, marks, freeze and drop, on JSON dicts.

    Thread-safe; any number of processes may open one tape. ``writer_kw`` are extra arguments
    of the :class:`~recorder.TapeWriter` made on the first write.
    """

    def __init__(self, tape: str | os.PathLike[str], *, max_cached_tokens: int = DEFAULT_CACHED_TOKENS,
                 writer_kw: dict[str, Any] | None = None) -> None:
        self.path = require_posix(tape, "NeMo Gym token capture")
        self.storage = TapeStorage(self.path)
        self.folder = Path(self.storage.root) / CAPTURE_DIR
        self.index = CaptureIndex(self.storage, max_tokens=max_cached_tokens)
        self._writer_kw = writer_kw or {}
        self._writer: TapeWriter | None = None
        self._writer_lock = threading.Lock()
        #: Per rollout, the call id of the last row our writer added (its delta context).
        self._writer_last: dict[str, str] = {}
        self._queue: list[_Put] = []
        self._queue_cond = threading.Condition()
        self._in_flight: set[str] = set()
        self._pending: list[tuple[list[_Put], dict[int, Any], list[Any], ExitStack]] = []
        self._threads: list[threading.Thread] = []
        self._stopping = self._sync_stop = False
        self.closed = False

    # -- writing -----------------------------------------------------------------------------

    def writer(self) -> TapeWriter:
        with self._writer_lock:
            if self._writer is None:
                kw = {"created_by": "gymtape capture (NeMo Gym token capture)", "flush_rows": SEGMENT_ROWS,
                      "flush_bytes": SEGMENT_BYTES, "flush_seconds": SEGMENT_SECONDS, "handle_signals": False,
                      **self._writer_kw}
                self._writer = TapeWriter(self.path, durable=True, **kw)
                self.index.own.add(self._writer.writer_id)
            return self._writer

    def put(self, entry: dict[str, Any], *, digest: Callable[[list[int]], str] | None = None) -> bool:
        """Store one entry durably; False when the identical entry is already there.

        A delta entry's rebuilt tokens are checked against its ``cum_len``, and against its
        ``digest`` with ``digest`` (Gym's ``compute_digest``; ingest passes it). Raises
        :class:`CaptureConflictError` for another payload under a recorded
        call id, :class:`CaptureRetiredError` after a drop, :class:`TapeWriteError` when the
        row could not be made durable.
        """
        (result,) = self._put_batch([_Put.of(entry, digest)])
        if isinstance(result, BaseException):
            raise result
        return result

    def submit(self, entry: dict[str, Any], *, digest: Callable[[list[int]], str] | None = None) -> Future[bool]:
        """:meth:`put` in the background: concurrent puts (of different rollouts) share commits.

        Two threads do the work: the *adder* locks the rollouts of the queued puts, checks them
        and adds their rows to the writer; the *syncer* commits whatever has been added (one fsync
        for all of it), then answers those puts and unlocks their rollouts. The adder fills the
        next commit while the syncer waits for the disk, so the disk is never idle while puts wait.
        """
        item = _Put.of(entry, digest)
        with self._queue_cond:
            if self.closed:
                raise WriterClosedError(f"the capture of {self.path} is closed")
            self._queue.append(item)
            if not self._threads:
                for name, loop in (("add", self._add_loop), ("sync", self._sync_loop)):
                    t = threading.Thread(target=loop, name=f"gymtape-capture-{name}", daemon=True)
                    self._threads.append(t)
                    t.start()
            self._queue_cond.notify_all()
        return item.future

    def _add_loop(self) -> None:
        """The adder. Never dies: an unexpected error fails that batch's puts."""
        while True:
            with self._queue_cond:
                while not self._take_ready() and not (self._stopping and not self._queue):
                    self._queue_cond.wait()
                if self._stopping and not self._queue:
                    self._sync_stop = True
                    self._queue_cond.notify_all()
                    return
                batch = self._take_ready(take=True)
            held = ExitStack()
            try:
                results, added = self._prepare(batch, held)
            except BaseException as e:  # noqa: BLE001 - reported on every future of the batch
                held.close()
                self._finish(batch, {i: e for i in range(len(batch))})
                continue
            done = {i: r for i, r in results.items()}
            if not added:
                held.close()
                self._finish(batch, done)
                continue
            with self._queue_cond:
                self._pending.append((batch, done, added, held))
                self._queue_cond.notify_all()

    def _take_ready(self, take: bool = False) -> list[_Put]:
        """Queued puts of rollouts with no put in flight (one each, in queue order). Holds the lock."""
        batch, rest, taken = [], [], set(self._in_flight)
        for item in self._queue:
            if item.rid in taken or len(batch) >= BATCH_PUTS:
                rest.append(item)
            else:
                taken.add(item.rid)
                batch.append(item)
        if take:
            self._queue = rest
            self._in_flight |= {item.rid for item in batch}
        return batch

    def _sync_loop(self) -> None:
        """The syncer: commit what the adder added, answer those puts. Never dies."""
        while True:
            with self._queue_cond:
                while not self._pending and not self._sync_stop:
                    self._queue_cond.wait()
                if not self._pending:
                    return
                groups, self._pending = self._pending, []
            try:
                self._commit_groups(groups)
            except BaseException as e:  # noqa: BLE001 - reported on every future of these groups
                for batch, done, added, held in groups:
                    held.close()
                    self._finish(batch, {**done, **{i: e for i, _, _ in added}})

    def _commit_groups(self, groups: list[tuple[list[_Put], dict[int, Any], list[Any], ExitStack]]) -> None:
        error: BaseException | None = None
        try:
            self.writer().commit()
        except Exception as e:  # noqa: BLE001 - none of these rows is recorded
            error = e
        for batch, done, added, held in groups:
            for i, item, row in added:
                if error is None:
                    self._committed(item.rid, row)
                done[i] = True if error is None else error
            held.close()
            self._finish(batch, done)

    def _finish(self, batch: list[_Put], results: dict[int, Any]) -> None:
        with self._queue_cond:
            self._in_flight -= {item.rid for item in batch}
            self._queue_cond.notify_all()
        for i, item in enumerate(batch):
            result = results[i]
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _put_batch(self, batch: list[_Put]) -> list[bool | BaseException]:
        """Put entries of distinct rollouts now, with one commit."""
        with ExitStack() as held:
            results, added = self._prepare(batch, held)
            if added:
                try:
                    self.writer().commit()
                except Exception as e:  # noqa: BLE001 - none of the added rows is recorded
                    results.update({i: e for i, _, _ in added})
                else:
                    for i, item, row in added:
                        self._committed(item.rid, row)
                        results[i] = True
        return [results[i] for i in range(len(batch))]

    def _prepare(self, batch: list[_Put], held: ExitStack) -> tuple[dict[int, Any], list[tuple[int, _Put, CaptureRow]]]:
        """Lock the batch's rollouts (in name order, so two processes never wait for each other in
        a circle; the locks go with ``held``), check each put, and add the rows of the new entries
        to the writer. Returns the answers known already and the rows added (not committed)."""
        results: dict[int, Any] = {}
        added: list[tuple[int, _Put, CaptureRow]] = []
        order = sorted(range(len(batch)), key=lambda i: batch[i].rid)
        events = {}
        for i in order:
            try:
                events[i] = held.enter_context(_Events(self.folder, batch[i].rid))
            except Exception as e:  # noqa: BLE001 - this put fails; the others go on
                results[i] = e
        self.index.refresh(self.index.ticket())
        for i in order:
            if i in results:
                continue
            item = batch[i]
            try:
                if events[i].retired() is not None:
                    raise CaptureRetiredError(f"rollout {item.rid} was retired (dropped); a put for call "
                                              f"{item.mcid} cannot land. Use a new (attempt-scoped) rollout id")
                rows = self.index.rollout(item.rid)
                if item.mcid in rows.by_call:
                    if self._canonical_of(item.rid, rows, rows.by_call[item.mcid]) != canonical(item.entry):
                        raise CaptureConflictError(
                            f"rollout {item.rid}: call {item.mcid} is already recorded with another payload; a "
                            "retry must resend the identical entry (a rebuilt entry is a conflict, not a retry)")
                    results[i] = False
                    continue
                added.append((i, item, self._add(self.writer(), item.rid, rows, item.entry, digest=item.digest,
                                                 strict=False)))
            except Exception as e:  # noqa: BLE001 - this put fails; the others go on
                results[i] = e
        return results, added

    def _add(self, writer: TapeWriter, rid: str, rows: RolloutRows, entry: dict[str, Any], *,
             digest: Callable[[list[int]], str] | None, strict: bool) -> CaptureRow:
        """Add the entry's row to ``writer`` (not committed) and return it as the index will hold it."""
        mcid = entry["model_call_id"]
        where = f"rollout {rid} call {mcid}"
        prompt = _token_ids(entry.get("prompt_token_ids"), "prompt_token_ids", where, strict=strict)
        gen = _token_ids(entry.get("generation_token_ids"), "generation_token_ids", where, strict=strict)
        lps = entry.get("generation_log_probs")
        if not isinstance(lps, list) or len(lps) != gen.size:
            raise TapeValueError(f"{where}: generation_log_probs must be a list as long as generation_token_ids")
        meta, lp32 = encode(entry, strict=strict)
        skip = 0
        with self.index._lock:
            index = rows.next_index()
            last = rows.rows[-1] if rows.rows else None
            context = rows.context(len(rows.rows) - 1) if last is not None else np.empty(0, np.int32)
            parent = rows.by_call.get(entry.get("parent_call_id") or "") if entry.get("prompt_is_delta") else None
            parent_context = rows.context(rows.rows.index(parent)) if parent is not None else None
        if entry.get("prompt_is_delta"):
            if parent_context is None:
                raise TapeValueError(f"{where}: a delta prompt needs its parent {entry.get('parent_call_id')!r} "
                                     "on the tape, and it is not there")
            skip = int(parent_context.size)
            prompt = np.concatenate([parent_context, prompt])
            cum_len = entry.get("cum_len")
            if (isinstance(cum_len, int) and cum_len != prompt.size + gen.size) or (
                    digest is not None and entry.get("digest")
                    and digest(np.concatenate([prompt, gen]).tolist()) != entry["digest"]):
                raise TapeValueError(f"{where}: the parent's tokens plus the delta prompt do not match the "
                                     "entry's cum_len/digest; the entry does not continue its recorded parent")
        wrapper: dict[str, Any] = {"gym_capture": 1, "entry": meta}
        if skip:
            wrapper["prompt_skip"] = skip
        output_json = orjson.dumps(wrapper).decode()
        if self._writer_last.get(rid) != (last.call_id if last is not None else None):
            _continue_from(writer, rid, context if last is not None else None)
        call_id = call_id_of(rid, mcid)
        # started_at stays null: the entry's created_at (in output_json) is the exact time, and
        # converting it costs more than the rest of the row
        writer.add_call(CallRecord(
            rollout_id=rid, call_index=index, call_id=call_id, prompt_ids=prompt, generation_ids=gen,
            generation_logprobs=lp32, model=meta.get("model") or None,
            output=wrapper))  # the writer dumps it as orjson does: exactly output_json
        prompt, gen = prompt.astype(np.int32), gen.astype(np.int32)  # in range: the writer took them
        prefix = common_prefix_len(context, prompt)
        return CaptureRow(call_id, mcid, index, prefix, int(prompt.size), prompt[prefix:].copy(), gen, lp32,
                          output_json, writer.writer_id)

    def _committed(self, rid: str, row: CaptureRow) -> None:
        self._writer_last[rid] = row.call_id
        self.index.add_own(rid, row)

    def _canonical_of(self, rid: str, rows: RolloutRows, row: CaptureRow) -> bytes:
        at = rows.rows.index(row)
        return canonical(decode(rid, row, rows.prompts()[at]))

    def begin(self, rollout_id: str, model_call_id: str) -> None:
        """Durably record that a call is about to be dispatched (Gym's ``begin_call``)."""
        with _Events(self.folder, rollout_id) as events:
            if events.retired() is not None:
                raise CaptureRetiredError(f"rollout {rollout_id} was retired (dropped); call {model_call_id} "
                                          "cannot begin. Use a new (attempt-scoped) rollout id")
            events.append([_BEGIN, model_call_id])

    def mark_incomplete(self, rollout_id: str, model_call_id: str = "") -> None:
        """Durably record that a call of the rollout failed to capture (masks the rollout).

        The event is the record (it needs no log write, so it lands when a put could not). Then,
        as far as the tape can take it, a rollout row with ``token_status = "incomplete"`` tells
        every tape reader (check, inspect, TapeDataset, the follower) to leave the rollout out.
        """
        with _Events(self.folder, rollout_id) as events:
            if events.retired() is not None:
                raise CaptureRetiredError(f"rollout {rollout_id} was retired (dropped) before call "
                                          f"{model_call_id or '?'} was marked incomplete")
            events.append([_INCOMPLETE, model_call_id])
            try:
                self.index.refresh(self.index.ticket())
                rows = self.index.rollout(rollout_id)
                _, _, reasons = _state_of(rollout_id, rows, events)
                writer = self.writer()
                writer.add_rollout(_rollout_row(rollout_id, rows, reasons))
                self._writer_last.pop(rollout_id, None)  # a rollout row ends the writer's delta memory
                writer.commit()
            except Exception as e:  # noqa: BLE001 - the event above is what Gym's contract needs
                print(f"gymtape: {self.path}: rollout {rollout_id} is marked incomplete in {events.path.name}, "
                      f"but its rollout row could not be written ({type(e).__name__}: {e})", file=sys.stderr)

    # -- reading -----------------------------------------------------------------------------

    def freeze(self, rollout_id: str) -> Snapshot:
        """The rollout's entries and state, atomically (writes nothing)."""
        with _Events(self.folder, rollout_id) as events:
            retired = events.retired()
            if retired is not None:
                raise CaptureRetiredError(f"rollout {rollout_id} was retired (dropped, snapshot {retired[1]}); "
                                          "its rows stay on the tape: read them with recorder.Tape")
            self.index.refresh(self.index.ticket())
            with self.index._lock:
                rows = self.index.rollout(rollout_id)
                snapshot_id, version, reasons = _state_of(rollout_id, rows, events)
                entries = tuple(decode(rollout_id, r, p) for r, p in zip(rows.rows, rows.prompts()))
        return Snapshot(rollout_id, entries, bool(reasons), snapshot_id, version, tuple(reasons))

    def entries_since(self, rollout_id: str, cursor: tuple[int, int] | None) -> \
            tuple[tuple[int, int], list[tuple[int, dict[str, Any]]]] | None:
        """Entries committed since ``cursor`` as ``(call_index, entry)``, and the new cursor; None
        when the cursor no longer fits (rows rebuilt, or a conflict: start again). Rows with
        conflicting payloads are left out (Gym: zero candidates). Takes no rollout lock: rows
        only grow, and a row is visible once committed."""
        check_rollout_id(rollout_id)
        self.index.refresh(self.index.ticket())
        with self.index._lock:
            rows = self.index.rollout(rollout_id)
            generation, done = cursor if cursor is not None else (rows.generation, 0)
            if generation != rows.generation or done > len(rows.rows):
                return None
            bad = set(rows.conflicts)
            out = [(r.call_index, decode(rollout_id, r, rows.prompt(i)))
                   for i, r in enumerate(rows.rows) if i >= done and r.model_call_id not in bad]
            return (rows.generation, len(rows.rows)), out

    def entries_at(self, rollout_id: str, call_indexes: list[int]) -> list[dict[str, Any]]:
        """The entries at these call indexes (for a resolved parent's tokens)."""
        with self.index._lock:
            rows = self.index.rollout(check_rollout_id(rollout_id))
            at = {r.call_index: i for i, r in enumerate(rows.rows)}
            missing = [k for k in call_indexes if k not in at]
            if missing:
                raise TapeValueError(f"rollout {rollout_id}: no capture rows at call indexes {missing}")
            return [decode(rollout_id, rows.rows[at[k]], rows.prompt(at[k])) for k in call_indexes]

    def drop(self, rollout_id: str, *, snapshot_id: str, version: int) -> bool:
        """Retire the exact snapshot (False when the rollout changed since): write its rollout row,
        then the ``retired`` event. Dropping the retired snapshot again is True."""
        with _Events(self.folder, rollout_id) as events:
            retired = events.retired()
            if retired is not None:
                return retired[1] == snapshot_id and retired[2] == version
            self.index.refresh(self.index.ticket())
            rows = self.index.rollout(rollout_id)
            current, now, reasons = _state_of(rollout_id, rows, events)
            if (current, now) != (snapshot_id, version):
                return False
            writer = self.writer()
            writer.add_rollout(_rollout_row(rollout_id, rows, reasons, snapshot_id=snapshot_id, version=version))
            writer.commit()
            events.append([_RETIRED, snapshot_id, version])
            self._writer_last.pop(rollout_id, None)
            self.index.retire(rollout_id)
        return True

    def close(self) -> None:
        """Finish the submitted puts, then seal the writer's log into shards (every answered put
        was durable already). Idempotent."""
        with self._queue_cond:
            self._stopping = True
            self.closed = True
            self._queue_cond.notify_all()
        for t in self._threads:
            t.join()
        with self._writer_lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()


def _rollout_row(rid: str, rows: RolloutRows, reasons: list[str], **snapshot: Any) -> RolloutRecord:
    """The tape's rollout row for a captured rollout: on a drop (``snapshot``), or when it was
    marked incomplete. ``token_status`` is ``incomplete`` when anything masks it."""
    nonempty = sum(1 for r in rows.rows if r.prompt_len or r.gen.size)
    token_status = "incomplete" if reasons else "missing" if not rows.rows else \
        "ok" if nonempty == len(rows.rows) else "empty" if nonempty == 0 else "partial"
    extras: dict[str, Any] = dict(snapshot)
    if reasons:
        extras["incomplete"] = reasons
    return RolloutRecord(
        rollout_id=rid, status="ok", token_status=token_status, num_calls=len(rows.rows),
        prompt_tokens=sum(r.prompt_len for r in rows.rows), generation_tokens=sum(int(r.gen.size) for r in rows.rows),
        min_policy_version=0 if rows.rows else None, max_policy_version=0 if rows.rows else None,
        extras={"gym_capture": extras}, source="nemo gym token capture")


def _continue_from(writer: TapeWriter, rollout_id: str, context: np.ndarray | None) -> None:
    """Make ``writer`` delta-encode the rollout's next call against ``context`` (the previous row's
    prompt + generation, whoever wrote it), or store it whole (None): a row's prompt is stored
    against the previous row of its rollout, which another process may have written."""
    writer.continue_from(rollout_id, context)


# -- one CaptureTape per tape and process --------------------------------------------------------

_SHARED: dict[str, tuple[CaptureTape, int]] = {}
_SHARED_LOCK = threading.Lock()


def acquire(tape: str | os.PathLike[str], *, share: bool = True, **kw: Any) -> CaptureTape:
    """The process's CaptureTape for ``tape`` (one writer, one index), or a private one."""
    if not share:
        return CaptureTape(tape, **kw)
    key = os.path.realpath(os.fspath(tape))
    with _SHARED_LOCK:
        core, refs = _SHARED.get(key, (None, 0))
        if core is None or core.closed:
            core, refs = CaptureTape(tape, **kw), 0
        _SHARED[key] = (core, refs + 1)
        return core


def release(core: CaptureTape) -> None:
    """Give back what :func:`acquire` gave; the last holder closes it."""
    with _SHARED_LOCK:
        for key, (shared, refs) in list(_SHARED.items()):
            if shared is core:
                if refs > 1:
                    _SHARED[key] = (core, refs - 1)
                    return
                del _SHARED[key]
                break
    core.close()

