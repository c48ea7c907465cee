"""NeMo Gym rollout JSONL ↔ tape.

A Gym rollout line is the verifier's answer: ``responses_create_params``, ``response`` (a
Responses object whose output items carry the token fields of each model call), ``reward``,
verifier extras, ``_ng_task_index``, ``_ng_rollout_index``, ``agent_ref``. Ingest puts each
line in one rollout row (the JSON minus the token fields) and each token-carrying output item
in one call row (delta-encoded); export puts the token fields back where they were.

Lossless by construction: a value goes into a typed column only when the column's type holds
it exactly; otherwise the raw value stays in ``extras_json`` and export takes it from there.

Integrity: token IDs must be JSON integers in ``0 .. 2^31-1`` (and below ``vocab_size`` when
given); a float (``1.5``, ``1.0``), a bool, a string or an out-of-range ID makes the line
malformed, with the reason, and it is skipped: never truncated into another ID. Logprobs must
be numbers; a NaN, an infinity or a positive one (beyond float rounding) keeps the line, with
the values exactly as given, but marks the call and its rollout ``token_status =
"invalid_logprobs"``: trainers leave it out and ``gymtape check`` reports the values.

The environment name travels with the line: ingest reads it from ``agent_ref.name``, unless
the gymtape-owned key ``_gymtape_env`` says otherwise; export writes that key only when the
tape's env differs from what ``agent_ref`` says (a ``gymtape record --agent-url`` rollout is
stored under its CLI name), so an ingested file exports byte for byte and every tape's export
ingests back under the same (env, task, repeat).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import orjson

from .._errors import GymFormatError, GymtapeError, TapeValueError, TapeWriteError
from ..tape._layout import META_FILE
from ..tape._reader import Tape
from ..tape._storage import TapeStorage
from ..tape._records import CallRecord, RolloutRecord
from ..tape._writer import TapeWriter

TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")
_INPUT, _RESPONSE, _REWARD, _TASK, _REPEAT = (
    "responses_create_params",
    "response",
    "reward",
    "_ng_task_index",
    "_ng_rollout_index",
)
_TYPED_KEYS = (_INPUT, _RESPONSE, _REWARD, _TASK, _REPEAT)
#: gymtape's own key on a Gym line: the env name when ``agent_ref.name`` does not give it.
ENV_KEY = "_gymtape_env"
#: The largest token ID a tape stores (int32 columns).
MAX_TOKEN_ID = 2**31 - 1
#: Logprobs above this are impossible (log of a probability > 1), float rounding aside; the
#: same tolerance as `gymtape check`.
POSITIVE_LOGPROB_TOL = 1e-6
#: Call and rollout ``token_status`` of token fields whose logprobs are NaN, infinite or positive.
INVALID_LOGPROBS = "invalid_logprobs"


@dataclass
class IngestReport:
    """What one ingest did; ``errors`` holds every malformed line (skipped), ``flagged`` why
    lines were ingested but marked (``token_status = "invalid_logprobs"``)."""

    lines: int = 0
    rollouts: int = 0
    calls: int = 0
    skipped_existing: int = 0
    bytes_read: int = 0
    errors: list[GymFormatError] = field(default_factory=list)
    token_status: dict[str, int] = field(default_factory=dict)
    flagged: list[str] = field(default_factory=list)


#: For :func:`_long_integer`: digits -> "1", "." -> ".", every other byte -> "0".
_DIGIT_MAP = bytes(ord("1") if chr(i).isdigit() and i < 128 else ord(".") if i == ord(".") else ord("0")
                   for i in range(256))
_LONG_RUN = b"1" * 19


def _long_integer(text: bytes) -> bool:
    """Whether ``text`` may hold an integer of 19 digits or more (a run of digits not after a
    '.'), which orjson would read as a float (beyond 64 bits). Strings with such runs also count:
    those lines take the exact, slower parser. About 400 MB/s."""
    mapped = text.translate(_DIGIT_MAP)
    return b"0" + _LONG_RUN in mapped or mapped.startswith(_LONG_RUN)


def _loads(line: bytes | str) -> Any:
    """Parse JSON text exactly: orjson, but Python's json for what orjson reads differently
    (integers beyond 64 bits become floats there) or refuses (NaN, Infinity)."""
    return _parse(line)[0]


def _parse(line: bytes | str) -> tuple[Any, bool]:
    """:func:`_loads`, and whether orjson read it: then it holds no NaN, no infinity and no
    integer beyond 64 bits, so orjson writes it back exactly (see :func:`_json_text`)."""
    raw = line.encode() if isinstance(line, str) else line
    if _long_integer(raw):
        return _loads_python(line, ""), False
    try:
        return orjson.loads(line), True
    except orjson.JSONDecodeError as e:
        return _loads_python(line, str(e)), False


def _loads_python(line: bytes | str, orjson_error: str) -> Any:
    # Python's json writes NaN/Infinity (a -inf logprob, say), which orjson refuses (as it
    # refuses lone surrogates, which Python's json reads: refused here too).
    try:
        data = json.loads(line)
    except RecursionError:
        raise ValueError("the JSON nests too deeply to read") from None
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise ValueError(f"the line holds text that is not valid Unicode ({orjson_error or e})") from None
    return data


def _json_text(value: Any, plain: bool = False) -> str:
    """``value`` as JSON text that reads back equal: orjson's, unless it would write a NaN or an
    infinity as null or refuses an integer beyond 64 bits; then Python's (NaN, Infinity, big ints).
    ``plain``: ``value`` came from JSON orjson read (:func:`_parse`), so orjson's is exact."""
    try:
        data = orjson.dumps(value)
    except orjson.JSONEncodeError:
        data = None
    if data is None or (not plain and b"null" in data and _has_nonfinite(value)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return data.decode()


def _rollout_id(line: bytes) -> str:
    return hashlib.blake2b(line.rstrip(b"\r\n"), digest_size=10).hexdigest()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_in(v: Any, bits: int) -> int | None:
    """``v`` when it is a JSON integer a signed ``bits``-bit column holds, else None."""
    return v if _is_int(v) and -(1 << (bits - 1)) <= v < 1 << (bits - 1) else None


def _float32(v: Any) -> float | None:
    """``v`` when it is a JSON number a float32 column holds (finite, in range), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) and abs(f) <= 3.4e38 else None


def _first(values: list[Any], bad: Any) -> tuple[int, Any]:
    return next((i, v) for i, v in enumerate(values) if bad(v))


def _token_ids(values: Any, what: str, where: str, vocab_size: int | None) -> np.ndarray:
    """A list of JSON integers as int64, or ValueError naming the first bad entry: a float,
    bool or string is never rounded or cast into an ID (numpy would: 1.5 -> 1, True -> 1)."""
    if not isinstance(values, list):
        raise ValueError(f"{where}: {what} is {type(values).__name__}, expected a list of token IDs")
    if set(map(type, values)) - {int}:  # C speed (~25 ns a token); bool is not int here
        i, v = _first(values, lambda v: type(v) is not int)
        raise ValueError(f"{where}: {what}[{i}] is {v!r} ({type(v).__name__}); token IDs are integers")
    limit = MAX_TOKEN_ID if vocab_size is None else min(MAX_TOKEN_ID, vocab_size - 1)
    try:
        arr: np.ndarray | None = np.array(values, dtype=np.int64)
    except OverflowError:
        arr = None
    if arr is None or (arr.size and (arr.min() < 0 or arr.max() > limit)):
        i, v = _first(values, lambda v: not 0 <= v <= limit)
        rule = (f"below the vocabulary size {vocab_size}" if vocab_size is not None and v > limit and v <= MAX_TOKEN_ID
                else "in 0..2^31-1")
        raise ValueError(f"{where}: {what}[{i}] is {v}; token IDs are integers {rule}")
    return arr


def _logprobs(values: Any, where: str) -> tuple[np.ndarray, str | None]:
    """A list of JSON numbers as the tape stores them (float32), and why they are invalid
    logprobs (None: valid).

    Non-numbers make the line malformed (ValueError); NaN, infinite or positive values are kept
    exactly, and flagged."""
    what = "generation_log_probs"
    if not isinstance(values, list):
        raise ValueError(f"{where}: {what} is {type(values).__name__}, expected a list of numbers")
    if set(map(type, values)) - {float, int}:
        i, v = _first(values, lambda v: type(v) not in (float, int))
        raise ValueError(f"{where}: {what}[{i}] is {v!r} ({type(v).__name__}); logprobs are numbers")
    try:
        arr = np.array(values, dtype=np.float64)
    except OverflowError:  # an integer beyond any float
        i, v = _first(values, lambda v: isinstance(v, int) and abs(v) > 1e308)
        raise ValueError(f"{where}: {what}[{i}] is an integer of {len(str(v))} digits; logprobs are numbers "
                         "a float holds") from None
    with np.errstate(invalid="ignore", over="ignore"):
        stored = arr.astype(np.float32)
        bad = ~np.isfinite(arr) | (arr > POSITIVE_LOGPROB_TOL) | ~np.isfinite(stored)
    if not bad.any():
        return stored, None
    i = int(np.argmax(bad))
    v = float(arr[i])
    shown = f"{v!r}, beyond what the tape's float32 holds" if np.isfinite(v) and v <= POSITIVE_LOGPROB_TOL else repr(v)
    return stored, (f"{where}: {what}[{i}] is {shown}; logprobs are finite and <= 0 "
                    f"({int(bad.sum())} of {arr.size} are not)")


def _env_of(data: dict[str, Any]) -> str | None:
    """The env of a Gym line: gymtape's own key when present, else ``agent_ref.name``."""
    if ENV_KEY in data:
        env = data[ENV_KEY]
        if env is not None and not isinstance(env, str):
            raise ValueError(f"{ENV_KEY} is {env!r}; it names the environment: a string or null")
        return env
    agent_ref = data.get("agent_ref")
    return agent_ref.get("name") if isinstance(agent_ref, dict) and isinstance(agent_ref.get("name"), str) else None


def line_to_records(line: bytes, data: Any, source: str, *, vocab_size: int | None = None,
                    flags: list[str] | None = None, plain_json: bool = False) -> tuple[RolloutRecord, list[CallRecord]]:
    """Split one parsed Gym line into a rollout record and its call records.

    Raises ValueError (with the reason) for a malformed line; ``data`` is modified in place.
    ``vocab_size``: token IDs at or above it make the line malformed too. Invalid logprobs are
    kept and flagged (``token_status = "invalid_logprobs"``; see the module doc); ``flags``
    collects why. ``plain_json``: ``data`` was read by orjson (:func:`_parse`): its JSON is
    written back without looking for NaN.
    """
    if not isinstance(data, dict):
        raise ValueError(f"a rollout line must be a JSON object, got {type(data).__name__}")
    rid = _rollout_id(line)
    rcp = data.get(_INPUT)
    response = data.get(_RESPONSE)
    output = response.get("output") if isinstance(response, dict) else None
    extras = {k: v for k, v in data.items() if k not in _TYPED_KEYS}
    reward = data.get(_REWARD)
    if reward is not None and not isinstance(reward, float):
        extras[_REWARD] = reward  # keep the exact JSON value (int, bool, string, ...)
        try:
            reward = float(reward) if isinstance(reward, int) else None
        except OverflowError:  # an integer beyond any float: only extras holds it
            reward = None
    task_index, repeat_index = data.get(_TASK), data.get(_REPEAT)
    for key, v in ((_TASK, task_index), (_REPEAT, repeat_index)):
        if v is not None and _int_in(v, 64) is None:
            extras[key] = v  # not an int64: the raw value stays in extras
    task_index, repeat_index = _int_in(task_index, 64), _int_in(repeat_index, 64)
    env = _env_of(data)
    if task_index is not None:
        group_key = f"{env or ''}#{task_index}"
    else:
        task_input = rcp.get("input") if isinstance(rcp, dict) else rcp
        group_key = "input:" + hashlib.blake2b(_json_text(task_input, plain_json).encode(), digest_size=8).hexdigest()

    status, reason = "ok", None
    if data.get("failure_kind"):
        status, reason = "failed", str(data.get("failure_reason") or data["failure_kind"])
    elif isinstance(response, dict) and (response.get("error") or response.get("status") == "failed"):
        error = response.get("error")
        status, reason = "failed", _json_text(error, plain_json) if error else "response failed"
    elif isinstance(response, dict) and response.get("status") == "incomplete":
        details = response.get("incomplete_details")
        status = "truncated"
        reason = str(details.get("reason")) if isinstance(details, dict) else "incomplete"

    params = rcp if isinstance(rcp, dict) else {}
    model = response.get("model") if isinstance(response, dict) else None
    calls: list[CallRecord] = []
    flagged = False
    token_items = []
    if isinstance(output, list):
        token_items = [i for i, it in enumerate(output) if isinstance(it, dict) and any(f in it for f in TOKEN_FIELDS)]
    for n, i in enumerate(token_items):
        item = output[i]  # type: ignore[index]
        where = f"response.output[{i}]"
        missing = [f for f in TOKEN_FIELDS if f not in item]
        if missing:
            raise ValueError(f"{where} has some token fields but not {', '.join(missing)}")
        prompt = _token_ids(item.pop("prompt_token_ids"), "prompt_token_ids", where, vocab_size)
        gen = _token_ids(item.pop("generation_token_ids"), "generation_token_ids", where, vocab_size)
        logprobs, invalid = _logprobs(item.pop("generation_log_probs"), where)
        if invalid is not None:
            flagged = True
            if flags is not None:
                flags.append(invalid)
        if gen.size != logprobs.size:
            raise ValueError(
                f"{where}: generation_token_ids has {gen.size} entries but generation_log_probs {logprobs.size}"
            )
        nxt = token_items[n + 1] if n + 1 < len(token_items) else len(output)  # type: ignore[arg-type]
        segment = output[i:nxt]  # type: ignore[index]
        last = n + 1 == len(token_items)
        if last and status == "truncated":
            finish = "length"
        elif any(isinstance(it, dict) and it.get("type") == "function_call" for it in segment):
            finish = "tool_calls"
        else:
            finish = "stop"
        calls.append(
            CallRecord(
                rollout_id=rid,
                call_index=n,
                prompt_ids=prompt,
                generation_ids=gen,
                generation_logprobs=logprobs,
                token_status=INVALID_LOGPROBS if invalid is not None else None,
                finish_reason=finish,
                temperature=_float32(params.get("temperature")),
                top_p=_float32(params.get("top_p")),
                max_tokens=_int_in(params.get("max_output_tokens"), 32),
                model=model if isinstance(model, str) else None,
            )
        )
    rollout = RolloutRecord(
        rollout_id=rid,
        env=env,
        task_index=task_index,
        rollout_index=repeat_index,
        group_key=group_key,
        reward=reward,
        status=status,
        status_reason=reason,
        token_status=INVALID_LOGPROBS if flagged else None if calls else "missing",
        input=_json_text(rcp, plain_json) if _INPUT in data else None,
        response=_json_text(response, plain_json) if _RESPONSE in data else None,
        extras=_json_text(extras, plain_json) if extras else None,
        call_item_indices=token_items if calls else None,
        gym_keys=list(data.keys()),
        source=source,
    )
    return rollout, calls


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_no, line)`` of non-blank lines, streaming (constant memory)."""
    with open(path, "rb", buffering=1 << 20) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def ingest_gym_jsonl(
    paths: Iterable[str | os.PathLike[str]],
    tape: str | os.PathLike[str],
    *,
    strict: bool = False,
    writer: TapeWriter | None = None,
    progress: Any = None,
    vocab_size: int | None = None,
) -> IngestReport:
    """Convert NeMo Gym rollout JSONL files into a tape (created or appended to).

    Rollouts already on the tape (same line content) are skipped, so re-running an ingest is
    safe. A malformed line is reported in ``IngestReport.errors`` and skipped, or raised as
    :class:`GymFormatError` with ``strict=True``. ``vocab_size``: token IDs at or above it make
    a line malformed (default: only IDs outside 0..2^31-1 do). Writing the tape fails with
    :class:`TapeWriteError` naming it (a full disk, no permission); what was flushed before
    stays, and running the ingest again skips it.
    """
    if vocab_size is not None and (not _is_int(vocab_size) or vocab_size < 1):
        raise TapeValueError(f"vocab_size is {vocab_size!r}; give a positive integer (the tokenizer's vocabulary size)")
    report = IngestReport()
    storage = writer.storage if writer is not None else TapeStorage(tape)  # a local folder or a URL
    try:
        return _ingest(paths, storage, report, strict=strict, writer=writer, progress=progress, vocab_size=vocab_size)
    except GymtapeError:
        raise
    except OSError as e:
        if e.filename is not None and not str(e.filename).startswith(storage.location):
            raise  # the input file, not the tape
        advice = ("the disk is full: free space there (or ingest into a tape elsewhere) and run the ingest again; "
                  "rollouts it wrote before stay on the tape and are skipped" if e.errno == errno.ENOSPC
                  else "check the path and its permissions")
        raise TapeWriteError(f"cannot write the tape {storage.location}: {e.strerror or e}; {advice}") from e


def _ingest(paths: Iterable[str | os.PathLike[str]], storage: TapeStorage, report: IngestReport, *, strict: bool,
            writer: TapeWriter | None, progress: Any, vocab_size: int | None) -> IngestReport:
    existing: set[str] = set()
    if storage.exists(META_FILE):
        existing = set(Tape(storage).read("rollouts", ["rollout_id"]).column("rollout_id").to_pylist())
    own = writer is None
    w = writer or TapeWriter(storage, created_by="gymtape ingest", flush_seconds=None)
    try:
        for path in paths:
            src = str(path)
            for line_no, line in iter_jsonl(path):
                report.lines += 1
                report.bytes_read += len(line)
                if progress is not None:
                    progress(len(line))
                flags: list[str] = []
                try:
                    data, plain = _parse(line)
                    rollout, calls = line_to_records(line, data, f"{src}:{line_no}", vocab_size=vocab_size,
                                                     flags=flags, plain_json=plain)
                except ValueError as e:  # JSONDecodeError is a ValueError too
                    err = GymFormatError(src, line_no, str(e))
                    if strict:
                        raise err from e
                    report.errors.append(err)
                    continue
                if rollout.rollout_id in existing:
                    report.skipped_existing += 1
                    continue
                existing.add(rollout.rollout_id)
                report.flagged += [f"{src}:{line_no}: {f}" for f in flags]
                for c in calls:
                    w.add_call(c)
                w.add_rollout(rollout)
                report.rollouts += 1
                report.calls += len(calls)
                ts = rollout.token_status or _token_status(calls)
                report.token_status[ts] = report.token_status.get(ts, 0) + 1
    except BaseException:
        if own:
            w.abort()
        raise
    if own:
        w.close()
    return report


def _token_status(calls: list[CallRecord]) -> str:
    nonempty = sum(1 for c in calls if len(c.prompt_ids) or len(c.generation_ids))
    return "ok" if nonempty == len(calls) else ("empty" if nonempty == 0 else "partial")


# -- export ----------------------------------------------------------------------------------


def iter_gym_lines(tape: Tape) -> Iterator[dict[str, Any]]:
    """Rebuild each rollout's Gym line (dict), in the order the rollouts were written.

    A line whose ``agent_ref`` does not name the tape's env for it gets gymtape's
    ``_gymtape_env`` key (last), so ingesting it gives the same env back (see the module doc)."""
    calls_index = tape.calls_by_rollout(("generation_logprobs", "output_json"))
    rollouts = tape.read("rollouts")
    cols = {c: rollouts.column(c).to_pylist() for c in (
        "rollout_id", "env", "input_json", "response_json", "extras_json", "gym_keys", "reward", "task_index",
        "rollout_index", "call_item_indices")}
    for r in range(rollouts.num_rows):
        rid = cols["rollout_id"][r]
        calls = calls_index.get(rid) if rid in calls_index else None
        response = _loads(cols["response_json"][r]) if cols["response_json"][r] is not None else None
        if calls is not None:
            response = _put_token_fields(response, calls, cols["call_item_indices"][r])
        extras = _loads(cols["extras_json"][r]) if cols["extras_json"][r] else {}
        typed = {
            _INPUT: _loads(cols["input_json"][r]) if cols["input_json"][r] is not None else None,
            _RESPONSE: response,
            _REWARD: cols["reward"][r],
            _TASK: cols["task_index"][r],
            _REPEAT: cols["rollout_index"][r],
        }
        keys = cols["gym_keys"][r] or [k for k in _TYPED_KEYS if typed[k] is not None] + list(extras)
        line = {k: extras[k] if k in extras else typed.get(k) for k in keys}
        env = cols["env"][r]
        try:
            same = _env_of(line) == env
        except ValueError:  # a malformed key of ours (from an agent's line): write it right
            same = False
        if not same:
            line[ENV_KEY] = env
        yield line


def _put_token_fields(response: Any, calls: dict[str, Any], item_indices: list[int] | None) -> Any:
    """Put each call's three token fields back on its output item (or synthesise items)."""
    if response is None:
        response = {"output": []}
    output = response.setdefault("output", [])
    for k in range(len(calls["prompt_ids"])):
        idx = item_indices[k] if item_indices is not None and k < len(item_indices) else None
        if idx is None:
            item = _loads(calls["output_json"][k]) if calls["output_json"][k] else {"type": "message", "role": "assistant"}
            output.append(item)
        else:
            item = output[idx]
        item["prompt_token_ids"] = calls["prompt_ids"][k].tolist()
        item["generation_token_ids"] = calls["generation_ids"][k].tolist()
        item["generation_log_probs"] = calls["generation_logprobs"][k].astype(np.float64).tolist()
    return response


