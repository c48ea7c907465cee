"""`gymtape check`: structural train-generation consistency checks over a tape (no model needed).

Per shard: a shard that cannot be read (a damaged footer or page, a failed page checksum, the
wrong schema) is an **unreadable_shard** problem naming it; the rest of the tape is checked
without its rows (so rollouts whose calls were in it show up as missing_calls too).

Per rollout row, referential integrity (:func:`recorder.rollout_integrity`, the rule every
reader shares):

* **missing_calls**: the row says ``num_calls = n`` but some of the call indices ``0 .. n-1``
  have no call row (fewer rows, or a gap): a model server killed before its calls were durable
  leaves these. Trainers skip such rollouts; ``gymtape record --resume --retry-failed`` re-runs them.
* **incomplete**: ``token_status = "incomplete"``, a call that failed to be captured (NeMo
  Gym's ``mark_incomplete``): never trained on.

A row that a later row of the same (env, task, repeat) replaced (``--retry-failed``) is
*superseded*: counted, not a problem.

Per call, four checks:

* **re-tokenization**: the generated IDs are decoded and encoded again. A trainer that works
  from text sees the re-encoded IDs; where they differ from the sampled ones (a ``merge``: the
  re-encoding is shorter; a ``split``: same text, different split) it scores tokens the model
  never produced.
* **re-templating**: the call's request messages (rebuilt from the delta encoding) are rendered
  with the chat template exactly as ``gymtape serve`` renders a request, but *without* the
  on-policy splice, and compared with the recorded prompt. The first divergence is reported
  and classified (``tool_call_format``, ``reasoning_stripped``, ``retokenization``, ``other``).
  Ingested NeMo Gym calls carry no messages: theirs are rebuilt from the rollout line
  (:func:`recorder.gym_call_requests`, as Gym's model server converts Responses items). The
  template is ``chat_template`` when given, else the one ``gymtape serve --chat-template``
  recorded in the tape's run manifests, else the tokenizer's.
* **history**: a call whose prompt does not extend the previous call's context (its
  ``prefix_len`` is shorter than the previous prompt + generation): a rewrite, truncation or
  summary of the conversation.
* **fields**: generation/logprob lengths, ``prompt_len`` against the rebuilt prompt, NaN/inf/
  positive logprobs, token IDs outside the tokenizer's vocabulary. The tokenizer itself is
  chosen and compared with ``tape.json`` by :func:`recorder.resolve_tokenizer`: a different one
  is refused unless allowed, and then reported as a ``tokenizer_mismatch`` problem.

The off-policy fraction answers "would a trainer that re-templates messages be off-policy on
this tape?": the share of generated tokens (over calls whose request messages are on the tape)
in calls whose naively re-templated prompt differs from the recorded one.

Speed: field checks are numpy over whole columns; decoding and encoding go through the fast
(Rust) tokenizer in batches; first-call prompts shared by a GRPO group are rendered once.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from recorder import (INTEGRITY_ROLLOUT_COLUMNS, CorruptShardError, GymConversionError, ListColumn, Tape,
                      broken_rollouts, common_prefix_len, gym_call_requests, resolve_tokenizer, rollout_integrity,
                      run_manifests)
from ._replay import ReplayError

SCHEMA_VERSION = 1

#: Problem types, in the order they are reported.
PROBLEM_TYPES = (
    "unreadable_shard",
    "missing_calls",
    "incomplete",
    "retokenization",
    "retemplate",
    "history",
    "length_mismatch",
    "prompt_len_mismatch",
    "logprob_nan",
    "logprob_inf",
    "logprob_positive",
    "token_out_of_vocab",
    "tokenizer_mismatch",
)
RETEMPLATE_CATEGORIES = ("tool_call_format", "reasoning_stripped", "retokenization", "other", "render_error")
RETOKENIZATION_KINDS = ("merge", "split")

#: Logprobs above this are impossible (log of a probability > 1), float32 rounding aside.
POSITIVE_LOGPROB_TOL = 1e-6
_CONTEXT = 8  # tokens of context shown on each side of a divergence
_BATCH_CALLS = 4096  # calls per batch of decode/render/encode work
_CACHE_MAX = 8192  # rendered first-call prompts kept


@dataclass
class Problem:
    """One finding. ``detail`` holds the type-specific fields (see :meth:`CheckReport.to_dict`)."""

    type: str
    rollout_id: str | None
    call_index: int | None
    call_id: str | None
    message: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "rollout_id": self.rollout_id, "call_index": self.call_index,
                "call_id": self.call_id, "message": self.message, **self.detail}


@dataclass
class RolloutVerdict:
    rollout_id: str
    calls: int
    problems: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"rollout_id": self.rollout_id, "calls": self.calls, "verdict": "ok" if self.ok else "problems",
                "problems": dict(self.problems)}


@dataclass
class CheckReport:
    """What :func:`check_tape` found. ``to_dict()`` is the stable JSON form (``schema_version`` 1)."""

    tape: str
    tokenizer: dict[str, str] | None
    tape_tokenizer: dict[str, str] | None
    rollouts: int = 0
    calls: int = 0
    #: Rollout rows on the tape, and those a retry of the same (env, task, repeat) replaced.
    rollout_rows: int = 0
    rollouts_superseded: int = 0
    #: Shards that cannot be read (their rows were left out of the check), by path.
    unreadable_shards: list[str] = field(default_factory=list)
    #: Every rollout row that points at missing calls or is incomplete, named (see
    #: :func:`recorder.broken_rollouts`; ``missing_call_indices`` lists the first few gaps).
    broken_rollouts: list[dict[str, Any]] = field(default_factory=list)
    #: Calls whose request messages are on the tape (the re-templating check ran on them).
    checkable_calls: int = 0
    #: Calls without request messages (neither on the tape nor rebuildable) or without token IDs.
    not_checkable: int = 0
    #: Calls whose request messages were rebuilt from their NeMo Gym rollout line (ingested
    #: tapes: ``responses_create_params`` + the output items, as Gym's model server converts them).
    rebuilt_calls: int = 0
    #: Which chat template rendered the requests: ``"tokenizer"`` (the tokenizer's own), or where
    #: the override came from (``--chat-template FILE``, or the tape's ``gymtape serve --chat-template``).
    chat_template: str = "tokenizer"
    generated_tokens: int = 0
    checkable_generated_tokens: int = 0
    off_policy_tokens: int = 0
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROBLEM_TYPES, 0))
    retemplate_categories: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RETEMPLATE_CATEGORIES, 0))
    retokenization_kinds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RETOKENIZATION_KINDS, 0))
    warnings: list[str] = field(default_factory=list)
    verdicts: list[RolloutVerdict] = field(default_factory=list)
    #: The first ``max_examples`` problems of each type, with their context.
    examples: list[Problem] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def problems(self) -> int:
        return sum(self.totals.values())

    @property
    def ok(self) -> bool:
        return self.problems == 0

    @property
    def off_policy_fraction(self) -> float | None:
        if self.checkable_generated_tokens == 0:
            return None
        return self.off_policy_tokens / self.checkable_generated_tokens

    @property
    def calls_per_s(self) -> float | None:
        return self.calls / self.elapsed_s if self.elapsed_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "tape": self.tape,
            "ok": self.ok,
            "problems": self.problems,
            "tokenizer": self.tokenizer,
            "tape_tokenizer": self.tape_tokenizer,
            "rollouts": self.rollouts,
            "rollouts_with_problems": sum(not v.ok for v in self.verdicts),
            "rollout_rows": self.rollout_rows,
            "rollouts_missing_calls": self.totals["missing_calls"],
            "rollouts_incomplete": self.totals["incomplete"],
            "rollouts_superseded": self.rollouts_superseded,
            "broken_rollouts": list(self.broken_rollouts),
            "unreadable_shards": list(self.unreadable_shards),
            "calls": self.calls,
            "checkable_calls": self.checkable_calls,
            "not_checkable": self.not_checkable,
            "rebuilt_calls": self.rebuilt_calls,
            "chat_template": self.chat_template,
            "generated_tokens": self.generated_tokens,
            "checkable_generated_tokens": self.checkable_generated_tokens,
            "off_policy_tokens": self.off_policy_tokens,
            "off_policy_fraction": self.off_policy_fraction,
            "totals": dict(self.totals),
            "retemplate_categories": dict(self.retemplate_categories),
            "retokenization_kinds": dict(self.retokenization_kinds),
            "warnings": list(self.warnings),
            "verdicts": [v.to_dict() for v in self.verdicts],
            "examples": [p.to_dict() for p in self.examples],
            "elapsed_s": self.elapsed_s,
        }


# -- tokenizer access ---------------------------------------------------------------------


class _Tok:
    """Batch decode/encode through the Rust backend when it agrees with the Python API."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.n_vocab = len(tokenizer)
        backend = getattr(tokenizer, "_tokenizer", None)
        self.backend = backend if backend is not None and hasattr(backend, "encode_batch") else None
        self.cleanup = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self._verified = False
        self._token_cache: dict[int, str] = {}

    def _verify(self, seqs: list[list[int]], texts: list[str]) -> None:
        """Check the fast path against ``tokenizer.decode``/``encode`` on a few samples."""
        self._verified = True
        if self.backend is None:
            return
        for ids, text in list(zip(seqs, texts))[:8]:
            slow_text = self.tok.decode(ids, skip_special_tokens=False)
            slow_ids = list(self.tok.encode(text, add_special_tokens=False))
            fast_ids = self.backend.encode(text, add_special_tokens=False).ids
            if slow_text != self._decode_fast([ids])[0] or slow_ids != fast_ids:
                self.backend = None
                return

    def _decode_fast(self, seqs: list[list[int]]) -> list[str]:
        texts = self.backend.decode_batch(seqs, skip_special_tokens=False)
        if self.cleanup:
            texts = [self.tok.clean_up_tokenization(t) for t in texts]
        return texts

    def decode_batch(self, seqs: list[list[int]]) -> list[str]:
        if self.backend is not None:
            texts = self._decode_fast(seqs)
            if not self._verified:
                self._verify(seqs, texts)
                if self.backend is None:
                    return self.decode_batch(seqs)
            return texts
        return [self.tok.decode(s, skip_special_tokens=False) for s in seqs]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return [list(self.tok.encode(t, add_special_tokens=False)) for t in texts]

    def decode(self, ids: Any) -> str:
        """Display text; IDs outside the vocabulary show as ``<id?>``."""
        ids = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        if not ids or (min(ids) >= 0 and max(ids) < self.n_vocab):
            return self.decode_batch([ids])[0]
        out, run = [], []
        for i in ids:
            if 0 <= i < self.n_vocab:
                run.append(i)
            else:
                if run:
                    out.append(self.decode_batch([run])[0])
                    run = []
                out.append(f"<{i}?>")
        if run:
            out.append(self.decode_batch([run])[0])
        return "".join(out)

    def tokens(self, ids: Any) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            s = self._token_cache.get(i)
            if s is None:
                s = (self.tok.convert_ids_to_tokens(i) if 0 <= i < self.n_vocab else None) or f"<{i}?>"
                self._token_cache[i] = s
            out.append(s)
        return out

    def side(self, ids: np.ndarray, start: int, n: int = _CONTEXT) -> dict[str, Any]:
        part = ids[start : start + n]
        return {"ids": [int(i) for i in part], "tokens": self.tokens(part), "text": self.decode(part)}


