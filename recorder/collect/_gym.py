"""NeMo Gym rollout JSONL ↔ tape.

A Gym rollout line is the verifier's answer: ``responses_create_params``, ``response`` (a
Responses object whose output items carry the token fields of each model call), ``reward``,
verifier extras, ``_ng_task_index``, ``_ng_rollout_index``, ``agent_ref``. Ingest puts each
line in one rollout row (the JSON minus the token fields) and each token-carrying output item
in one call row (delta-encoded); export puts the token fields back where they were.

Lossless by construction: a value goes into a typed column only when the column's type holds
it exactly; otherwise the raw value stays in ``extras_json`` and export takes it from there.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import orjson

from .._errors import GymFormatError
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


@dataclass
class IngestReport:
    """What one ingest did; ``errors`` holds every malformed line (skipped)."""

    lines: int = 0
    rollouts: int = 0
    calls: int = 0
    skipped_existing: int = 0
    bytes_read: int = 0
    errors: list[GymFormatError] = field(default_factory=list)
    token_status: dict[str, int] = field(default_factory=dict)


def _loads(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        # Python's json writes NaN/Infinity (a -inf logprob, say), which strict JSON lacks.
        return json.loads(line)


def _rollout_id(line: bytes) -> str:
    return hashlib.blake2b(line.rstrip(b"\r\n"), digest_size=10).hexdigest()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _token_array(values: Any, dtype: Any, what: str, where: str) -> np.ndarray:
    if not isinstance(values, list):
        raise ValueError(f"{where}: {what} is {type(values).__name__}, expected a list")
    try:
        arr = np.array(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{where}: {what} holds a non-number ({e})") from None
    if arr.ndim != 1:
        raise ValueError(f"{where}: {what} must be a flat list")
    if dtype is np.int64 and arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{where}: {what} holds token IDs outside 0..2^31-1")
    return arr


def line_to_records(line: bytes, data: Any, source: str) -> tuple[RolloutRecord, list[CallRecord]]:
    """Split one parsed Gym line into a rollout record and its call records.

    Raises ValueError (with the reason) for a malformed line; ``data`` is modified in place.
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
        reward = float(reward) if isinstance(reward, int) else None
    task_index, repeat_index = data.get(_TASK), data.get(_REPEAT)
    for key, v in ((_TASK, task_index), (_REPEAT, repeat_index)):
        if v is not None and not _is_int(v):
            extras[key] = v
    task_index = task_index if _is_int(task_index) else None
    repeat_index = repeat_index if _is_int(repeat_index) else None
    agent_ref = data.get("agent_ref")
    env = agent_ref.get("name") if isinstance(agent_ref, dict) and isinstance(agent_ref.get("name"), str) else None
    if task_index is not None:
        group_key = f"{env or ''}#{task_index}"
    else:
        task_input = rcp.get("input") if isinstance(rcp, dict) else rcp
        group_key = "input:" + hashlib.blake2b(orjson.dumps(task_input), digest_size=8).hexdigest()

    status, reason = "ok", None
    if data.get("failure_kind"):
        status, reason = "failed", str(data.get("failure_reason") or data["failure_kind"])
    elif isinstance(response, dict) and (response.get("error") or response.get("status") == "failed"):
        status, reason = "failed", orjson.dumps(response.get("error")).decode() if response.get("error") else "response failed"
    elif isinstance(response, dict) and response.get("status") == "incomplete":
        details = response.get("incomplete_details")
        status = "truncated"
        reason = str(details.get("reason")) if isinstance(details, dict) else "incomplete"

    params = rcp if isinstance(rcp, dict) else {}
    model = response.get("model") if isinstance(response, dict) else None
    calls: list[CallRecord] = []
    token_items = []
    if isinstance(output, list):
        token_items = [i for i, it in enumerate(output) if isinstance(it, dict) and any(f in it for f in TOKEN_FIELDS)]
    for n, i in enumerate(token_items):
        item = output[i]  # type: ignore[index]
        where = f"response.output[{i}]"
        missing = [f for f in TOKEN_FIELDS if f not in item]
        if missing:
            raise ValueError(f"{where} has some token fields but not {', '.join(missing)}")
        prompt = _token_array(item.pop("prompt_token_ids"), np.int64, "prompt_token_ids", where)
        gen = _token_array(item.pop("generation_token_ids"), np.int64, "generation_token_ids", where)
        logprobs = _token_array(item.pop("generation_log_probs"), np.float64, "generation_log_probs", where)
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
                finish_reason=finish,
                temperature=params.get("temperature") if isinstance(params.get("temperature"), (int, float)) else None,
                top_p=params.get("top_p") if isinstance(params.get("top_p"), (int, float)) else None,
                max_tokens=params.get("max_output_tokens") if _is_int(params.get("max_output_tokens")) else None,
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
        token_status=None if calls else "missing",
        input=orjson.dumps(rcp).decode() if _INPUT in data else None,
        response=orjson.dumps(response).decode() if _RESPONSE in data else None,
        extras=orjson.dumps(extras).decode() if extras else None,
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
) -> IngestReport:
    """Convert NeMo Gym rollout JSONL files into a tape (created or appended to).

    Rollouts already on the tape (same line content) are skipped, so re-running an ingest is
    safe. A malformed line is reported in ``IngestReport.errors`` and skipped, or raised as
    :class:`GymFormatError` with ``strict=True``.
    """
    report = IngestReport()
    storage = writer.storage if writer is not None else TapeStorage(tape)  # a local folder or a URL
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
                try:
                    rollout, calls = line_to_records(line, _loads(line), f"{src}:{line_no}")
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
    """Rebuild each rollout's Gym line (dict), in the order the rollouts were written."""
    calls_index = tape.calls_by_rollout(("generation_logprobs", "output_json"))
    rollouts = tape.read("rollouts")
    cols = {c: rollouts.column(c).to_pylist() for c in (
        "rollout_id", "input_json", "response_json", "extras_json", "gym_keys", "reward", "task_index", "rollout_index",
        "call_item_indices")}
    for r in range(rollouts.num_rows):
        rid = cols["rollout_id"][r]
        calls = calls_index.get(rid) if rid in calls_index else None
        response = orjson.loads(cols["response_json"][r]) if cols["response_json"][r] is not None else None
        if calls is not None:
            response = _put_token_fields(response, calls, cols["call_item_indices"][r])
        extras = orjson.loads(cols["extras_json"][r]) if cols["extras_json"][r] else {}
        typed = {
            _INPUT: orjson.loads(cols["input_json"][r]) if cols["input_json"][r] is not None else None,
            _RESPONSE: response,
            _REWARD: cols["reward"][r],
            _TASK: cols["task_index"][r],
            _REPEAT: cols["rollout_index"][r],
        }
        keys = cols["gym_keys"][r] or [k for k in _TYPED_KEYS if typed[k] is not None] + list(extras)
        yield {k: extras[k] if k in extras else typed.get(k) for k in keys}


def _put_token_fields(response: Any, calls: dict[str, Any], item_indices: list[int] | None) -> Any:
    """Put each call's three token fields back on its output item (or synthesise items)."""
    if response is None:
        response = {"output": []}
    output = response.setdefault("output", [])
    for k in range(len(calls["prompt_ids"])):
        idx = item_indices[k] if item_indices is not None and k < len(item_indices) else None
        if idx is None:
            item = orjson.loads(calls["output_json"][k]) if calls["output_json"][k] else {"type": "message", "role": "assistant"}
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
    # orjson writes NaN/inf as null; fall back to json (NaN/Infinity) only when a float is not finite.
    data = orjson.dumps(line)
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
