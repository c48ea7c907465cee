"""``gymtape ingest`` of NeMo Gym's own token-capture store: ``<rollout_id>.tokens.jsonl`` files.

Gym's reference store (``nemo_gym.token_id_capture.store.TokenCaptureStore``) keeps, per
rollout, ``<rollout_id>.tokens.jsonl`` (one ``TokenEntry`` per line as canonical JSON, in commit
order), ``.tokens.incomplete`` (call ids marked incomplete, one a line), ``.tokens.intents``
(call ids that began) and ``.tokens.state.json``. Ingest writes each entry as the capture row
``TapeSink`` writes (``_capture_tape.py``: same layout, so ``TapeSource`` and ``TapeLineage``
read ingested and live-captured rollouts alike) and carries the incomplete marks and intents
into the rollout's ``capture/<rollout_id>.events``, so a freeze of the tape gives the entries and
the incompleteness the store held. Lossless: an entry comes back as the same JSON, and a
re-ingest compares canonical bytes (identical: skipped; different: reported as a conflict).
Not carried over: Gym's snapshot ids and versions (a tape computes its own) and retired
rollouts (the store deleted their entries). Needs no nemo_gym (with it, delta entries are also
checked against their digest).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .._errors import GymFormatError
from ._capture_tape import CaptureTape, _Events, _token_ids, canonical, check_rollout_id

ENTRIES_SUFFIX = ".tokens.jsonl"
INCOMPLETE_SUFFIX = ".tokens.incomplete"
INTENTS_SUFFIX = ".tokens.intents"
STATE_SUFFIX = ".tokens.state.json"


@dataclass
class CaptureIngestReport:
    """What one ingest of capture files did; ``errors`` names every file left out, and why."""

    #: Rollouts found in the store (with entries, or only intents, marks or a retired state).
    found: int = 0
    rollouts: int = 0
    entries: int = 0
    #: Entries already on the tape, byte for byte (a re-run).
    skipped_existing: int = 0
    #: Rollouts that come out incomplete (marked, or an intent without an entry).
    incomplete: int = 0
    #: Rollouts the store had retired (their entries deleted): nothing to import.
    retired: int = 0
    bytes_read: int = 0
    errors: list[GymFormatError] = field(default_factory=list)


_SUFFIXES = (ENTRIES_SUFFIX, INCOMPLETE_SUFFIX, INTENTS_SUFFIX, STATE_SUFFIX)


def capture_rollouts(paths: Iterable[str | os.PathLike[str]]) -> Iterator[tuple[Path, str]]:
    """``(folder, rollout_id)`` of every rollout the paths hold: a folder's rollouts are those with
    any of the store's files (a rollout may have only intents, or only its retired state), in
    name order; a ``<rollout_id>.tokens.jsonl`` file is that rollout."""
    for p in map(Path, paths):
        if p.is_dir():
            ids = {e.name[: -len(sfx)] for e in p.iterdir() for sfx in _SUFFIXES if e.name.endswith(sfx)}
            yield from ((p, rid) for rid in sorted(ids))
        elif p.name.endswith(ENTRIES_SUFFIX):
            yield p.parent, p.name[: -len(ENTRIES_SUFFIX)]
        else:
            raise GymFormatError(str(p), 0, f"not a Gym capture file (expected <rollout_id>{ENTRIES_SUFFIX})")


def _digest_fn() -> Any:
    try:
        from nemo_gym.token_id_capture.records import compute_digest
    except ImportError:
        return None
    return compute_digest


def _lines(path: Path) -> list[str]:
    """The call ids of a marks or intents file, one a line (an empty one is a mark without a call id)."""
    if not path.exists():
        return []
    text = path.read_text("utf-8")
    return [line.strip() for line in text.split("\n")[: -1 if text.endswith("\n") else None]]


def _read_entries(path: Path, rid: str) -> list[dict[str, Any]]:
    """Parse and check a rollout's entries (:class:`GymFormatError` names the line). A torn last
    line (a crash mid-append: never acknowledged) is dropped, as Gym's store drops it."""
    try:
        return _parse_entries(path.read_bytes(), rid)
    except _BadLine as e:
        raise GymFormatError(str(path), e.line_no, e.reason) from None


class _BadLine(ValueError):
    def __init__(self, line_no: int, reason: str) -> None:
        super().__init__(reason)
        self.line_no, self.reason = line_no, reason


