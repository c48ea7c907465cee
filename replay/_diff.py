"""`gymtape diff`: compare two tapes rollout by rollout and find where they part ways.

Two tapes of the same tasks (two engines, two seeds, before/after a change) are paired
rollout by rollout, by (env, task index, repeat index) or by rollout id. Each pair is walked in
*context order* -- call 0's prompt, call 0's generation, call 1's prompt, ... -- and the first
token where the two differ is the divergence. Walking the prompts too matters: when an
environment answers differently, call k's prompt differs first and the generation that follows
only inherits the difference; blaming the sampler there would be wrong.

Before the divergence both rollouts hold the same tokens, so their sampling logprobs are
directly comparable: the report gives |Δlogprob| on that shared generated prefix (non-zero
means the two samplers scored identical tokens differently: numerics, batch invariance, a
different model).

Speed: each tape's calls are read once as numpy views of the Arrow list columns; a rollout's
generated stream is one slice; comparisons are numpy over whole streams. Full prompts are
rebuilt only for calls whose stored delta encoding differs, and text is decoded only around
divergence points.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from recorder import GymtapeError, ListColumn, Tape, common_prefix_len, rebuild_prompts, resolve_tokenizer

SCHEMA = "gymtape.diff/1"
#: Bucket edges of divergence offsets (tokens into a call's prompt or generation; the last
#: bucket is open-ended). The same edges as the replay report's by-position buckets.
POSITION_BUCKETS = (0, 16, 64, 256, 1024, 4096)
#: Characters of decoded text shown on each side of a divergence.
CONTEXT_CHARS = 60
_CONTEXT_TOKENS = 24  # tokens decoded for a context snippet, then cut to CONTEXT_CHARS
_SHOWN_IDS = 8  # token IDs listed from the divergence on, per side
_SHARED_FRACTION_BINS = 10

MatchBy = Literal["task", "id"]


class DiffError(GymtapeError):
    """Two tapes cannot be compared as asked (e.g. a bad ``by``)."""


# -- the report ---------------------------------------------------------------------------


@dataclass
class DiffReport:
    """What :func:`diff_tapes` found; ``to_dict()`` is the stable JSON form (``gymtape.diff/1``).

    ``pairs`` and the unmatched lists are already JSON-ready dicts (see ``docs/reports.md``).
    """

    tape_a: str
    tape_b: str
    by: str
    tokenizer: dict[str, str] | None
    tape_tokenizers: dict[str, dict[str, str] | None]
    pairs: list[dict[str, Any]] = field(default_factory=list)
    unmatched_a: list[dict[str, Any]] = field(default_factory=list)
    unmatched_b: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def diverged(self) -> int:
        return int(self.summary.get("diverged", 0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "tape_a": self.tape_a,
            "tape_b": self.tape_b,
            "by": self.by,
            "tokenizer": self.tokenizer,
            "tape_tokenizers": dict(self.tape_tokenizers),
            "summary": self.summary,
            "pairs": self.pairs,
            "unmatched_a": self.unmatched_a,
            "unmatched_b": self.unmatched_b,
            "warnings": list(self.warnings),
            "elapsed_s": self.elapsed_s,
        }


# -- one tape, indexed --------------------------------------------------------------------

_CALL_COLUMNS = ["rollout_id", "call_index", "prefix_len", "prompt_suffix_ids", "generation_ids", "generation_logprobs"]
_ROLLOUT_COLUMNS = ["rollout_id", "env", "task_index", "rollout_index", "reward", "status"]


class _Side:
    """One tape's calls as flat numpy arrays plus each rollout's row range and metadata."""

    def __init__(self, tape: Tape) -> None:
        self.tape = tape
        t = tape.read("calls", _CALL_COLUMNS).sort_by([("rollout_id", "ascending"), ("call_index", "ascending")])
        self.call_index = t.column("call_index").to_numpy()
        self.prefix_len = t.column("prefix_len").to_numpy()
        self.suffix = ListColumn(t.column("prompt_suffix_ids"), np.int32)
        self.gen = ListColumn(t.column("generation_ids"), np.int32)
        self.lp = ListColumn(t.column("generation_logprobs"), np.float32)
        rids = t.column("rollout_id").to_numpy(zero_copy_only=False)
        self.ranges: dict[str, tuple[int, int]] = {}
        if rids.size:
            starts = np.flatnonzero(np.concatenate([[True], rids[1:] != rids[:-1]]))
            ends = np.append(starts[1:], rids.size)
            self.ranges = {str(rids[s]): (int(s), int(e)) for s, e in zip(starts, ends)}
        r = tape.read("rollouts", _ROLLOUT_COLUMNS)
        cols = {c: r.column(c).to_pylist() for c in _ROLLOUT_COLUMNS}
        self.meta: dict[str, dict[str, Any]] = {}
        for i, rid in enumerate(cols["rollout_id"]):  # a rollout written twice: the later row wins
            self.meta[rid] = {c: cols[c][i] for c in _ROLLOUT_COLUMNS}
        for rid in self.ranges:  # calls without a rollout row (e.g. a server-only tape)
            self.meta.setdefault(rid, {"rollout_id": rid, "env": None, "task_index": None, "rollout_index": None,
                                       "reward": None, "status": None})

    def stream(self, rid: str) -> _Stream:
        a, b = self.ranges.get(rid, (0, 0))
        return _Stream(self, rid, a, b)


class _Stream:
    """One rollout: its concatenated generated tokens, their logprobs, and per-call offsets."""

    def __init__(self, side: _Side, rid: str, a: int, b: int) -> None:
        self.side, self.rid, self.a, self.b = side, rid, a, b
        self.n_calls = b - a
        if b > a:
            lo, hi = side.gen.starts[a], side.gen.ends[b - 1]
            self.ids = side.gen.values[lo:hi]
            self.lps = side.lp.values[side.lp.starts[a] : side.lp.ends[b - 1]]
            lens = side.gen.lengths()[a:b]
        else:
            self.ids = np.empty(0, np.int32)
            self.lps = np.empty(0, np.float32)
            lens = np.empty(0, np.int64)
        #: Stream offset where each call's generation starts (plus the total at the end).
        self.call_starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        #: Ordinal (0..n_calls-1) of the call that generated each stream token.
        self.tags = np.repeat(np.arange(self.n_calls, dtype=np.int32), lens)
        self._prompts: list[np.ndarray] | None = None

    def call_index(self, k: int) -> int:
        return int(self.side.call_index[self.a + k]) if k < self.n_calls else k

    def gen(self, k: int) -> np.ndarray:
        return self.ids[self.call_starts[k] : self.call_starts[k + 1]]

    def encoded_prompt_equal(self, other: _Stream, k: int) -> bool:
        i, j = self.a + k, other.a + k
        return bool(self.side.prefix_len[i] == other.side.prefix_len[j]) and np.array_equal(
            self.side.suffix[i], other.side.suffix[j])

    def prompt(self, k: int) -> np.ndarray:
        if self._prompts is None:
            s = self.side
            rows = range(self.a, self.b)
            self._prompts = list(rebuild_prompts([int(s.prefix_len[i]) for i in rows], [s.suffix[i] for i in rows],
                                                 [s.gen[i] for i in rows], rollout_id=self.rid))
        return self._prompts[k]


# -- decoding -----------------------------------------------------------------------------


class _Decoder:
    """Token IDs → display text; IDs outside the vocabulary show as ``<id?>``, never raise."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.n_vocab = len(tokenizer)

    def text(self, ids: np.ndarray) -> str:
        ids = [int(i) for i in ids]
        if not ids:
            return ""
        if min(ids) >= 0 and max(ids) < self.n_vocab:
            return self.tok.decode(ids, skip_special_tokens=False)
        return "".join(self.tok.decode([i], skip_special_tokens=False) if 0 <= i < self.n_vocab else f"<{i}?>"
                       for i in ids)

    def head(self, ids: np.ndarray) -> str:
        return self.text(ids[:_CONTEXT_TOKENS])[:CONTEXT_CHARS]

    def tail(self, ids: np.ndarray) -> str:
        return self.text(ids[-_CONTEXT_TOKENS:])[-CONTEXT_CHARS:]


