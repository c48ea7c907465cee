"""Property: every generated JSONL line is either ingested faithfully (exported again with every
value as it was; token IDs exactly, logprobs as float32) or reported as malformed with a reason;
never a traceback, never a changed value. Lines are drawn by hypothesis from Gym-shaped objects
with hostile values in every slot, plus non-objects and raw bytes.

The oracle (:func:`_expect`) states the ingest rules independently of the code: a line is
malformed when it is not a JSON object, when ``_gymtape_env`` is neither a string nor null, or
when an output item carrying token fields lacks one of the three, has a token ID that is not an
integer in 0..2^31-1, a logprob that is not a number (or an integer no float holds), or
generation IDs and logprobs of different lengths. It is flagged (``invalid_logprobs``) when a
logprob is NaN, infinite, above 1e-6 or beyond float32."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recorder import Tape, export_gym_jsonl, ingest_gym_jsonl

TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")

leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
value = st.recursive(leaf, lambda kids: st.lists(kids, max_size=3)
                     | st.dictionaries(st.text(max_size=5), kids, max_size=3), max_leaves=8)
hostile_id = st.one_of(st.integers(-3, 5), st.sampled_from([2**31 - 1, 2**31, 2**32, 2**63, 2**70, -2**63]),
                       st.floats(allow_nan=True), st.sampled_from([1.0, 1.5, -0.0]), st.booleans(), st.text(max_size=2),
                       st.none(), st.lists(st.integers(0, 9), max_size=2))
ids = st.one_of(st.lists(st.integers(0, 2**31 - 1), max_size=8), st.lists(hostile_id, max_size=4))
valid_logprob = st.floats(max_value=0.0, allow_nan=False, allow_infinity=False)
hostile_logprob = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5),
                            st.sampled_from([-10**400, 10**400, -1e40, 1e-7, 2e-6, -0.0]), st.booleans(),
                            st.text(max_size=2), st.none())


@st.composite
def token_item(draw: st.DrawFn) -> dict[str, Any]:
    gen = draw(ids)
    n = len(gen) if draw(st.booleans()) else draw(st.integers(0, 4))
    logprobs = draw(st.lists(st.one_of(valid_logprob, hostile_logprob) if draw(st.booleans()) else valid_logprob,
                             min_size=n, max_size=n))
    item: dict[str, Any] = {"type": "message", "role": "assistant", "prompt_token_ids": draw(ids),
                            "generation_token_ids": gen, "generation_log_probs": logprobs}
    if draw(st.integers(0, 9)) == 0:
        del item[draw(st.sampled_from(TOKEN_FIELDS))]
    if draw(st.booleans()):
        item.update(draw(st.dictionaries(st.text(max_size=4), value, max_size=2)))
    return item


@st.composite
def gym_line(draw: st.DrawFn) -> Any:
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return draw(value)  # not always an object
    if kind == 1:
        return draw(st.binary(min_size=1, max_size=12).filter(lambda b: b"\n" not in b and b.strip()))
    output = draw(st.lists(st.one_of(token_item(), value), max_size=4))
    response = draw(st.one_of(st.just({"output": output, "status": draw(st.sampled_from(
        ["completed", "incomplete", "failed"]))}), st.just({"output": output}), value))
    slots = {
        "responses_create_params": st.one_of(st.fixed_dictionaries({"input": value}, optional={
            "temperature": leaf, "top_p": leaf, "max_output_tokens": leaf}), value),
        "response": st.just(response),
        "reward": leaf,
        "_ng_task_index": st.one_of(st.integers(-2, 10), leaf),
        "_ng_rollout_index": st.one_of(st.integers(0, 3), leaf),
        "agent_ref": st.one_of(st.fixed_dictionaries({"name": st.text(max_size=5)}), value),
        "_gymtape_env": st.one_of(st.text(max_size=5), st.none(), leaf),
        "failure_kind": leaf,
        "verifier_extra": value,
    }
    keys = draw(st.lists(st.sampled_from(sorted(slots)), unique=True, max_size=len(slots)))
    if "response" not in keys and draw(st.booleans()):
        keys.append("response")
    return {k: draw(slots[k]) for k in keys}


def _expect(text: bytes) -> tuple[bool, bool]:
    """(malformed, flagged) by the rules in the module doc."""
    try:
        data = json.loads(text)
        json.dumps(data, ensure_ascii=False).encode()
    except (ValueError, RecursionError):
        return True, False
    if not isinstance(data, dict):
        return True, False
    if "_gymtape_env" in data and data["_gymtape_env"] is not None and not isinstance(data["_gymtape_env"], str):
        return True, False
    response = data.get("response")
    output = response.get("output") if isinstance(response, dict) else None
    flagged = False
    for item in output if isinstance(output, list) else []:
        if not isinstance(item, dict) or not any(f in item for f in TOKEN_FIELDS):
            continue
        if not all(f in item for f in TOKEN_FIELDS):
            return True, False
        for f in TOKEN_FIELDS[:2]:
            v = item[f]
            if not isinstance(v, list) or not all(type(x) is int and 0 <= x <= 2**31 - 1 for x in v):
                return True, False
        lps = item["generation_log_probs"]
        if not isinstance(lps, list) or not all(type(x) in (int, float) for x in lps):
            return True, False
        if any(type(x) is int and abs(x) > 1e308 for x in lps):
            return True, False
        if len(lps) != len(item["generation_token_ids"]):
            return True, False
        for x in map(float, lps):
            with np.errstate(over="ignore"):
                if not math.isfinite(x) or x > 1e-6 or not np.isfinite(np.float32(x)):
                    flagged = True
    return False, flagged


def _split(line: dict[str, Any]) -> tuple[str, list[Any]]:
    """The line as JSON text without its token fields (types and NaN kept apart by the text), and
    the token fields: IDs as they are, logprobs as float32 bits."""
    line = json.loads(json.dumps(line))
    fields = []
    output = line.get("response", {}).get("output") if isinstance(line.get("response"), dict) else None
    for i, item in enumerate(output if isinstance(output, list) else []):
        if isinstance(item, dict) and any(f in item for f in TOKEN_FIELDS):
            with np.errstate(over="ignore"):
                lp = np.asarray([float(x) for x in item.pop("generation_log_probs")], np.float32).tobytes()
            fields.append((i, item.pop("prompt_token_ids"), item.pop("generation_token_ids"), lp))
    return json.dumps(line), fields


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(gym_line(), min_size=1, max_size=6))
def test_every_line_is_ingested_faithfully_or_reported_malformed(lines: list[Any]) -> None:
    texts = []
    for n, line in enumerate(lines):
        if isinstance(line, dict):
            line = {**line, "_fuzz_line": n}  # every line differs, so none is "already on the tape"
        texts.append(line if isinstance(line, bytes) else json.dumps(line).encode())
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        src.write_bytes(b"".join(t + b"\n" for t in texts))
        report = ingest_gym_jsonl([src], Path(tmp) / "tape")  # must not raise, whatever the lines
        expected = [_expect(t) for t in texts]
        assert report.lines == len(texts)
        malformed = {e.line_no for e in report.errors}
        want_malformed = {n + 1 for n, (bad, _) in enumerate(expected) if bad}
        assert malformed == want_malformed, [(e.line_no, e.reason) for e in report.errors]
        assert all(e.reason and str(src) in str(e) for e in report.errors), "each error names the file and why"
        kept = [n for n, (bad, _) in enumerate(expected) if not bad]
        assert report.rollouts == len(kept) and report.skipped_existing == 0
        if not kept:
            return
        tape = Tape(Path(tmp) / "tape")
        statuses = tape.read("rollouts", ["token_status"]).column("token_status").to_pylist()
        assert [s == "invalid_logprobs" for s in statuses] == [expected[n][1] for n in kept], "flagged iff invalid"
        out = Path(tmp) / "out.jsonl"
        with open(out, "wb") as f:
            assert export_gym_jsonl(tape, f) == len(kept)
        back = [json.loads(x) for x in out.read_bytes().splitlines()]
        for n, exported in zip(kept, back):
            original = json.loads(texts[n])
            assert list(exported) == list(original), f"line {n + 1}: keys or their order changed"
            assert _split(exported) == _split(original), f"line {n + 1}: a value changed: {texts[n][:300]!r}"