class _Renderer:
    """Chat messages → prompt IDs, as recorder._prompting.PromptBuilder.render does (no splice).

    ``chat_template``: template text rendering instead of the tokenizer's, on a shallow copy (the
    caller's tokenizer keeps its own)."""

    def __init__(self, tokenizer: Any, tok: _Tok, chat_template: str | None = None) -> None:
        import copy

        from recorder import PromptBuilder

        if chat_template is not None:
            tokenizer = copy.copy(tokenizer)
            tokenizer.chat_template = chat_template
        self.tok = tok
        self.tokenizer = tokenizer
        self.builder: Any = None
        self.error: str | None = None
        try:
            self.builder = PromptBuilder(tokenizer)
        except ValueError as e:
            self.error = str(e)

    def text(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        tmsgs = self.builder._template_messages(messages)
        return self.tokenizer.apply_chat_template(tmsgs, tools=tools, tokenize=False, add_generation_prompt=True)


# -- the check ----------------------------------------------------------------------------


class _State:
    def __init__(self, report: CheckReport, max_examples: int) -> None:
        self.report = report
        self.max_examples = max_examples
        self.kept: Counter[str] = Counter()
        self.per_rollout: dict[str, Counter[str]] = {}

    def wants_example(self, type_: str) -> bool:
        return self.kept[type_] < self.max_examples

    def add(self, type_: str, rollout_id: str | None, call_index: int | None, call_id: str | None,
            message: str, detail: dict[str, Any] | None = None) -> None:
        self.report.totals[type_] += 1
        if rollout_id is not None:
            self.per_rollout.setdefault(rollout_id, Counter())[type_] += 1
        if self.kept[type_] < self.max_examples:
            self.kept[type_] += 1
            self.report.examples.append(Problem(type_, rollout_id, call_index, call_id, message, detail or {}))


_COLUMNS = ["call_id", "rollout_id", "call_index", "prefix_len", "prompt_suffix_ids", "prompt_len", "generation_ids",
            "generation_logprobs", "token_status", "messages_prefix_len", "new_messages_json", "tools_json"]


def check_tape(tape: Tape | str | os.PathLike[str], tokenizer: Any = None, *, max_examples: int = 20,
               tokenizer_dir: str | os.PathLike[str] | None = None,
               allow_tokenizer_mismatch: bool = False,
               chat_template: str | os.PathLike[str] | None = None) -> CheckReport:
    """Run the structural checks over every call of ``tape``.

    Args:
        tape: a :class:`recorder.Tape` or its directory.
        tokenizer: a transformers tokenizer, a tokenizer directory, or None for the tape's own
            (found by :func:`recorder.resolve_tokenizer`, the one policy every command uses).
        max_examples: problems of each type kept with their context in ``examples``
            (all are counted).
        tokenizer_dir: directory a loaded ``tokenizer`` came from, for the identity check
            against ``tape.json`` (default: its ``name_or_path`` when that is a local directory).
        allow_tokenizer_mismatch: check with a tokenizer whose identity differs from the
            tape's instead of raising :class:`recorder.TokenizerMismatchError`; the mismatch is
            then a ``tokenizer_mismatch`` problem and a warning.
        chat_template: a Jinja chat template file (or the template's text) that renders the
            requests instead of the tokenizer's; default: the one ``gymtape serve
            --chat-template`` recorded in the tape's run manifests, if any, else the tokenizer's.
    """
    t0 = time.perf_counter()
    if not isinstance(tape, Tape):
        tape = Tape(tape)
    loaded = tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike))
    if loaded and tokenizer_dir is not None:
        resolved = resolve_tokenizer(tape, tokenizer_dir, allow_mismatch=allow_tokenizer_mismatch, load=False)
    else:
        resolved = resolve_tokenizer(tape, tokenizer, allow_mismatch=allow_tokenizer_mismatch)
        tokenizer = resolved.tokenizer
    ident = resolved.identity
    recorded = tape.meta.tokenizer
    report = CheckReport(tape=tape.location, tokenizer=ident.to_dict() if ident else None,
                         tape_tokenizer=recorded.to_dict() if recorded else None, warnings=list(resolved.warnings))
    st = _State(report, max_examples)
    tok = _Tok(tokenizer)
    template_text = _chat_template(tape, chat_template, report)
    if resolved.mismatch is not None and ident is not None and recorded is not None:
        st.add("tokenizer_mismatch", None, None, None, resolved.mismatch,
               {"tape_tokenizer": recorded.to_dict(), "tokenizer": ident.to_dict()})

    unreadable: list[CorruptShardError] = []
    table = tape.read("calls", _COLUMNS, unreadable=unreadable).sort_by([("rollout_id", "ascending"),
                                                                        ("call_index", "ascending")])
    report.calls = table.num_rows
    ranges: dict[str, tuple[int, int]] = {}
    if table.num_rows:
        cols = _Columns(table)
        ranges = cols.ranges
        _field_checks(cols, tok, st)
        _rebuild_gym_requests(tape, cols, st)
        _walk(cols, tok, _Renderer(tokenizer, tok, template_text), st)
    _integrity(tape, table, ranges, st, unreadable)
    for e in unreadable:
        report.unreadable_shards.append(e.path)
        st.add("unreadable_shard", None, None, None, str(e), {"shard": e.path})
    report.rollouts = len(ranges)
    report.verdicts = [RolloutVerdict(rid, b - a, dict(sorted(st.per_rollout.get(rid, {}).items())))
                       for rid, (a, b) in ranges.items()]
    # Rollouts flagged with no call on the tape at all have no range: give them a verdict too.
    report.verdicts += [RolloutVerdict(b["rollout_id"], 0, dict(sorted(st.per_rollout[b["rollout_id"]].items())))
                        for b in report.broken_rollouts if b["rollout_id"] not in ranges]
    report.examples.sort(key=lambda p: PROBLEM_TYPES.index(p.type))
    report.elapsed_s = time.perf_counter() - t0
    return report