# -- pairing ------------------------------------------------------------------------------


def _keys(side: _Side, by: str, label: str, warnings: list[str]) -> tuple[dict[tuple, str], list[str]]:
    """Key → rollout id; plus rollouts that have no key (no task index when matching by task)."""
    if by == "id":
        return {(rid,): rid for rid in side.meta}, []
    groups: dict[tuple, list[str]] = {}
    unkeyed = []
    for rid, m in side.meta.items():
        if m["task_index"] is None:
            unkeyed.append(rid)
            continue
        groups.setdefault((m["env"] or "", m["task_index"], m["rollout_index"] if m["rollout_index"] is not None
                           else -1), []).append(rid)
    keys: dict[tuple, str] = {}
    dupes = 0
    for k, rids in groups.items():
        dupes += len(rids) > 1
        for occ, rid in enumerate(sorted(rids)):
            keys[(*k, occ)] = rid
    if dupes:
        warnings.append(f"tape {label}: {dupes} (env, task, repeat) keys occur more than once; their rollouts are "
                        "paired in rollout-id order (use --by id if both tapes share rollout ids)")
    if unkeyed:
        warnings.append(f"tape {label}: {len(unkeyed)} rollouts have no task index and cannot be matched by task "
                        "(use --by id)")
    return keys, unkeyed