def export_gym_jsonl(tape: str | os.PathLike[str] | Tape, out: IO[bytes]) -> int:
    """Write every rollout of ``tape`` to ``out`` as Gym rollout JSONL; returns lines written."""
    t = tape if isinstance(tape, Tape) else Tape(tape)
    n = 0
    for line in iter_gym_lines(t):
        out.write(_dumps_exact(line))
        n += 1
    return n


def gym_jsonl_size(tape: str | os.PathLike[str] | Tape) -> int:
    """Bytes ``export_gym_jsonl`` would write for ``tape`` (nothing is written)."""
    t = tape if isinstance(tape, Tape) else Tape(tape)
    return sum(len(_dumps_exact(line)) for line in iter_gym_lines(t))


def _dumps_exact(line: dict[str, Any]) -> bytes:
    # orjson writes NaN/inf as null and refuses integers beyond 64 bits; fall back to json
    # (NaN/Infinity, big integers) only then.
    try:
        data = orjson.dumps(line)
    except orjson.JSONEncodeError:
        return json.dumps(line).encode() + b"\n"
    if b"null" in data and _has_nonfinite(line):
        return json.dumps(line).encode() + b"\n"
    return data + b"\n"


def _has_nonfinite(obj: Any) -> bool:
    if isinstance(obj, float):
        return obj != obj or obj in (float("inf"), float("-inf"))
    if isinstance(obj, dict):
        return any(_has_nonfinite(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_nonfinite(v) for v in obj)
    return False
