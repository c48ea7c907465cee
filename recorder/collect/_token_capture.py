"""NeMo Gym 0.7's token-capture protocols over a tape: ``TapeSink``, ``TapeSource``, ``TapeLineage``.

Gym (``nemo_gym.token_id_capture``) records every model call's exact tokens as a
``TokenEntry`` and lets a framework replace its store. Pointing it at a tape::

    env:
      nemo_gym:
        token_id_capture:
          enabled: true
          sink: recorder:TapeSink
          sink_kwargs: {tape: /runs/tape}
          lineage_store: recorder:TapeLineage
          lineage_store_kwargs: {tape: /runs/tape}
          delta_records: true

Gym builds one sink and one lineage store per server process (``module:Class(**kwargs)``); a
trainer opens a ``TapeSource`` over the same tape to freeze, rebuild and retire rollouts
(``consumer.trajectories_from_source``). The guarantees are Gym's (``protocols.py``): a put is
durable and visible to every process's resolver before it returns, an identical re-put is a
no-op and a different one fails, a write after a freeze changes the version, an intent without
an entry masks the rollout. ``_capture_tape.py`` holds how that is done on a tape; lineage
hashing and matching are Gym's own (``stamp_continuation`` by Gym's capture path,
``RolloutLineage`` inside :class:`TapeLineage`, which is Gym's ``IncrementalLineageStore``
over the tape).

Every class takes ``share`` (default True): instances on one tape in one process share one
writer and one index (cheaper; the tape is still what makes entries visible across processes).
``share=False`` gives an instance its own, as if it ran in a process of its own.

Importing this module does not need nemo_gym; making an instance does
(:class:`~recorder.GymCaptureUnavailableError` says how to install it).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .._errors import GymCaptureUnavailableError, WriterClosedError
from ..tape._meta import tokenizer_identity
from ._capture_tape import DEFAULT_CACHED_TOKENS, CaptureTape, acquire, release

try:
    from nemo_gym.token_id_capture.lineage import IncrementalLineageStore
    from nemo_gym.token_id_capture.protocols import TokenCaptureSnapshot
    from nemo_gym.token_id_capture.records import TokenEntry

    _GYM_MISSING: ImportError | None = None
except ImportError as e:  # gymtape works without nemo_gym; only these classes need it
    IncrementalLineageStore = object  # type: ignore[assignment,misc]
    _GYM_MISSING = e

#: Threads that run intents, marks, freezes and drops off the event loop (each fsyncs its own
#: rollout's event file, so they overlap). Puts go to the tape's adder and syncer threads instead
#: (``CaptureTape.submit``), where concurrent puts share one commit.
CAPTURE_THREADS = 32
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _require_gym() -> None:
    if _GYM_MISSING is not None:
        raise GymCaptureUnavailableError(
            f"the NeMo Gym capture classes need nemo_gym.token_id_capture ({_GYM_MISSING}); install it with "
            "`pip install --no-deps --ignore-requires-python nemo-gym==0.7.0` (it needs pydantic and orjson)")


async def _run(fn: Any, *args: Any, **kw: Any) -> Any:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(CAPTURE_THREADS, thread_name_prefix="gymtape-capture")
    return await asyncio.get_running_loop().run_in_executor(_pool, functools.partial(fn, *args, **kw))


def _open(tape: str | os.PathLike[str], share: bool, max_cached_tokens: int,
          tokenizer: str | os.PathLike[str] | None = None) -> CaptureTape:
    _require_gym()
    writer_kw = {"tokenizer": tokenizer_identity(tokenizer)} if tokenizer is not None else None
    return acquire(tape, share=share, max_cached_tokens=max_cached_tokens, writer_kw=writer_kw)


class _Client:
    """What the three classes share: one CaptureTape held until ``close``."""

    def __init__(self, core: CaptureTape) -> None:
        self._core = core
        self._closed = False

    def _live(self) -> CaptureTape:
        if self._closed:
            raise WriterClosedError(f"this {type(self).__name__} of {self._core.path} is closed")
        return self._core

    def is_process_shared(self) -> bool:
        """Entries are on the tape: every process that opens it sees them."""
        return True

    async def close(self) -> None:
        """Release the tape (the last holder in the process seals the writer's log). Idempotent."""
        if not self._closed:
            self._closed = True
            await _run(release, self._core)


class TapeSink(_Client):
    """Gym's ``TokenSink`` (with the ``begin_call`` extension) writing to a tape.

    Args:
        tape: the tape folder (created if needed; a local or shared POSIX folder).
        share: share one writer and index with this process's other instances on the tape.
        tokenizer: a tokenizer folder to record in ``tape.json`` (``replay``/``check`` then use it).
        max_cached_tokens: tokens of recent rollouts kept in memory for continuations.
    """

    def __init__(self, tape: str | os.PathLike[str], *, share: bool = True,
                 tokenizer: str | os.PathLike[str] | None = None,
                 max_cached_tokens: int = DEFAULT_CACHED_TOKENS) -> None:
        super().__init__(_open(tape, share, max_cached_tokens, tokenizer))

    async def put(self, entry: TokenEntry) -> None:
        """Store the entry as a call row; durable and visible to every resolver when this returns."""
        # A delta entry's rebuilt length is checked here; its digest is checked by Gym's resolver,
        # which verifies the tokens it materializes from the tape on every continuation.
        await asyncio.wrap_future(self._live().submit(entry.model_dump(mode="json")))

    async def begin_call(self, rollout_id: str, model_call_id: str) -> None:
        """Durably record that the call is about to be dispatched (an intent with no entry at
        freeze masks the rollout)."""
        await _run(self._live().begin, rollout_id, model_call_id)

    async def mark_incomplete(self, rollout_id: str, model_call_id: str = "") -> None:
        """Durably record that a call of the rollout failed to capture (also after a freeze)."""
        await _run(self._live().mark_incomplete, rollout_id, model_call_id)


class TapeSource(_Client):
    """Gym's ``TokenSource`` over a tape: freeze a rollout, and retire what was consumed.

    ``drop`` also writes the rollout's row on the tape (``status`` ``ok``, or ``failed`` with
    the reason when the snapshot was incomplete); its calls stay on the tape.
    """

    def __init__(self, tape: str | os.PathLike[str], *, share: bool = True,
                 max_cached_tokens: int = DEFAULT_CACHED_TOKENS) -> None:
        super().__init__(_open(tape, share, max_cached_tokens))

    async def freeze(self, rollout_id: str) -> TokenCaptureSnapshot:
        """The rollout's entries, whether it is incomplete, and ``snapshot_id``/``version``."""

        def freeze() -> TokenCaptureSnapshot:
            snap = self._live().freeze(rollout_id)
            entries = tuple(TokenEntry.model_validate(e) for e in snap.entries)
            return TokenCaptureSnapshot(rollout_id, entries, snap.incomplete, snap.snapshot_id, snap.version)

        return await _run(freeze)

    async def drop(self, rollout_id: str, *, snapshot_id: str, version: int) -> bool:
        """Retire exactly that snapshot; False when the rollout changed since it was taken."""
        return await _run(self._live().drop, rollout_id, snapshot_id=snapshot_id, version=version)


class TapeLineage(_Client, IncrementalLineageStore):  # type: ignore[misc,valid-type]
    """Gym's ``LineageResolver`` over a tape: Gym's ``IncrementalLineageStore`` (its matcher,
    bounded cache and token materialization) fed with the tape's capture rows."""

    def __init__(self, tape: str | os.PathLike[str], *, share: bool = True,
                 max_cached_rollouts: int = 65536, max_cached_tokens: int = 8_000_000) -> None:
        _Client.__init__(self, _open(tape, share, DEFAULT_CACHED_TOKENS))
        IncrementalLineageStore.__init__(self, max_cached_rollouts=max_cached_rollouts,
                                         max_cached_tokens=max_cached_tokens)

    def _fetch_new_entries(self, rollout_id: str, cursor: Any) -> tuple[list[tuple[TokenEntry, Any]], Any]:
        got = self._live().entries_since(rollout_id, cursor)
        if got is None:
            raise IncrementalLineageStore.CursorReset
        cursor, entries = got
        return [(TokenEntry.model_validate(e), index) for index, e in entries], cursor

    def _load_entry(self, rollout_id: str, ref: Any) -> TokenEntry:
        return self._load_entries(rollout_id, [ref])[0]

    def _load_entries(self, rollout_id: str, refs: list[Any]) -> list[TokenEntry]:
        return [TokenEntry.model_validate(e) for e in self._live().entries_at(rollout_id, list(refs))]

    async def close(self) -> None:
        if not self._closed:
            await IncrementalLineageStore.close(self)
        await _Client.close(self)