def _sort_key(k: tuple) -> tuple:
    return tuple((0, v) if isinstance(v, (int, float)) else (1, str(v)) for v in k)


def _describe(side: _Side, rid: str) -> dict[str, Any]:
    m = side.meta[rid]
    s = side.ranges.get(rid, (0, 0))
    return {"rollout_id": rid, "env": m["env"], "task_index": m["task_index"], "rollout_index": m["rollout_index"],
            "reward": m["reward"], "calls": s[1] - s[0]}


# -- one pair -----------------------------------------------------------------------------


def _first_generation_mismatch(sa: _Stream, sb: _Stream) -> int | None:
    """First stream position where the tokens or the calls that generated them differ."""
    n = min(sa.ids.size, sb.ids.size)
    diff = np.flatnonzero((sa.ids[:n] != sb.ids[:n]) | (sa.tags[:n] != sb.tags[:n]))
    if diff.size:
        return int(diff[0])
    return n if sa.ids.size != sb.ids.size else None


def _side_at(dec: _Decoder, ids: np.ndarray, off: int, lps: np.ndarray | None) -> dict[str, Any]:
    rest = ids[off:]
    ended = rest.size == 0
    tok = None if ended else int(rest[0])
    return {
        "ended": ended,
        "token_id": tok,
        "token": None if ended else dec.text(rest[:1]),
        "logprob": None if (ended or lps is None) else float(lps[off]),
        "token_ids": [int(i) for i in rest[:_SHOWN_IDS]],
        "text": dec.head(rest),
    }