def _integrity(tape: Tape, calls: Any, ranges: dict[str, tuple[int, int]], st: _State,
               unreadable: list[CorruptShardError]) -> None:
    """Rollout rows whose calls are missing, and incomplete ones: one problem per rollout."""
    rollouts = tape.read("rollouts", INTEGRITY_ROLLOUT_COLUMNS, unreadable=unreadable)
    report = st.report
    report.rollout_rows = rollouts.num_rows
    if rollouts.num_rows == 0:
        return
    integrity = rollout_integrity(rollouts, calls.select(["rollout_id", "call_index"]))
    report.rollouts_superseded = int(integrity.superseded.sum())
    index = calls.column("call_index") if calls.num_rows else None
    for b in broken_rollouts(rollouts, integrity):
        rid, n = b["rollout_id"], b["num_calls"]
        a, z = ranges.get(rid, (0, 0))
        present = set(index.slice(a, z - a).to_pylist()) if index is not None and z > a else set()
        b["missing_call_indices"] = [i for i in range(n) if i not in present][:8]
        report.broken_rollouts.append(b)
        where = f"{b.get('env') or '-'} task {b.get('task_index')} repeat {b.get('rollout_index')}"
        if b["problem"] == "incomplete":
            st.add("incomplete", rid, None, None,
                   f"rollout ({where}) is marked incomplete: a model call failed to be captured, so its "
                   "token chain has a hole; trainers skip it. Re-run it: gymtape record --resume --retry-failed",
                   {k: b[k] for k in ("env", "task_index", "rollout_index", "num_calls", "calls_found") if k in b})
        else:
            st.add("missing_calls", rid, None, None,
                   f"rollout ({where}) says num_calls = {n} but the tape holds {b['calls_found']} of them (missing "
                   f"call index {', '.join(map(str, b['missing_call_indices']))}{', ...' if n - b['calls_found'] > 8 else ''}"
                   "): the calls were lost, e.g. a model server killed before they were durable. Trainers skip it; "
                   "re-run it: gymtape record --resume --retry-failed",
                   {k: b[k] for k in ("env", "task_index", "rollout_index", "num_calls", "calls_found",
                                      "missing_call_indices") if k in b})


