"""Recording for `gymtape serve`: which rollout a call belongs to, and writing it off the hot path.

Grouping follows the message-level token IDs: a request whose last assistant message carries
the (prompt, generation) IDs of an earlier call continues that call's rollout; anything else
starts a new rollout. The IDs are the join key, so no client cooperation (session headers,
ids) is needed and a client that rewrote history still lands in the right rollout.

A call is answered only once it is on the tape: the request hands its row to one committer
thread and awaits it. The committer adds every row that arrived meanwhile to a durable
:class:`~recorder.TapeWriter` and commits them together (one fsync for the group), so the
write-ahead log holds an answered call before the answer leaves. When the row cannot be written
(a value that does not fit, a full disk) the request fails with :class:`RecordingError` (a 503
to the client) and nothing of it is on the tape; the failure is counted for ``/health`` and the
next commit tries again. The committer thread catches everything: it cannot die.

The hot path is short on purpose (every step of it is paid by every call at concurrency 1,
and on a busy machine each thread hand-off waits for a core): the event loop queues the row
and awaits; the committer thread adds the group, makes it durable with one ``fdatasync``,
writes the calls' index entries, and settles the group's futures with one wake-up per event
loop. Sealing log segments into shards and settling claims happen after the answers went out.

With a tape, rollout assignment is resolved on the tape, not in this process's memory, so
several replicas can capture into one tape and a continuation may arrive at any of them: each
recorded call's key goes to this writer's file of the tape's call-key index
(``recorder.tape._keys``) once its row is durable, before it is answered; the log batch carries
the same entries, so on a local disk the index needs no fsync of its own (see ``_keys``). A
continuation claims the recorded call it continues with a no-clobber file
(``recorder.tape._claims``), so identical greedy calls are continued once each, oldest first,
whichever replica recorded them. A replica continuing another's rollout has no delta state for
it and stores the call's full prompt.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .._errors import TapeValueError
from ..tape._claims import CallClaims, Claim
from ..tape._keys import KeyEntry, KeyIndex, KeyLog, call_key, encode, now_ns
from ..tape._meta import TokenizerIdentity
from ..tape._records import CallRecord
from ..tape._writer import TapeWriter
from ._sched import ask_for_short_slice

_STOP = object()


class RecordingError(Exception):
    """The call was not recorded (it was not acknowledged either): answered 503."""


__all__ = ["CallLog", "RecordingError", "call_key"]


class CallLog:
    """Assigns calls to rollouts and hands finished calls to a background tape writer."""

    def __init__(self, tape: Path | None, *, tokenizer: TokenizerIdentity | None = None,
                 writer_id: str | None = None, max_tracked: int = 65_536, flush_seconds: float = 60.0) -> None:
        # key -> calls with these exact IDs not yet continued (FIFO), and the latest of them;
        # a list, not a deque: nearly every key is seen once, and a deque costs ~600 B more
        self._known: OrderedDict[bytes, tuple[list[tuple[str, int, int]], tuple[str, int, int]]] = OrderedDict()
        self._max = max_tracked
        self._lock = threading.Lock()
        #: Calls that could not be recorded (each answered 503), and the last reason.
        self.errors = 0
        self.last_error: str | None = None
        #: False from a failed write until the next successful commit.
        self.ok = True
        self.recorded = 0
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.writer: TapeWriter | None = None
        self._thread: threading.Thread | None = None
        if tape is not None:
            # flush_seconds: how old a log segment gets before it is sealed into a shard; the
            # rows are durable from their commit on, so this only sets the shards' size.
            self.writer = TapeWriter(tape, writer_id=writer_id, tokenizer=tokenizer, created_by="gymtape serve",
                                     flush_seconds=flush_seconds, flush_rows=4096, handle_signals=False, durable=True)
        # The tape-side call-key index and claims (None without a tape: assignment in memory).
        self.keys: KeyLog | None = None
        self.index: KeyIndex | None = None
        self.claims: CallClaims | None = None
        self._claimed: dict[tuple[str, int], Claim] = {}  # (rollout, new call index) -> its claim
        self._written: OrderedDict[str, int] = OrderedDict()  # rollout -> last call index this writer wrote
        if self.writer is not None:
            assert self.writer.path is not None
            self.keys = KeyLog(self.writer.path, self.writer.writer_id)
            self.index = KeyIndex(self.writer.path, own=self.writer.writer_id, max_keys=4 * max_tracked)
            self.claims = CallClaims(self.writer.path, self.index)
            self.index.refresh()  # the calls other replicas recorded before this one started
            # entries of rows still in the log are in their batches too; sealed rows' are synced
            self.writer.before_seal = self.keys.sync
            self._settle_pool = ThreadPoolExecutor(1, thread_name_prefix="gymtape-claims")
            self._thread = threading.Thread(target=self._commit_loop, name="gymtape-recorder", daemon=True)
            self._thread.start()

    def assign(self, anchor: tuple[Sequence[int], Sequence[int]] | None) -> tuple[str, int]:
        """(rollout id, call index) for a request whose spliced-in message is ``anchor``.

        Identical calls in several rollouts (greedy repeats of one task) share a key; each
        continuation takes the oldest one not yet continued, so concurrent repeats stay apart.
        A second continuation of the same call (a client retry, a branch) reuses the latest.
        With a tape this holds across every process capturing into it (:class:`CallClaims`).
        """
        if anchor is not None and self.claims is not None:
            claim = self.claims.continue_call(call_key(*anchor))
            if claim is not None:
                if claim.path is not None:
                    with self._lock:
                        self._claimed[(claim.rollout_id, claim.call_index + 1)] = claim
                return claim.rollout_id, claim.call_index + 1
        elif anchor is not None:
            with self._lock:
                entry = self._known.get(call_key(*anchor))
                hit = (entry[0].pop(0) if entry[0] else entry[1]) if entry is not None else None
            if hit is not None:
                return hit[0], hit[1] + 1
        return uuid.uuid4().hex, 0

    def remember(self, prompt_ids: Sequence[int], generation_ids: Sequence[int], rollout_id: str, call_index: int,
                 policy_version: int = 0) -> None:
        """Track a call for continuations (without a tape; with one, :meth:`record` indexed it)."""
        if self.index is not None:
            return
        key = call_key(prompt_ids, generation_ids)
        call = (rollout_id, call_index, policy_version)
        with self._lock:
            entry = self._known.get(key)
            free = entry[0] if entry is not None else []
            free.append(call)
            self._known[key] = (free, call)
            self._known.move_to_end(key)
            if len(self._known) > self._max:
                self._known.popitem(last=False)

    def lookup(self, prompt_ids: Sequence[int], generation_ids: Sequence[int]) -> tuple[str, int, int] | None:
        """(rollout id, call index, policy version) of a recorded call (with a tape: any replica's;
        the most recent of identical ones), if still tracked."""
        if self.index is not None:
            key = call_key(prompt_ids, generation_ids)
            hits = self.index.candidates(key)
            if not hits:
                self.index.refresh()
                hits = self.index.candidates(key)
            return (hits[-1].rollout_id, hits[-1].call_index, hits[-1].policy_version) if hits else None
        with self._lock:
            entry = self._known.get(call_key(prompt_ids, generation_ids))
            return entry[1] if entry is not None else None

    def lookup_calls(self, calls: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[str, int, int] | None]:
        """Per call, the recorded call it is: with a tape, the calls of one recorded rollout in
        order when there is one (preferring one no agent rollout joined yet), else each call's
        most recent match."""
        if self.claims is not None and calls:
            chain = self.claims.find([call_key(p, g) for p, g in calls])
            if chain is not None:
                return [(chain.rollout_id, e.call_index, e.policy_version) for e in chain.calls]
        return [self.lookup(p, g) for p, g in calls]

    def unassign(self, anchor: tuple[Sequence[int], Sequence[int]] | None, rollout_id: str, call_index: int) -> None:
        """Give back a continuation :meth:`assign` handed out for a call that was not recorded,
        so the client's retry continues the same call."""
        if anchor is None or call_index == 0:
            return
        if self.claims is not None:
            with self._lock:
                claim = self._claimed.pop((rollout_id, call_index), None)
            if claim is not None:
                self.claims.release(claim)
            return
        with self._lock:
            entry = self._known.get(call_key(*anchor))
            if entry is not None and all(c[0] != rollout_id for c in entry[0]):
                entry[0].insert(0, (rollout_id, call_index - 1, entry[1][2]))

    async def record(self, record: CallRecord) -> None:
        """Return once the call is durable on the tape; :class:`RecordingError` if it cannot be."""
        await self.submit(record)

    def submit(self, record: CallRecord) -> asyncio.Future[None]:
        """Hand the call to the committer now; the future is done once it is durable (or fails
        with :class:`RecordingError`). The caller does other work meanwhile and awaits it before
        answering. Call from the event loop."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if self.writer is None:
            done.set_result(None)
        else:
            self._queue.put((record, done, loop))
        return done

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _commit_loop(self) -> None:
        """Group commit: take every queued call, add them, one commit, answer them all."""
        assert self.writer is not None
        ask_for_short_slice()
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            group = [first]
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)
                    break
                group.append(nxt)
            try:
                self._commit_group(group)
            except BaseException as e:  # never die: fail what is left of the group and go on
                _settle_all([(loop, done) for _, done, loop in group],  # type: ignore[misc]
                            RecordingError(f"internal error while recording: {e!r}"))
                self._note_failure(f"internal error while recording: {e!r}")

    def _commit_group(self, group: list) -> None:
        assert self.writer is not None
        added = []
        entries: list[tuple[bytes, KeyEntry]] = []
        notes: list[bytes] = []
        for record, done, loop in group:
            try:
                entry, note = None, None
                if self.keys is not None:
                    entry = (call_key(record.prompt_ids, record.generation_ids),
                             KeyEntry(now_ns(), record.rollout_id, record.call_index, record.policy_version))
                    note = encode([entry])  # checks the rollout id before anything is added
                self._fresh_delta(record.rollout_id, record.call_index)
                self.writer.add_call(record, log_note=note)
                added.append((done, loop))
                if entry is not None and note is not None:
                    entries.append(entry)
                    notes.append(note)
            except TapeValueError as e:  # this call's value cannot be stored: only it fails
                self._note_failure(str(e))
                _settle_all([(loop, done)], RecordingError(f"the call could not be recorded: {e}"))
        if not added:
            return
        indexed: list[BaseException] = []

        def index() -> None:  # the rows are durable; no segment of theirs is sealed before this returns
            if self.keys is None:
                return
            try:
                self.keys.append(b"".join(notes))
            except OSError as e:
                indexed.append(e)

        try:
            self.writer.commit(then=index, seal=False)
        except Exception as e:
            self._note_failure(str(e), count=len(added))
            _settle_all([(loop, done) for done, loop in added], RecordingError(f"the call could not be recorded: {e}"))
            return
        if indexed:
            # On the tape but not findable by other replicas or the recorder: not acknowledged.
            message = f"the call could not be added to the tape's call-key index: {indexed[0]}"
            self._note_failure(message, count=len(added))
            _settle_all([(loop, done) for done, loop in added], RecordingError(message))
            return
        if self.index is not None:
            self.index.add_local(entries)
        self.recorded += len(added)
        self.ok = True
        _settle_all([(loop, done) for done, loop in added], None)
        # answered: now what can wait
        if self.claims is not None:  # the continuations are in the index now: their claim files can go
            with self._lock:
                settled = [c for c in (self._claimed.pop((e.rollout_id, e.call_index), None) for _, e in entries) if c]
            if settled:
                self._settle_pool.submit(self.claims.settle, settled)
        self.writer.seal_due()

    def _fresh_delta(self, rollout_id: str, call_index: int) -> None:
        """Store the call's full prompt unless this writer wrote the rollout's previous call:
        the previous call may be another replica's (or this one a branch), and a prompt is
        delta-encoded against the call before it on the tape, not against this writer's last."""
        if self.keys is None or self.writer is None:
            return
        if call_index > 0 and self._written.get(rollout_id) != call_index - 1:
            self.writer.continue_from(rollout_id, None)
        self._written[rollout_id] = call_index
        self._written.move_to_end(rollout_id)
        if len(self._written) > self._max:
            self._written.popitem(last=False)

    def _note_failure(self, message: str, count: int = 1) -> None:
        self.errors += count
        self.last_error = message
        self.ok = False
        print(f"gymtape serve: {message}", file=sys.stderr)

    def close(self) -> None:
        """Record everything queued, then close the tape writer (seals its log, publishes its manifest)."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
        if self.keys is not None:
            self._settle_pool.shutdown(wait=True)
        if self.writer is not None:
            self.writer.close()  # seals its segments: syncs the index file first (before_seal)
        if self.keys is not None:
            self.keys.close()


def _settle_all(waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]], error: RecordingError | None) -> None:
    """Answer every future of a group: one wake-up per event loop (nearly always one), not per call."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
    for loop, done in waiting:
        by_loop.setdefault(loop, []).append(done)
    for loop, futures in by_loop.items():
        def settle(futures: list[asyncio.Future] = futures) -> None:
            for done in futures:
                if not done.done():
                    if error is None:
                        done.set_result(None)
                    else:  # one exception object per waiting request (each gets its own traceback)
                        done.set_exception(RecordingError(*error.args))
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