def _divergence(sa: _Stream, sb: _Stream, dec: _Decoder) -> dict[str, Any] | None:
    """The first point, in context order, where the two rollouts differ (None: identical)."""
    p = _first_generation_mismatch(sa, sb)
    k_gen = off_gen = None
    if p is not None:
        ta = int(sa.tags[p]) if p < sa.ids.size else sa.n_calls
        tb = int(sb.tags[p]) if p < sb.ids.size else sb.n_calls
        k_gen = min(ta, tb)
        off_gen = p - int(sa.call_starts[k_gen]) if k_gen < sa.n_calls else 0
    last = (k_gen if k_gen is not None else max(sa.n_calls, sb.n_calls))
    for k in range(min(last + 1, sa.n_calls, sb.n_calls)):
        if sa.encoded_prompt_equal(sb, k):
            continue
        pa, pb = sa.prompt(k), sb.prompt(k)
        off = common_prefix_len(pa, pb)
        if off == pa.size == pb.size:  # same prompt, encoded differently
            continue
        return _point("prompt", k, off, sa, sb, pa, pb, dec)
    if k_gen is None:
        if sa.n_calls == sb.n_calls:
            return None
        k = min(sa.n_calls, sb.n_calls)  # one side has more calls; the other ends before call k's prompt
        return _point("prompt", k, 0, sa, sb, _prompt_or_empty(sa, k), _prompt_or_empty(sb, k), dec)
    if k_gen >= sa.n_calls or k_gen >= sb.n_calls:
        return _point("prompt", k_gen, 0, sa, sb, _prompt_or_empty(sa, k_gen), _prompt_or_empty(sb, k_gen), dec)
    return _point("generation", k_gen, int(off_gen), sa, sb, sa.gen(k_gen), sb.gen(k_gen), dec)


def _prompt_or_empty(s: _Stream, k: int) -> np.ndarray:
    return s.prompt(k) if k < s.n_calls else np.empty(0, np.int32)


def _point(part: str, k: int, off: int, sa: _Stream, sb: _Stream, ids_a: np.ndarray, ids_b: np.ndarray,
           dec: _Decoder) -> dict[str, Any]:
    owner = sa if k < sa.n_calls else sb
    if part == "generation":
        before_ids = np.concatenate([owner.prompt(k), ids_a[:off]])
        lps_a = sa.lps[sa.call_starts[k] : sa.call_starts[k + 1]]
        lps_b = sb.lps[sb.call_starts[k] : sb.call_starts[k + 1]]
    else:
        if off == 0 and k > 0:  # the prompt's very start: show where the previous call left off
            before_ids = np.concatenate([owner.prompt(k - 1), owner.gen(k - 1)])
        else:
            before_ids = (ids_a if k < sa.n_calls else ids_b)[:off]
        lps_a = lps_b = None
    stream_offset = int(owner.call_starts[k]) + (off if part == "generation" else 0)
    return {
        "part": part,
        "call_index": owner.call_index(k),
        "offset_in_call": off,
        "stream_offset": stream_offset,
        "before": dec.tail(before_ids),
        "a": _side_at(dec, ids_a, off, lps_a),
        "b": _side_at(dec, ids_b, off, lps_b),
    }


def _shared_logprobs(sa: _Stream, d: np.ndarray) -> dict[str, Any]:
    """|Δlogprob| statistics over the shared generated prefix (``d`` holds them per token)."""
    if d.size == 0:
        return {"tokens": 0, "mean_abs_dlogprob": None, "max_abs_dlogprob": None, "changed_tokens": 0,
                "max_at": None}
    i = int(np.argmax(d))
    k = int(sa.tags[i])
    return {"tokens": int(d.size), "mean_abs_dlogprob": float(d.mean()), "max_abs_dlogprob": float(d[i]),
            "changed_tokens": int(np.count_nonzero(d)),
            "max_at": {"call_index": sa.call_index(k), "offset_in_call": i - int(sa.call_starts[k]),
                       "stream_offset": i}}