_TEMPLATE_MARKS = ("{%", "{{")


def _chat_template(tape: Tape, given: str | os.PathLike[str] | None, report: CheckReport) -> str | None:
    """The template text that renders requests (None: the tokenizer's), and where it came from."""
    if given is not None:
        text = _template_text(given)
        if text is None:
            raise ReplayError(f"chat template {str(given)!r} is neither a readable file nor Jinja template text; "
                              "pass the path of a .jinja file")
        report.chat_template = f"{given}" if not _is_template(str(given)) else "given as text"
        return text
    recorded = sorted({str(run["config"]["chat_template"]) for run in run_manifests(tape).values()
                       if isinstance(run.get("config"), dict) and run["config"].get("chat_template")})
    if not recorded:
        return None
    if len(recorded) > 1:
        report.warnings.append(f"the tape was recorded with {len(recorded)} different chat templates "
                               f"({', '.join(map(repr, recorded))}); rendering with the first. Pass --chat-template "
                               "to choose")
    text = _template_text(recorded[0])
    if text is None:
        report.warnings.append(f"the tape was recorded by gymtape serve --chat-template {recorded[0]!r}, which is not "
                               "found here: rendering with the tokenizer's template instead, so re-templating "
                               "differences may be the template's. Pass --chat-template FILE")
        return None
    report.chat_template = f"recorded: {recorded[0]}" if not _is_template(recorded[0]) else "recorded (text)"
    return text


