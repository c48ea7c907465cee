"""Referential integrity of a tape: which rollout rows can be trusted, per row, vectorised.

A rollout row says how many model calls it has (``num_calls``); its calls are rows of the
calls table with its ``rollout_id`` and call indices ``0 .. num_calls - 1``. Three things make a
row unfit to train on or to count, and every reader (``gymtape check``, ``gymtape inspect``,
``TapeDataset``, ``TapeFollower``, ``gymtape record --resume --retry-failed``) decides them here,
the same way:

* **missing calls**: some of the indices ``0 .. num_calls - 1`` have no call row (fewer rows, or
  a gap). A model server killed before its calls were durable leaves such rows behind: the
  recorder wrote the rollout row, joined to calls that never reached the tape.
* **incomplete**: ``token_status = "incomplete"``: a call of the rollout failed to be captured
  (NeMo Gym's ``TokenSink.mark_incomplete``). Gym's rule: mask the sample, never train on a
  chain with a hole.
* **superseded**: a row that is *retryable* (``status = "failed"``, missing calls, or
  incomplete) and a later row (``created_at``, then position) exists for the same
  ``(env, task_index, rollout_index)``: ``gymtape record --resume --retry-failed`` ran that task
  and repeat again, and the new row replaces the old one. A row that is neither failed nor
  broken is never superseded (training rounds may reuse a task and repeat on purpose), and rows
  without task and repeat indices never are.

Cost: one pass over the calls' ``(rollout_id, call_index)`` columns and the rollout rows,
numpy/Arrow throughout (sort, unique, searchsorted); nothing per token, no Python per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._reader import Tape

#: ``token_status`` of a rollout that lost the capture of a call (Gym's ``mark_incomplete``).
INCOMPLETE = "incomplete"
#: Rollout columns :func:`rollout_integrity` reads.
INTEGRITY_ROLLOUT_COLUMNS = ["rollout_id", "env", "task_index", "rollout_index", "status", "token_status",
                             "num_calls", "created_at"]
#: Calls columns :func:`rollout_integrity` reads.
INTEGRITY_CALL_COLUMNS = ["rollout_id", "call_index"]


@dataclass(frozen=True)
class RolloutIntegrity:
    """Per rollout row (aligned with the rollouts table given), what is wrong with it.

    ``missing_calls``, ``incomplete`` and ``superseded`` may overlap; :attr:`broken` and
    :meth:`reason` give each row one verdict (superseded first: a replaced row is no longer a
    problem, whatever it was).
    """

    #: Call indices ``0 .. num_calls - 1`` present on the tape (each counted once).
    calls_found: np.ndarray
    num_calls: np.ndarray
    missing_calls: np.ndarray
    incomplete: np.ndarray
    superseded: np.ndarray
    failed: np.ndarray

    @property
    def retryable(self) -> np.ndarray:
        """Rows a retry replaces: failed, missing calls, or incomplete."""
        return self.failed | self.missing_calls | self.incomplete

    @property
    def broken(self) -> np.ndarray:
        """Rows that point at missing calls or are incomplete, and that nothing replaced."""
        return (self.missing_calls | self.incomplete) & ~self.superseded

    @property
    def current(self) -> np.ndarray:
        """Rows that count (not superseded)."""
        return ~self.superseded

    def reason(self) -> np.ndarray:
        """One verdict per row: ``superseded``, ``incomplete``, ``missing_calls`` or ``ok``."""
        out = np.full(self.superseded.size, "ok", dtype=object)
        out[self.missing_calls] = "missing_calls"
        out[self.incomplete] = "incomplete"
        out[self.superseded] = "superseded"
        return out

    def counts(self) -> dict[str, int]:
        """How many rows get each verdict of :meth:`reason` (``ok`` left out)."""
        return {
            "superseded": int(self.superseded.sum()),
            "incomplete": int((self.incomplete & ~self.superseded).sum()),
            "missing_calls": int((self.missing_calls & ~self.incomplete & ~self.superseded).sum()),
        }


def _np(col: Any, dtype: Any, fill: Any) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return pc.fill_null(col, fill).to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _string(col: Any) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def rollout_integrity(rollouts: pa.Table, calls: pa.Table) -> RolloutIntegrity:
    """Check each row of ``rollouts`` against ``calls`` (see the module doc).

    Args:
        rollouts: rollout rows with (at least) :data:`INTEGRITY_ROLLOUT_COLUMNS`; ``env``,
            ``task_index``, ``rollout_index``, ``status`` and ``created_at`` may be absent (no
            supersession or failure is decided then).
        calls: call rows with :data:`INTEGRITY_CALL_COLUMNS`: every call row of the tape, or
            at least those of the rollouts given.
    """
    n = rollouts.num_rows
    if n == 0:
        z = np.zeros(0, bool)
        return RolloutIntegrity(np.zeros(0, np.int64), np.zeros(0, np.int64), z, z, z, z)
    num_calls = np.maximum(_np(rollouts["num_calls"], np.int64, 0), 0)
    # One code per rollout id of the rollout rows; each call row gets its rollout's code (or none:
    # calls without a rollout row are no business of this check).
    enc = pc.dictionary_encode(_string(rollouts["rollout_id"]).cast(pa.string()))
    r_code = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    found = np.zeros(n, np.int64)
    if calls.num_rows:
        c_code = _np(pc.index_in(_string(calls["rollout_id"]).cast(pa.string()), value_set=enc.dictionary),
                     np.int64, -1)
        c_idx = _np(calls["call_index"], np.int64, -1)
        ok = (c_idx >= 0) & (c_code >= 0)
        span = int(c_idx.max()) + 2 if c_idx.size else 1
        # Distinct (rollout, index) pairs as sorted keys; a row's calls found are the keys in
        # [code * span, code * span + num_calls).
        keys = np.unique(c_code[ok] * span + c_idx[ok])
        lo = r_code * span
        found = np.searchsorted(keys, lo + np.minimum(num_calls, span), side="left") - np.searchsorted(keys, lo)
    missing = found < num_calls
    names = set(rollouts.column_names)
    incomplete = _equals(rollouts, "token_status", INCOMPLETE)
    failed = _equals(rollouts, "status", "failed")
    superseded = np.zeros(n, bool)
    if {"env", "task_index", "rollout_index"} <= names:
        superseded = _superseded(rollouts, failed | missing | incomplete)
    return RolloutIntegrity(found, num_calls, missing, incomplete, superseded, failed)


def _equals(table: pa.Table, column: str, value: str) -> np.ndarray:
    if column not in table.column_names:
        return np.zeros(table.num_rows, bool)
    return _np(pc.equal(table[column], value), bool, False)


def _superseded(rollouts: pa.Table, retryable: np.ndarray) -> np.ndarray:
    """Retryable rows that are not the latest row of their (env, task_index, rollout_index)."""
    n = rollouts.num_rows
    if not retryable.any():
        return np.zeros(n, bool)
    keyed = _np(pc.and_(pc.is_valid(rollouts["task_index"]), pc.is_valid(rollouts["rollout_index"])), bool, False)
    task_i = _np(rollouts["task_index"], np.int64, 0)
    repeat_i = _np(rollouts["rollout_index"], np.int64, 0)
    env = pc.dictionary_encode(pc.fill_null(_string(rollouts["env"]).cast(pa.string()), "\x00"))
    env_code = env.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    if "created_at" in rollouts.column_names:
        created = _string(rollouts["created_at"]).cast(pa.int64())
        when = _np(created, np.int64, np.iinfo(np.int64).min)
    else:
        when = np.zeros(n, np.int64)
    position = np.arange(n)
    # Sort by key, then time, then position: the last row of each key is its latest.
    order = np.lexsort((position, when, repeat_i, task_i, env_code))
    k_env, k_task, k_rep = env_code[order], task_i[order], repeat_i[order]
    last_of_key = np.ones(n, bool)
    last_of_key[:-1] = (k_env[1:] != k_env[:-1]) | (k_task[1:] != k_task[:-1]) | (k_rep[1:] != k_rep[:-1])
    latest = np.empty(n, bool)
    latest[order] = last_of_key
    return retryable & keyed & ~latest


def read_integrity(tape: Tape, extra_columns: Sequence[str] = ()) -> tuple[pa.Table, RolloutIntegrity]:
    """The tape's rollout rows (:data:`INTEGRITY_ROLLOUT_COLUMNS` plus ``extra_columns``) and
    their :class:`RolloutIntegrity`; reads only the calls' ``rollout_id`` and ``call_index``."""
    columns = list(dict.fromkeys([*INTEGRITY_ROLLOUT_COLUMNS, *extra_columns]))
    rollouts = tape.read("rollouts", columns)
    return rollouts, rollout_integrity(rollouts, tape.read("calls", INTEGRITY_CALL_COLUMNS))


def broken_rollouts(rollouts: pa.Table, integrity: RolloutIntegrity, limit: int | None = None) -> list[dict[str, Any]]:
    """The broken rows (:attr:`RolloutIntegrity.broken`), named: rollout id, env, task, repeat,
    what is wrong, calls expected and found; the first ``limit`` (None: all)."""
    rows = np.flatnonzero(integrity.broken)
    if limit is not None:
        rows = rows[:limit]
    if rows.size == 0:
        return []
    names = [c for c in ("rollout_id", "env", "task_index", "rollout_index", "status") if c in rollouts.column_names]
    picked = rollouts.select(names).take(pa.array(rows, pa.int64())).to_pylist()
    reason = integrity.reason()
    out = []
    for row, r in zip(rows.tolist(), picked):
        out.append({**r, "problem": reason[row], "num_calls": int(integrity.num_calls[row]),
                    "calls_found": int(integrity.calls_found[row])})
    return out