def _compare(side_a: _Side, rid_a: str, side_b: _Side, rid_b: str, dec: _Decoder) -> tuple[dict[str, Any], np.ndarray]:
    sa, sb = side_a.stream(rid_a), side_b.stream(rid_b)
    div = _divergence(sa, sb, dec)
    shared = min(sa.ids.size, sb.ids.size) if div is None else div["stream_offset"]
    d = np.abs(sb.lps[:shared].astype(np.float64) - sa.lps[:shared].astype(np.float64))
    without_tokens = div is None and sa.ids.size == 0 and all(sa.prompt(k).size == 0 for k in range(sa.n_calls))
    ma, mb = side_a.meta[rid_a], side_b.meta[rid_b]
    ra, rb = ma["reward"], mb["reward"]
    change = rb - ra if ra is not None and rb is not None else None
    pair = {
        "rollout_id_a": rid_a,
        "rollout_id_b": rid_b,
        "env": ma["env"] if ma["env"] is not None else mb["env"],
        "task_index": ma["task_index"] if ma["task_index"] is not None else mb["task_index"],
        "rollout_index": ma["rollout_index"] if ma["rollout_index"] is not None else mb["rollout_index"],
        "identical": div is None and not without_tokens,
        "without_tokens": without_tokens,
        "calls_a": sa.n_calls,
        "calls_b": sb.n_calls,
        "generated_a": int(sa.ids.size),
        "generated_b": int(sb.ids.size),
        "shared_generated": int(shared),
        "divergence": div,
        "reward_a": ra,
        "reward_b": rb,
        "reward_change": change,
        "status_a": ma["status"],
        "status_b": mb["status"],
        "shared_logprobs": _shared_logprobs(sa, d),
    }
    return pair, d


# -- summary ------------------------------------------------------------------------------


def _buckets(values: list[int]) -> list[dict[str, Any]]:
    edges = list(POSITION_BUCKETS)
    v = np.asarray(values, dtype=np.int64)
    out = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        n = int(np.count_nonzero((v >= lo) & (v < hi))) if hi is not None else int(np.count_nonzero(v >= lo))
        out.append({"bucket": f"{lo}-{hi - 1}" if hi is not None else f"{lo}+", "lo": lo, "hi": hi, "count": n})
    return out


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(np.mean(xs)) if xs else None


def _summarize(pairs: list[dict[str, Any]], deltas: list[np.ndarray], unmatched_a: int, unmatched_b: int
               ) -> dict[str, Any]:
    divs = [p["divergence"] for p in pairs if p["divergence"] is not None]
    changes = [p["reward_change"] for p in pairs if p["reward_change"] is not None]
    all_d = np.concatenate(deltas) if deltas else np.empty(0)
    fractions = [p["shared_generated"] / max(p["generated_a"], p["generated_b"])
                 for p in pairs if p["divergence"] is not None and max(p["generated_a"], p["generated_b"]) > 0]
    frac_hist = np.histogram(np.asarray(fractions, dtype=np.float64), bins=_SHARED_FRACTION_BINS, range=(0.0, 1.0))[0]
    by_call = Counter(d["call_index"] for d in divs)
    return {
        "pairs": len(pairs),
        "identical": sum(p["identical"] for p in pairs),
        "diverged": len(divs),
        "without_tokens": sum(p["without_tokens"] for p in pairs),
        "diverged_in_prompt": sum(d["part"] == "prompt" for d in divs),
        "diverged_in_generation": sum(d["part"] == "generation" for d in divs),
        "unmatched_a": unmatched_a,
        "unmatched_b": unmatched_b,
        "reward_changed": sum(c != 0 for c in changes),
        "reward_changed_identical": sum(p["reward_change"] not in (None, 0) and p["identical"] for p in pairs),
        "status_changed": sum(p["status_a"] != p["status_b"] for p in pairs),
        "mean_reward_a": _mean([p["reward_a"] for p in pairs]),
        "mean_reward_b": _mean([p["reward_b"] for p in pairs]),
        "mean_reward_change": _mean(changes),
        "shared_generated_tokens": int(all_d.size),
        "shared_mean_abs_dlogprob": float(all_d.mean()) if all_d.size else None,
        "shared_max_abs_dlogprob": float(all_d.max()) if all_d.size else None,
        "shared_changed_tokens": int(np.count_nonzero(all_d)),
        "where": {
            "part": {"prompt": sum(d["part"] == "prompt" for d in divs),
                     "generation": sum(d["part"] == "generation" for d in divs)},
            "call_index": [{"call_index": k, "count": n} for k, n in sorted(by_call.items())],
            "offset_in_call": _buckets([d["offset_in_call"] for d in divs]),
            "stream_offset": _buckets([d["stream_offset"] for d in divs]),
            "shared_fraction": [{"lo": i / _SHARED_FRACTION_BINS, "hi": (i + 1) / _SHARED_FRACTION_BINS,
                                 "count": int(n)} for i, n in enumerate(frac_hist)],
        },
    }