def _parse_entries(raw: bytes, rid: str) -> list[dict[str, Any]]:
    lines = raw.split(b"\n")
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            if not b"".join(lines[n:]).strip():
                break  # torn tail
            raise _BadLine(n, f"not JSON ({e})") from None
        if not isinstance(entry, dict):
            raise _BadLine(n, "an entry must be a JSON object")
        if entry.get("rollout_id") != rid:
            raise _BadLine(n, f"rollout_id {entry.get('rollout_id')!r} is not the file's {rid!r}")
        mcid = entry.get("model_call_id")
        if not isinstance(mcid, str) or not mcid:
            raise _BadLine(n, "model_call_id must be a non-empty string")
        try:
            _token_ids(entry.get("prompt_token_ids"), "prompt_token_ids", "entry", strict=True)
            gen = _token_ids(entry.get("generation_token_ids"), "generation_token_ids", "entry", strict=True)
        except ValueError as e:
            raise _BadLine(n, str(e)) from None
        lps = entry.get("generation_log_probs")
        if not isinstance(lps, list) or len(lps) != gen.size or \
                not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in lps):
            raise _BadLine(n, "generation_log_probs must be numbers, as many as generation_token_ids")
        if entry.get("prompt_is_delta") and entry.get("parent_call_id") not in seen:
            raise _BadLine(n, f"a delta entry's parent {entry.get('parent_call_id')!r} is not an earlier entry "
                              "of the file")
        if mcid in seen:
            raise _BadLine(n, f"call {mcid} appears twice")
        seen.add(mcid)
        entries.append(entry)
    return entries


def ingest_gym_capture(paths: Iterable[str | os.PathLike[str]], tape: str | os.PathLike[str], *,
                       strict: bool = False) -> CaptureIngestReport:
    """Import NeMo Gym capture-store files (folders of ``*.tokens.jsonl``, or the files) into a tape.

    Each rollout lands whole or not at all; a malformed file is reported in
    ``CaptureIngestReport.errors`` and skipped, or raised (``strict=True``).
    """
    report = CaptureIngestReport()
    digest = _digest_fn()
    core = CaptureTape(tape, writer_kw={"created_by": "gymtape ingest (NeMo Gym capture store)"})
    try:
        for folder, rid in capture_rollouts(paths):
            report.found += 1
            path = folder / f"{rid}{ENTRIES_SUFFIX}"
            try:
                _ingest_rollout(core, folder, rid, report, digest)
            except GymFormatError as e:
                if strict:
                    raise
                report.errors.append(e)
            except ValueError as e:  # the file's content (TapeValueError is one); not a write failure
                if strict:
                    raise GymFormatError(str(path), 0, str(e)) from e
                report.errors.append(GymFormatError(str(path), 0, str(e)))
    finally:
        core.close()
    return report


def _ingest_rollout(core: CaptureTape, folder: Path, rid: str, report: CaptureIngestReport, digest: Any) -> None:
    check_rollout_id(rid)
    base = folder / rid
    path = Path(f"{base}{ENTRIES_SUFFIX}")
    state_path = Path(f"{base}{STATE_SUFFIX}")
    state = orjson.loads(state_path.read_bytes()) if state_path.exists() else {}
    if isinstance(state, dict) and state.get("retired"):
        report.retired += 1
        return
    report.bytes_read += path.stat().st_size if path.exists() else 0
    entries = _read_entries(path, rid) if path.exists() else []
    marks = _lines(Path(f"{base}{INCOMPLETE_SUFFIX}"))
    if isinstance(state, dict) and state.get("incomplete") and not marks:
        marks = [""]  # the store knew it incomplete (a conflicting payload) without a marks file
    intents = _lines(Path(f"{base}{INTENTS_SUFFIX}"))
    with _Events(core.folder, rid) as events:
        core.index.refresh(core.index.ticket())
        rows = core.index.rollout(rid)
        new = []
        for entry in entries:
            row = rows.by_call.get(entry["model_call_id"])
            if row is None:
                new.append(entry)
            elif core._canonical_of(rid, rows, row) == canonical(entry):
                report.skipped_existing += 1
            else:
                raise ValueError(f"call {entry['model_call_id']} is on the tape with another payload")
        if new:
            writer = core.writer()
            for entry in new:
                core._committed(rid, core._add(writer, rid, rows, entry, digest=digest, strict=True))
            writer.commit()
        had = {(e[0], e[1]) for e in events.events}
        todo = [["begin", c] for c in dict.fromkeys(intents) if ("begin", c) not in had]
        todo += [["incomplete", c] for c in dict.fromkeys(marks) if ("incomplete", c) not in had]
        if todo:
            events.extend(todo)
        recorded = set(rows.by_call)
        if marks or any(c not in recorded for c in intents):
            report.incomplete += 1
    report.rollouts += 1
    report.entries += len(new)