def _is_template(s: str) -> bool:
    return any(m in s for m in _TEMPLATE_MARKS)


def _template_text(value: str | os.PathLike[str]) -> str | None:
    """A template file's text, or ``value`` itself when it is template text (as `gymtape serve`
    takes either); None when it is neither."""
    s = os.fspath(value)
    if _is_template(s):
        return s
    try:
        with open(s, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


#: What a rollout row holds of its Gym line: enough to rebuild each call's chat request.
_GYM_ROLLOUT_COLUMNS = ["rollout_id", "input_json", "response_json", "call_item_indices"]


def _rebuild_gym_requests(tape: Tape, c: _Columns, st: _State) -> None:
    """Give ingested Gym calls (no request messages on the tape) the chat request Gym's model
    server sent for them, rebuilt from their rollout line by :func:`recorder.gym_call_requests`,
    delta-encoded into ``c`` exactly as a recorded tape stores messages, so the walk re-templates
    them like any other call. Rollouts that cannot be rebuilt stay not checkable, with a warning."""
    need = [rid for rid, (a, b) in c.ranges.items() if all(c.new_messages_json[r] is None for r in range(a, b))]
    if not need:
        return
    # Shards that cannot be read are reported once, by _integrity's read of the same table.
    table = tape.read("rollouts", _GYM_ROLLOUT_COLUMNS, unreadable=[])
    table = table.filter(pc.is_in(table.column("rollout_id"), value_set=pa.array(need, pa.string())))
    rows = {rid: (inp, resp, idx) for rid, inp, resp, idx in zip(*(table.column(k).to_pylist()
                                                                     for k in _GYM_ROLLOUT_COLUMNS))}
    failed: Counter[str] = Counter()  # why → calls
    bare = 0
    for rid in need:
        a, b = c.ranges[rid]
        row = rows.get(rid)
        if row is None or row[0] is None and row[1] is None:  # not a Gym line: nothing to rebuild from
            continue
        if any(v is None for v in row):
            bare += b - a
            continue
        try:
            requests = gym_call_requests(*row)
        except GymConversionError as e:
            failed[str(e)] += b - a
            continue
        prev: list[Any] | None = None
        prev_tools: str | None = None
        for r in range(a, b):
            ci = c.call_index[r]
            if not 0 <= ci < len(requests):
                failed[f"call index {ci} has no output item of its own (the rollout line names {len(requests)} "
                       "model calls)"] += 1
                prev = None
                continue
            messages, tools = requests[ci]
            tools_json = orjson.dumps(tools).decode() if tools is not None else None
            mpl = 0
            if prev is not None and tools_json == prev_tools:
                while mpl < min(len(prev), len(messages)) and prev[mpl] == messages[mpl]:
                    mpl += 1
            c.messages_prefix_len[r] = mpl
            c.new_messages_json[r] = orjson.dumps(messages[mpl:]).decode()
            c.tools_json[r] = tools_json if mpl == 0 or tools_json != prev_tools else None
            prev, prev_tools = messages, tools_json
            st.report.rebuilt_calls += 1
    if failed:
        (why, n), more = failed.most_common(1)[0], len(failed) - 1
        others = f"; and {more} other reason(s)" if more else ""
        st.report.warnings.append(
            f"{sum(failed.values())} ingested call(s) stay not checkable for re-templating: their chat messages cannot "
            f"be rebuilt from the Gym rollout line ({why}: {n} call(s){others})")
    if bare:
        st.report.warnings.append(
            f"{bare} ingested call(s) stay not checkable for re-templating: their rollout rows lack the Gym request, "
            "response or call_item_indices that rebuild their chat messages")


class _Columns:
    def __init__(self, table: Any) -> None:
        self.suffix = ListColumn(table.column("prompt_suffix_ids"), np.int32)
        self.gen = ListColumn(table.column("generation_ids"), np.int32)
        self.logprobs = ListColumn(table.column("generation_logprobs"), np.float32)
        self.call_id = table.column("call_id").to_pylist()
        self.rollout_id = table.column("rollout_id").to_pylist()
        self.call_index = table.column("call_index").to_pylist()
        self.prefix_len = table.column("prefix_len").to_pylist()
        self.prompt_len = table.column("prompt_len").to_pylist()
        self.token_status = table.column("token_status").to_pylist()
        self.messages_prefix_len = table.column("messages_prefix_len").to_pylist()
        self.new_messages_json = table.column("new_messages_json").to_pylist()
        self.tools_json = table.column("tools_json").to_pylist()
        self.ranges: dict[str, tuple[int, int]] = {}
        rids = self.rollout_id
        start = 0
        for i in range(1, len(rids) + 1):
            if i == len(rids) or rids[i] != rids[start]:
                self.ranges[rids[start]] = (start, i)
                start = i

    def where(self, row: int) -> tuple[str, int, str]:
        return self.rollout_id[row], self.call_index[row], self.call_id[row]


def _rows_of(lc: ListColumn, flat_idx: np.ndarray) -> np.ndarray:
    return np.searchsorted(lc.ends, flat_idx, side="right")


def _flat_hits(lc: ListColumn, mask: np.ndarray) -> np.ndarray:
    """Indices into ``lc.values`` where ``mask`` holds, restricted to values some row owns."""
    idx = np.flatnonzero(mask)
    if idx.size and len(lc):
        idx = idx[(idx >= lc.starts[0]) & (idx < lc.ends[-1])]
    return idx if len(lc) else idx[:0]


def _field_checks(c: _Columns, tok: _Tok, st: _State) -> None:
    """Vectorised checks over whole columns: lengths, logprob values, vocabulary."""
    gl, ll = c.gen.lengths(), c.logprobs.lengths()
    st.report.generated_tokens = int(gl.sum())
    for row in np.flatnonzero(gl != ll).tolist():
        rid, ci, cid = c.where(row)
        st.add("length_mismatch", rid, ci, cid,
               f"generation_ids has {gl[row]} tokens but generation_logprobs {ll[row]}",
               {"generation_len": int(gl[row]), "logprobs_len": int(ll[row])})
    vals = c.logprobs.values
    with np.errstate(invalid="ignore"):
        masks = (("logprob_nan", np.isnan(vals), "NaN"), ("logprob_inf", np.isinf(vals), "infinite"),
                 ("logprob_positive", vals > POSITIVE_LOGPROB_TOL, "positive"))
    for type_, mask, what in masks:
        idx = _flat_hits(c.logprobs, mask)
        if not idx.size:
            continue
        rows = _rows_of(c.logprobs, idx)
        urows, first, counts = np.unique(rows, return_index=True, return_counts=True)
        for row, f, cnt in zip(urows.tolist(), first.tolist(), counts.tolist()):
            rid, ci, cid = c.where(row)
            pos = int(idx[f] - c.logprobs.starts[row])
            st.add(type_, rid, ci, cid, f"{cnt} {what} logprob(s), first at generated token {pos}",
                   {"position": pos, "count": cnt, "value": float(vals[idx[f]])})
    for part, lc in (("prompt", c.suffix), ("generation", c.gen)):
        idx = _flat_hits(lc, lc.values >= tok.n_vocab)
        if not idx.size:
            continue
        rows = _rows_of(lc, idx)
        urows, first, counts = np.unique(rows, return_index=True, return_counts=True)
        for row, f, cnt in zip(urows.tolist(), first.tolist(), counts.tolist()):
            rid, ci, cid = c.where(row)
            pos = int(idx[f] - lc.starts[row]) + (c.prefix_len[row] if part == "prompt" else 0)
            tid = int(lc.values[idx[f]])
            st.add("token_out_of_vocab", rid, ci, cid,
                   f"{cnt} {part} token ID(s) outside the vocabulary ({tok.n_vocab}), first {tid} at {part} "
                   f"position {pos}", {"part": part, "position": pos, "token_id": tid, "count": cnt,
                                       "vocab_size": tok.n_vocab})


def _walk(c: _Columns, tok: _Tok, renderer: _Renderer, st: _State) -> None:
    """Per rollout, in call order: rebuild prompts and messages; batch the tokenizer work."""
    report = st.report
    gl = c.gen.lengths()
    oov_gen = np.zeros(len(c.gen), bool)
    if c.gen.values.size:
        bad = _flat_hits(c.gen, c.gen.values >= tok.n_vocab)
        oov_gen[np.unique(_rows_of(c.gen, bad))] = True
    retok_rows: list[int] = []
    tmpl_jobs: list[tuple[int, np.ndarray, Any, Any, Any]] = []  # row, prompt, messages, tools, cache key
    cache: dict[tuple[str | None, str], np.ndarray] = {}
    if renderer.error is not None:
        report.warnings.append(f"re-templating skipped: {renderer.error}")

    def flush() -> None:
        _retokenize(c, tok, retok_rows, st)
        _retemplate(c, tok, renderer, tmpl_jobs, cache, st)
        retok_rows.clear()
        tmpl_jobs.clear()

    for rid, (a, b) in c.ranges.items():
        context = np.empty(0, np.int32)
        messages: list[Any] | None = None
        tools_str: str | None = None
        tools: Any = None
        broken = False
        for row in range(a, b):
            keep, suffix, gen = c.prefix_len[row], c.suffix[row], c.gen[row]
            _, ci, cid = c.where(row)
            if row > a and keep < context.size:
                detail = {"prefix_len": keep, "previous_context_len": int(context.size),
                          "dropped_tokens": int(context.size - keep)}
                if st.wants_example("history"):
                    detail["before"] = tok.decode(context[max(0, keep - _CONTEXT) : keep])
                    detail["previous"] = tok.side(context, keep)
                    detail["prompt"] = tok.side(suffix, 0)
                st.add("history", rid, ci, cid,
                       f"prompt keeps {keep} of the previous call's {context.size} context tokens "
                       f"(diverges at token {keep})", detail)
            if keep > context.size:
                broken = True
                st.add("prompt_len_mismatch", rid, ci, cid,
                       f"prefix_len {keep} exceeds the previous context ({context.size} tokens): a call of this "
                       "rollout is missing", {"prefix_len": keep, "previous_context_len": int(context.size)})
                prompt = np.asarray(suffix, np.int32)
            else:
                prompt = np.concatenate([context[:keep], suffix]) if keep else suffix
            if not broken and prompt.size != c.prompt_len[row]:
                st.add("prompt_len_mismatch", rid, ci, cid,
                       f"rebuilt prompt has {prompt.size} tokens, prompt_len says {c.prompt_len[row]}",
                       {"prompt_len": c.prompt_len[row], "rebuilt_len": int(prompt.size)})
            # request messages and tools, delta-decoded
            tj = c.tools_json[row]
            if row == a or tj is not None:
                if tj != tools_str:
                    tools = orjson.loads(tj) if tj is not None else None
                tools_str = tj
            nm = c.new_messages_json[row]
            key = None
            if nm is None:
                messages = None
            else:
                mpl = c.messages_prefix_len[row]
                if mpl == 0:
                    key = (tools_str, nm)
                    messages = None if key in cache else orjson.loads(nm)
                else:
                    if messages is None:  # previous call's messages not materialised (cache hit)
                        messages = _messages_upto(c, a, row)
                    messages = messages[:mpl] + orjson.loads(nm)
            ok_tokens = c.token_status[row] in ("ok", "invalid_logprobs")  # the IDs are fine either way
            if gl[row] and ok_tokens and not oov_gen[row]:
                retok_rows.append(row)
            if nm is not None and ok_tokens and not broken and renderer.error is None:
                report.checkable_calls += 1
                report.checkable_generated_tokens += int(gl[row])
                tmpl_jobs.append((row, prompt, messages, tools, key))
            else:
                report.not_checkable += 1
            context = np.concatenate([prompt, gen]) if gen.size else prompt
        if len(retok_rows) >= _BATCH_CALLS or len(tmpl_jobs) >= _BATCH_CALLS:
            flush()
    flush()


def _messages_upto(c: _Columns, a: int, row: int) -> list[Any]:
    """The request messages of call ``row - 1``, rebuilt from the rollout's first call."""
    messages: list[Any] = []
    for r in range(a, row):
        nm = c.new_messages_json[r]
        messages = [] if nm is None else messages[: c.messages_prefix_len[r]] + orjson.loads(nm)
    return messages


def _retokenize(c: _Columns, tok: _Tok, rows: list[int], st: _State) -> None:
    if not rows:
        return
    seqs = [c.gen[r].tolist() for r in rows]
    texts = tok.decode_batch(seqs)
    again = tok.encode_batch(texts)
    for r, ids, text, re_ids in zip(rows, seqs, texts, again):
        if ids == re_ids:
            continue
        g = c.gen[r]
        re_arr = np.asarray(re_ids, np.int32)
        pos = common_prefix_len(g, re_arr)
        kind = "merge" if re_arr.size < g.size else "split"
        st.report.retokenization_kinds[kind] += 1
        rid, ci, cid = c.where(r)
        detail: dict[str, Any] = {"kind": kind, "position": pos, "generated_len": int(g.size),
                                  "reencoded_len": int(re_arr.size)}
        if st.wants_example("retokenization"):
            detail["before"] = tok.decode(g[max(0, pos - _CONTEXT) : pos])
            detail["generated"] = tok.side(g, pos)
            detail["reencoded"] = tok.side(re_arr, pos)
            detail["text"] = tok.decode(g[max(0, pos - _CONTEXT) : pos + _CONTEXT])
        st.add("retokenization", rid, ci, cid,
               f"{kind}: re-encoding the generated text gives different IDs from generated token {pos} "
               f"({g.size} generated, {re_arr.size} re-encoded)", detail)


def _retemplate(c: _Columns, tok: _Tok, renderer: _Renderer, jobs: list[tuple[int, np.ndarray, Any, Any, Any]],
                cache: dict[tuple[str | None, str], np.ndarray], st: _State) -> None:
    if not jobs:
        return
    texts: list[str] = []
    todo: list[int] = []  # indices into jobs that need rendering
    rendered: list[np.ndarray | str | None] = [None] * len(jobs)
    pending: dict[Any, int] = {}  # cache key → job index rendered in this batch
    for j, (row, _prompt, messages, tools, key) in enumerate(jobs):
        if key is not None and key in cache:
            rendered[j] = cache[key]
            continue
        if key is not None and key in pending:
            rendered[j] = pending[key]  # type: ignore[assignment]  # resolved below
            continue
        try:
            texts.append(renderer.text(messages, tools))
        except Exception as e:  # noqa: BLE001 - jinja errors: the template rejected these messages
            rendered[j] = f"{type(e).__name__}: {e}"
            continue
        todo.append(j)
        if key is not None:
            pending[key] = j
    for j, ids in zip(todo, tok.encode_batch(texts)):
        arr = np.asarray(ids, np.int32)
        rendered[j] = arr
        key = jobs[j][4]
        if key is not None:
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[key] = arr
    for j, (row, prompt, _m, _t, key) in enumerate(jobs):
        tpl = rendered[j]
        if isinstance(tpl, int):
            tpl = rendered[tpl]
        rid, ci, cid = c.where(row)
        if isinstance(tpl, str) or tpl is None:
            st.report.retemplate_categories["render_error"] += 1
            st.report.off_policy_tokens += int(c.gen[row].size)
            st.add("retemplate", rid, ci, cid, f"the chat template cannot render the recorded request: {tpl}",
                   {"category": "render_error", "error": tpl})
            continue
        if tpl.size == prompt.size and np.array_equal(tpl, prompt):
            continue
        st.report.off_policy_tokens += int(c.gen[row].size)
        pos = common_prefix_len(prompt, tpl)
        category = _classify(tok, prompt, tpl, pos)
        st.report.retemplate_categories[category] += 1
        detail: dict[str, Any] = {"category": category, "position": pos, "recorded_len": int(prompt.size),
                                  "template_len": int(tpl.size)}
        if st.wants_example("retemplate"):
            detail["before"] = tok.decode(prompt[max(0, pos - _CONTEXT) : pos])
            detail["recorded"] = tok.side(prompt, pos)
            detail["template"] = tok.side(tpl, pos)
        st.add("retemplate", rid, ci, cid,
               f"{category}: the re-templated request differs from the recorded prompt at token {pos} "
               f"({prompt.size} recorded, {tpl.size} templated)", detail)


def _classify(tok: _Tok, rec: np.ndarray, tpl: np.ndarray, pos: int) -> str:
    """Which known cause explains the divergence starting at ``pos``."""
    room = min(rec.size, tpl.size) - pos
    suf = common_prefix_len(rec[::-1][:room], tpl[::-1][:room]) if room > 0 else 0
    end_r, end_t = rec.size - suf, tpl.size - suf
    lo = max(0, pos - _CONTEXT)
    tail = min(suf, _CONTEXT)
    # Same text, other IDs: shared context on both sides keeps multi-byte characters whole.
    if tok.decode(rec[lo : end_r + tail]) == tok.decode(tpl[lo : end_t + tail]):
        return "retokenization"
    lo = max(0, pos - 2 * _CONTEXT)
    text_r = tok.decode(rec[lo : min(end_r, pos + 512) + _CONTEXT])
    text_t = tok.decode(tpl[lo : min(end_t, pos + 512) + _CONTEXT])
    if text_r.count("<think>") > text_t.count("<think>"):
        return "reasoning_stripped"
    if any(m in s for s in (text_r, text_t) for m in ("<tool_call>", '"arguments"')):
        return "tool_call_format"
    return "other"