# -- entry point --------------------------------------------------------------------------


def diff_tapes(a: Tape | str | os.PathLike[str], b: Tape | str | os.PathLike[str], *, by: MatchBy = "task",
               tokenizer: Any = None, allow_tokenizer_mismatch: bool = False) -> DiffReport:
    """Pair the rollouts of tapes ``a`` and ``b`` and report where each pair first differs.

    Args:
        a, b: tapes (or their directories). Changes are reported as ``b - a``.
        by: ``"task"`` pairs rollouts by (env, task index, repeat index) -- two recordings of
            the same task file; ``"id"`` pairs them by rollout id -- a tape and a copy of it.
        tokenizer: decodes the text around divergences: a transformers tokenizer, a
            tokenizer directory, or None for the tapes' own (found by
            :func:`recorder.resolve_tokenizer`, the one policy every command uses).
        allow_tokenizer_mismatch: compare even when a tape was recorded with another tokenizer
            than the one used, or the two tapes with different ones (their token IDs are then not
            comparable; a warning in the report), instead of raising
            :class:`recorder.TokenizerMismatchError`.
    """
    t0 = time.perf_counter()
    if by not in ("task", "id"):
        raise DiffError(f"by must be 'task' or 'id', got {by!r}")
    ta = a if isinstance(a, Tape) else Tape(a)
    tb = b if isinstance(b, Tape) else Tape(b)
    resolved = resolve_tokenizer([ta, tb], tokenizer, allow_mismatch=allow_tokenizer_mismatch)
    ident = resolved.identity
    dec = _Decoder(resolved.tokenizer)
    ida, idb = ta.meta.tokenizer, tb.meta.tokenizer
    report = DiffReport(tape_a=ta.location, tape_b=tb.location, by=by, tokenizer=ident.to_dict() if ident else None,
                        tape_tokenizers={"a": ida.to_dict() if ida else None, "b": idb.to_dict() if idb else None},
                        warnings=list(resolved.warnings))
    if ida and idb and ida.sha256 != idb.sha256:  # allowed above: say what it costs
        report.warnings.append(f"the tapes were recorded with different tokenizers ({ida.name} sha256 "
                               f"{ida.sha256[:12]} vs {idb.name} sha256 {idb.sha256[:12]}): their token IDs are "
                               "not comparable")

    side_a, side_b = _Side(ta), _Side(tb)
    keys_a, unkeyed_a = _keys(side_a, by, "A", report.warnings)
    keys_b, unkeyed_b = _keys(side_b, by, "B", report.warnings)
    deltas: list[np.ndarray] = []
    for k in sorted(keys_a.keys() & keys_b.keys(), key=_sort_key):
        pair, d = _compare(side_a, keys_a[k], side_b, keys_b[k], dec)
        report.pairs.append(pair)
        deltas.append(d)
    only_a = [keys_a[k] for k in sorted(keys_a.keys() - keys_b.keys(), key=_sort_key)] + sorted(unkeyed_a)
    only_b = [keys_b[k] for k in sorted(keys_b.keys() - keys_a.keys(), key=_sort_key)] + sorted(unkeyed_b)
    report.unmatched_a = [_describe(side_a, r) for r in only_a]
    report.unmatched_b = [_describe(side_b, r) for r in only_b]
    report.summary = _summarize(report.pairs, deltas, len(only_a), len(only_b))
    report.elapsed_s = time.perf_counter() - t0
    return report
