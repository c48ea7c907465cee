"""Recording for `gymtape serve`: which rollout a call belongs to, and writing it off the hot path.

Grouping follows the message-level token IDs: a request whose last assistant message carries
the (prompt, generation) IDs of an earlier call continues that call's rollout; anything else
starts a new rollout. The IDs are the join key, so no client cooperation (session headers,
ids) is needed and a client that rewrote history still lands in the right rollout.

Rows go through a queue to one writer thread, so a response never waits on Parquet or disk.
"""

from __future__ import annotations

import hashlib
import queue
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..tape._meta import TokenizerIdentity
from ..tape._records import CallRecord
from ..tape._writer import TapeWriter

_STOP = object()


def call_key(prompt_ids: Sequence[int], generation_ids: Sequence[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(prompt_ids, dtype=np.int32).tobytes())
    h.update(b"|")
    h.update(np.asarray(generation_ids, dtype=np.int32).tobytes())
    return h.digest()


class CallLog:
    """Assigns calls to rollouts and hands finished calls to a background tape writer."""

    def __init__(self, tape: Path | None, *, tokenizer: TokenizerIdentity | None = None,
                 writer_id: str | None = None, max_tracked: int = 65_536, flush_seconds: float = 5.0) -> None:
        # key -> calls with these exact IDs not yet continued (FIFO), and the latest of them;
        # a list, not a deque: nearly every key is seen once, and a deque costs ~600 B more
        self._known: OrderedDict[bytes, tuple[list[tuple[str, int, int]], tuple[str, int, int]]] = OrderedDict()
        self._max = max_tracked
        self._lock = threading.Lock()
        self.errors = 0
        self.recorded = 0
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.writer: TapeWriter | None = None
        self._thread: threading.Thread | None = None
        if tape is not None:
            self.writer = TapeWriter(tape, writer_id=writer_id, tokenizer=tokenizer, created_by="gymtape serve",
                                     flush_seconds=flush_seconds, flush_rows=4096, handle_signals=False)
            self._thread = threading.Thread(target=self._drain, name="gymtape-recorder", daemon=True)
            self._thread.start()

    def assign(self, anchor: tuple[Sequence[int], Sequence[int]] | None) -> tuple[str, int]:
        """(rollout id, call index) for a request whose spliced-in message is ``anchor``.

        Identical calls in several rollouts (greedy repeats of one task) share a key; each
        continuation takes the oldest one not yet continued, so concurrent repeats stay apart.
        A second continuation of the same call (a client retry, a branch) reuses the latest.
        """
        if anchor is not None:
            with self._lock:
                entry = self._known.get(call_key(*anchor))
                hit = (entry[0].pop(0) if entry[0] else entry[1]) if entry is not None else None
            if hit is not None:
                return hit[0], hit[1] + 1
        return uuid.uuid4().hex, 0

    def remember(self, prompt_ids: Sequence[int], generation_ids: Sequence[int], rollout_id: str, call_index: int,
                 policy_version: int = 0) -> None:
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
        """(rollout id, call index, policy version) of a call this server made, if still tracked."""
        with self._lock:
            entry = self._known.get(call_key(prompt_ids, generation_ids))
            return entry[1] if entry is not None else None

    def submit(self, record: CallRecord) -> None:
        if self.writer is not None:
            self._queue.put(record)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _drain(self) -> None:
        assert self.writer is not None
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self.writer.add_call(item)  # type: ignore[arg-type]
                self.recorded += 1
            except Exception as e:  # keep serving; the count shows in /health
                self.errors += 1
                print(f"gymtape serve: could not record call: {e}", file=sys.stderr)

    def close(self) -> None:
        """Write everything queued, then close the tape writer (publishes its manifest)."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
        if self.writer is not None:
            self.writer.close()
