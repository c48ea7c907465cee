"""`gymtape replay`: re-score every generated token and compare with the sampler's logprobs.

Two sources of "replayed" logprobs: a transformers model (the trainer's view; ``model=``), or a
live vLLM (``engine_url=``, e.g. after an engine upgrade). Either way the tape is first turned
into training sequences (:func:`trainer_bridge.build_sequences`): a multi-turn rollout is ONE
sequence holding every call's generated tokens where they were sampled, so its context is
forwarded once, not once per call. Each generated token's call contributes its temperature and
``logprobs_kind``: ``processed`` logprobs were taken after temperature, so the scorer divides
the logits by that call's temperature; ``raw`` ones (vLLM's default, gymtape's hf engine) are
compared with the plain model distribution.

The report (schema ``gymtape.replay/1``, see ``docs/replay.md``) has the mismatch metrics
(:func:`trainer_bridge.grouped_mismatch_metrics`, the one definition a training step logs too)
overall, per rollout, per call and per position bucket, the worst tokens with decoded context,
token-level details of the worst rollouts for the HTML page, and the ``--fail-above``
thresholds that were crossed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recorder import GymtapeError, Tape

if TYPE_CHECKING:
    from ._score import ScoreSettings

SCHEMA = "gymtape.replay/1"
DEFAULT_POSITION_BUCKETS: tuple[int, ...] = (0, 16, 64, 256, 1024, 4096)
#: Below this a temperature means greedy decoding; engines then leave the logits as they are.
_GREEDY_BELOW = 1e-5
#: Decoded characters of context shown on each side of a worst token.
_CONTEXT_CHARS = 40
_CONTEXT_TOKENS = 32


class ReplayError(GymtapeError):
    """Replay was asked for something it cannot do (no scorer, both scorers, bad settings)."""


class UnknownMetricError(ReplayError):
    """A ``--fail-above`` threshold names a metric the report does not have."""


class TokenOutOfVocabError(ReplayError):
    """A token ID of the tape is outside the scoring model's vocabulary: the tape was recorded
    with another model or tokenizer (the message names the rollout, the call, the ID and the
    vocabulary size)."""


@dataclass
class ReplayReport:
    """The outcome of :func:`replay_tape`; :meth:`to_dict` is the ``gymtape.replay/1`` JSON."""

    tape: str
    mode: str
    model: str | None
    engine_url: str | None
    device: str | None
    dtype: str | None
    settings: dict[str, Any]
    timing: dict[str, Any]
    skipped: dict[str, int]
    overall: dict[str, Any]
    by_position: list[dict[str, Any]]
    rollouts: list[dict[str, Any]]
    worst_tokens: list[dict[str, Any]]
    details: list[dict[str, Any]]
    threshold_failures: list[str]
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no ``fail_above`` threshold was crossed."""
        return not self.threshold_failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "tape": self.tape, "mode": self.mode, "model": self.model, "engine_url": self.engine_url,
            "device": self.device, "dtype": self.dtype, "settings": self.settings, "timing": self.timing,
            "skipped": self.skipped, "overall": self.overall, "by_position": self.by_position,
            "rollouts": self.rollouts, "worst_tokens": self.worst_tokens, "details": self.details,
            "threshold_failures": self.threshold_failures, "warnings": self.warnings,
        }


def parse_fail_above(items: Sequence[str]) -> dict[str, float]:
    """``["max_abs_dlogprob=1e-3", ...]`` → ``{"max_abs_dlogprob": 0.001}``, names checked."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise ReplayError(f"--fail-above {item!r}: expected METRIC=VALUE, e.g. max_abs_dlogprob=1e-3")
        try:
            out[name] = float(value)
        except ValueError:
            raise ReplayError(f"--fail-above {item!r}: {value!r} is not a number") from None
    _check_metric_names(out)
    return out


def _check_metric_names(fail_above: Mapping[str, float]) -> None:
    from trainer_bridge import MISMATCH_METRIC_NAMES

    allowed = MISMATCH_METRIC_NAMES[1:]  # every metric but the token count
    unknown = sorted(set(fail_above) - set(allowed))
    if unknown:
        raise UnknownMetricError(f"--fail-above: unknown metric {', '.join(map(repr, unknown))}; "
                                 f"use one of {', '.join(allowed)}")


def replay_tape(
    tape: Tape | str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | Any | None = None,
    engine_url: str | None = None,
    engine_model: str | None = None,
    tokenizer: str | os.PathLike[str] | Any | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    is_bounds: Sequence[float] | None = None,
    position_buckets: Sequence[int] = DEFAULT_POSITION_BUCKETS,
    fail_above: Mapping[str, float] | None = None,
    settings: ScoreSettings | None = None,
    concurrency: int = 16,
    worst_tokens: int = 20,
    detail_rollouts: int = 20,
    ray_workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    allow_tokenizer_mismatch: bool = False,
) -> ReplayReport:
    """Re-score a tape's generated tokens and compare them with the recorded sampling logprobs.

    Args:
        model: a checkpoint directory or a loaded causal LM (trainer-side scoring).
        engine_url: instead of ``model``, a running vLLM to score on (``prompt_logprobs``).
        engine_model: the model name at ``engine_url`` (default: the first it serves).
        tokenizer: directory or tokenizer for decoding the worst tokens and details (default:
            the model directory's; else the tape's own, found by :func:`recorder.resolve_tokenizer`).
        allow_tokenizer_mismatch: score and decode even when the model directory's or the
            decoding tokenizer's identity differs from the tape's (a warning in the report)
            instead of raising :class:`recorder.TokenizerMismatchError`.
        settings: a :class:`replay._score.ScoreSettings` (batching of the model scorer).
        is_bounds: importance ratios outside count in ``frac_outside_is_bounds`` (default:
            :data:`trainer_bridge.DEFAULT_IS_BOUNDS`, 0.5 and 2).
        fail_above: metric → bound; an overall metric above its bound is a threshold failure.
        progress: called as ``progress(tokens_just_scored, total_tokens)``.
        ray_workers: score on this many Ray Data workers (one model replica each; see
            :mod:`replay._ray`) instead of in this process; ``model`` must be a directory.
    """
    if (model is None) == (engine_url is None):
        raise ReplayError("give exactly one of a model (trainer-side scoring) or an engine URL (vLLM scoring)")
    from trainer_bridge import DEFAULT_IS_BOUNDS, build_sequences, grouped_mismatch_metrics

    fail_above = dict(fail_above or {})
    _check_metric_names(fail_above)
    is_bounds = DEFAULT_IS_BOUNDS if is_bounds is None else is_bounds
    lo, hi = float(is_bounds[0]), float(is_bounds[1])
    if not 0 < lo <= hi:
        raise ReplayError(f"IS bounds must satisfy 0 < lo <= hi, got [{lo}, {hi}]")
    buckets = [int(b) for b in position_buckets]
    if not buckets or buckets[0] != 0 or any(b >= c for b, c in zip(buckets, buckets[1:])):
        raise ReplayError(f"position buckets must start at 0 and increase, got {buckets}")

    tape = tape if isinstance(tape, Tape) else Tape(tape)
    decoding_tokenizer, warnings = _tokenizers(tape, model, tokenizer, allow_tokenizer_mismatch)
    seqs = build_sequences(tape)
    flat = _flatten(seqs)
    if engine_url is None:  # where the IDs meet the model: before it indexes its embedding with them
        vocab = _model_vocab_size(model)
        if vocab is not None:
            _check_vocab(flat, vocab, str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__)
    calls = _call_table(tape, flat)
    warnings += calls.warnings
    tok = _generated_tokens(flat, calls)

    # -- score ----------------------------------------------------------------------------------------
    total_tokens = int(flat.lengths.sum())

    def advance(n: int) -> None:
        if progress is not None:
            progress(n, total_tokens)

    model_name: str | None
    if engine_url is not None:
        from ._engine_url import score_on_engine

        if calls.processed_calls:
            warnings.append(f"{calls.processed_calls} calls recorded processed (post-temperature) logprobs; vLLM "
                            "prompt logprobs follow its --logprobs-mode (raw by default), so those calls can differ "
                            "by the temperature alone")
        t0 = time.perf_counter()
        per_seq, model_name = score_on_engine(engine_url, flat.sequences, flat.masks, model=engine_model,
                                              concurrency=concurrency, progress=advance)
        mode, dev, dt = "engine", None, None
    else:
        from ._score import ScoreSettings, load_model, score_sequences

        if isinstance(model, (str, os.PathLike)):
            model_name = str(model)
            scorer = None if ray_workers else load_model(model, device=device, dtype=dtype)
            dev, dt = device, dtype
        elif ray_workers:
            raise ReplayError("--ray loads the model on each worker: pass a checkpoint directory, not a loaded model")
        else:
            scorer = model
            p = next(scorer.parameters())
            model_name = getattr(getattr(scorer, "config", None), "_name_or_path", None) or type(scorer).__name__
            dev, dt = str(p.device), str(p.dtype).removeprefix("torch.")
        temps = np.split(calls.token_temperature_full, flat.offsets[1:-1])
        t0 = time.perf_counter()  # after loading: timing covers scoring only
        if ray_workers:
            from ._ray import score_sequences_ray

            per_seq = score_sequences_ray(model, flat.sequences, temperatures=temps, score_masks=flat.masks,
                                          workers=ray_workers, device=device, dtype=dtype,
                                          settings=settings or ScoreSettings(), progress=advance)
        else:
            per_seq = score_sequences(scorer, flat.sequences, temperatures=temps, score_masks=flat.masks,
                                      settings=settings or ScoreSettings(), progress=advance)
        mode = "model"
    seconds = time.perf_counter() - t0
    replayed_flat = np.concatenate(per_seq) if per_seq else np.zeros(0, np.float32)
    replayed = replayed_flat[tok.flat_index].astype(np.float32)
    recorded = tok.recorded

    # -- metrics ----------------------------------------------------------------------------------------
    def metrics(groups: np.ndarray, n: int) -> list[dict[str, Any]]:
        return grouped_mismatch_metrics(replayed, recorded, groups, n, calls=tok.call_code, is_bounds=(lo, hi))

    overall = metrics(np.zeros(tok.size, np.int64), 1)[0]
    if overall["tokens"] == 0:
        warnings.append("no generated tokens were scored (the tape has no calls with token IDs)")
    per_rollout = metrics(tok.rollout, len(flat.rollout_ids))
    per_call = metrics(tok.call_code, calls.size)
    bucket_of = np.searchsorted(np.asarray(buckets), tok.position, side="right") - 1
    by_pos = metrics(bucket_of, len(buckets))
    by_position = []
    for k, m in enumerate(by_pos):
        lo_b, hi_b = buckets[k], (buckets[k + 1] if k + 1 < len(buckets) else None)
        label = f"{lo_b}-{hi_b - 1}" if hi_b is not None else f"{lo_b}+"
        by_position.append({"bucket": label, "lo": lo_b, "hi": hi_b, **m})

    rollouts = []
    call_lists: list[list[dict[str, Any]]] = [[] for _ in flat.rollout_ids]
    for c in range(calls.size):
        call_lists[int(calls.rollout[c])].append({
            "call_index": int(calls.call_index[c]), "temperature": calls.temperature[c],
            "logprobs_kind": calls.kind[c], **per_call[c]})
    for r, rid in enumerate(flat.rollout_ids):
        info = flat.rollout_info[r]
        rollouts.append({"rollout_id": rid, **info, **per_rollout[r], "calls": call_lists[r]})

    failures = []
    for name, bound in fail_above.items():
        value = overall.get(name)
        if value is not None and (value > bound or math.isnan(value)):
            failures.append(f"{name} = {value:.6g} > {bound:g}")

    decoder = _Decoder(decoding_tokenizer)
    worst = _worst_tokens(tok, flat, replayed, decoder, worst_tokens)
    details = _details(tok, flat, replayed, per_rollout, decoder, detail_rollouts)
    return ReplayReport(
        tape=tape.location, mode=mode, model=model_name, engine_url=engine_url, device=dev, dtype=dt,
        settings={"is_bounds": [lo, hi], "position_buckets": buckets, "fail_above": fail_above},
        timing={"tokens": total_tokens, "seconds": seconds, "tokens_per_s": total_tokens / seconds if seconds > 0 else 0.0},
        skipped=calls.skipped, overall=overall, by_position=by_position, rollouts=rollouts, worst_tokens=worst,
        details=details, threshold_failures=failures, warnings=warnings,
    )


# -- the model's vocabulary ----------------------------------------------------------------------------


def _model_vocab_size(model: Any) -> int | None:
    """Rows of the model's input embedding: from a loaded model, or a checkpoint's config.json
    (read before the weights load, so a wrong model fails fast). None when it cannot be told."""
    if isinstance(model, (str, os.PathLike)):
        import json

        try:
            config = json.loads((Path(model) / "config.json").read_bytes())
        except (OSError, ValueError):
            return None  # load_model names what is wrong with the directory
        size = config.get("vocab_size") if isinstance(config, dict) else None
        if size is None and isinstance(config, dict) and isinstance(config.get("text_config"), dict):
            size = config["text_config"].get("vocab_size")
        return size if isinstance(size, int) and size > 0 else None
    embeddings = getattr(model, "get_input_embeddings", None)
    try:
        rows = getattr(embeddings(), "num_embeddings", None) if callable(embeddings) else None
    except (NotImplementedError, AttributeError):
        rows = None
    if isinstance(rows, int):
        return rows
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def _check_vocab(flat: _Flat, vocab: int, model: str) -> None:
    """Refuse token IDs the model has no embedding for, naming the first (rollout, call, ID)."""
    bad = (flat.ids < 0) | (flat.ids >= vocab)
    if not bad.any():
        return
    i = int(np.argmax(bad))
    s = int(np.searchsorted(flat.offsets, i, side="right")) - 1
    rid = flat.rollout_ids[int(flat.seq_rollout[s])]
    ci = int(flat.call_index[i])
    part = "generated"
    if ci < 0:  # a prompt token: it belongs to the next call of its sequence
        part = "prompt"
        later = np.flatnonzero(flat.call_index[i: int(flat.offsets[s + 1])] >= 0)
        ci = int(flat.call_index[i + int(later[0])]) if later.size else -1
    where = f"rollout {rid} call {ci}" if ci >= 0 else f"rollout {rid}"
    raise TokenOutOfVocabError(
        f"{where}: {part} token ID {int(flat.ids[i])} is outside the vocabulary of the model {model} "
        f"({vocab} IDs, 0..{vocab - 1}); {int(bad.sum())} token IDs of the tape are. The tape was recorded with "
        "another model or tokenizer: replay with that one (--model), and see `gymtape check` for the whole tape")


# -- tape → flat per-token arrays ------------------------------------------------------------------------


@dataclass
class _Flat:
    """The training sequences as flat arrays plus per-sequence views (no copies)."""

    ids: np.ndarray  # int32 [N]
    mask: np.ndarray  # bool [N], generated tokens
    behaviour: np.ndarray  # float32 [N]
    call_index: np.ndarray  # int32 [N], -1 where not generated
    offsets: np.ndarray  # int64 [S+1]
    lengths: np.ndarray  # int64 [S]
    seq_rollout: np.ndarray  # int64 [S], rollout code
    rollout_ids: list[str]
    rollout_info: list[dict[str, Any]]

    @property
    def sequences(self) -> list[np.ndarray]:
        return np.split(self.ids, self.offsets[1:-1]) if self.lengths.size else []

    @property
    def masks(self) -> list[np.ndarray]:
        return np.split(self.mask, self.offsets[1:-1]) if self.lengths.size else []


def _values(col: pa.ChunkedArray, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    off = arr.offsets.to_numpy().astype(np.int64)
    vals = arr.values.to_numpy(zero_copy_only=False)[off[0]: off[-1]].astype(dtype, copy=False)
    return off - off[0], vals


def _flatten(seqs: pa.Table) -> _Flat:
    if seqs.num_rows == 0:
        z = np.zeros(0, np.int64)
        return _Flat(z.astype(np.int32), z.astype(bool), z.astype(np.float32), z.astype(np.int32), np.zeros(1, np.int64),
                     z, z, [], [])
    off, ids = _values(seqs["input_ids"], np.int32)
    _, mask = _values(seqs["loss_mask"], np.int8)
    _, beh = _values(seqs["behaviour_logprobs"], np.float32)
    _, tci = _values(seqs["token_call_index"], np.int32)
    rid = seqs["rollout_id"].to_pylist()
    new = np.ones(len(rid), dtype=bool)
    new[1:] = np.array(rid[1:], dtype=object) != np.array(rid[:-1], dtype=object)
    seq_rollout = np.cumsum(new) - 1
    firsts = np.flatnonzero(new)
    cols = {c: seqs[c].to_pylist() for c in ("env", "task_index", "rollout_index", "reward")}
    info = [{c: cols[c][i] for c in cols} for i in firsts.tolist()]
    return _Flat(ids, mask.astype(bool), beh, tci, off, np.diff(off), seq_rollout, [rid[i] for i in firsts], info)


@dataclass
class _Calls:
    """The calls of the scored rollouts, one row per (rollout, call), with what scoring needs."""

    rollout: np.ndarray  # rollout code
    call_index: np.ndarray
    key: np.ndarray  # rollout * stride + call_index, sorted
    stride: int
    temperature: list[float | None]
    kind: list[str | None]
    effective_temperature: np.ndarray  # what divides the logits (1.0 for raw)
    token_temperature_full: np.ndarray  # [N] per flat token
    processed_calls: int
    skipped: dict[str, int]
    warnings: list[str]

    @property
    def size(self) -> int:
        return int(self.rollout.size)


def _call_table(tape: Tape, flat: _Flat) -> _Calls:
    t = tape.read("calls", ["rollout_id", "call_index", "temperature", "top_p", "top_k", "logprobs_kind", "token_status"])
    rollout_ids = pa.array(flat.rollout_ids, pa.string())
    code = pc.fill_null(pc.index_in(t["rollout_id"], value_set=rollout_ids), -1).to_numpy().astype(np.int64)
    kept = code >= 0
    all_rollouts = set(t["rollout_id"].to_pylist()) | set(tape.read("rollouts", ["rollout_id"])["rollout_id"].to_pylist())
    skipped = {"calls_without_tokens": int((~kept).sum()),
               "rollouts_without_tokens": len(all_rollouts - set(flat.rollout_ids))}
    t = t.filter(pa.array(kept))
    code = code[kept]
    ci = t["call_index"].to_numpy().astype(np.int64)
    stride = int(ci.max(initial=0)) + 1
    key = code * stride + ci
    order = np.argsort(key, kind="stable")
    t, code, ci, key = t.take(pa.array(order)), code[order], ci[order], key[order]
    temperature = t["temperature"].to_pylist()
    kind = t["logprobs_kind"].to_pylist()
    top_p = t["top_p"].to_pylist()
    top_k = t["top_k"].to_pylist()
    temp = np.array([1.0 if v is None else float(v) for v in temperature], dtype=np.float64)
    processed = np.array([k == "processed" for k in kind], dtype=bool)
    eff = np.where(processed & (temp >= _GREEDY_BELOW), temp, 1.0)
    warnings = []
    n_null = sum(k is None for k in kind)
    if n_null:
        warnings.append(f"{n_null} calls do not say which logprobs the engine returned (logprobs_kind is null); "
                        "they are compared as raw (before temperature) logprobs")
    cut = sum(bool(p) and ((tp is not None and tp < 1.0) or (tk is not None and tk > 0))
              for p, tp, tk in zip(processed.tolist(), top_p, top_k))
    if cut:
        warnings.append(f"{cut} calls recorded processed logprobs under top-p/top-k; the truncated and renormalised "
                        "distribution cannot be rebuilt from the logits and temperature alone, so their tokens differ "
                        "by the renormalisation")
    token_temp = np.ones(flat.ids.size, dtype=np.float32)
    if flat.ids.size:
        tok_rollout = np.repeat(flat.seq_rollout, flat.lengths)
        gen = np.flatnonzero(flat.mask)
        pos = np.searchsorted(key, tok_rollout[gen] * stride + flat.call_index[gen])
        token_temp[gen] = eff[np.minimum(pos, max(key.size - 1, 0))] if key.size else 1.0
    shown = [None if v is None else float(f"{v:.7g}") for v in temperature]  # float32 as typed: 0.7, not 0.69999999
    return _Calls(code, ci, key, stride, shown, kind, eff, token_temp,
                  int(processed.sum()), skipped, warnings)


@dataclass
class _Tokens:
    """Per generated token: where it is and what was recorded."""

    flat_index: np.ndarray
    seq: np.ndarray
    rollout: np.ndarray
    call_index: np.ndarray
    call_code: np.ndarray  # row of the calls table
    position: np.ndarray  # within its call's generation
    token_id: np.ndarray
    recorded: np.ndarray

    @property
    def size(self) -> int:
        return int(self.flat_index.size)


def _generated_tokens(flat: _Flat, calls: _Calls) -> _Tokens:
    gen = np.flatnonzero(flat.mask)
    seq = np.repeat(np.arange(flat.lengths.size), flat.lengths)[gen]
    rollout = flat.seq_rollout[seq] if gen.size else np.zeros(0, np.int64)
    ci = flat.call_index[gen].astype(np.int64)
    key = rollout * calls.stride + ci
    call_code = np.searchsorted(calls.key, key)
    if gen.size and (call_code.max() >= calls.size or not np.array_equal(calls.key[call_code], key)):
        raise ReplayError("a generated token's call is missing from the calls table; the tape is inconsistent "
                          "(run `gymtape check`)")
    # position within the call: distance from the start of the run of its call (runs are contiguous)
    start = np.ones(gen.size, dtype=bool)
    if gen.size > 1:
        start[1:] = (key[1:] != key[:-1]) | (gen[1:] != gen[:-1] + 1)
    idx = np.arange(gen.size)
    position = idx - np.maximum.accumulate(np.where(start, idx, 0)) if gen.size else idx
    return _Tokens(gen, seq, rollout, ci, call_code, position, flat.ids[gen], flat.behaviour[gen])


# -- tokenizer, worst tokens, details ------------------------------------------------------------------


def _tokenizers(tape: Tape, model: Any, tokenizer: Any, allow_mismatch: bool) -> tuple[Any, list[str]]:
    """The tokenizer that decodes the report's tokens, and the tokenizer policy's warnings.

    A model directory's own tokenizer is held to the tape's identity too: scores from a model
    with another vocabulary are meaningless, whatever decodes them.
    """
    from recorder import TapeError, resolve_tokenizer, tokenizer_identity

    warnings: list[str] = []
    from_model = None
    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        try:
            tokenizer_identity(model)
        except TapeError:  # weights only: nothing to compare, decode with the given tokenizer
            pass
        else:
            from_model = resolve_tokenizer(tape, model, allow_mismatch=allow_mismatch, load=tokenizer is None)
            warnings += from_model.warnings
    resolved = from_model if tokenizer is None and from_model is not None else \
        resolve_tokenizer(tape, tokenizer, allow_mismatch=allow_mismatch)
    warnings += resolved.warnings
    return resolved.tokenizer, list(dict.fromkeys(warnings))


class _Decoder:
    """Decodes token IDs for display; without a tokenizer, shows ``<id>``."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tok = tokenizer

    def text(self, ids: np.ndarray) -> str:
        if self.tok is None:
            return "".join(f"<{int(i)}>" for i in ids)
        n = len(self.tok)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n):  # beyond the tokenizer: shown as <id?>
            return "".join(self.text(ids[i: i + 1]) if 0 <= int(ids[i]) < n else f"<{int(ids[i])}?>"
                           for i in range(ids.size))
        return self.tok.decode(ids.tolist(), skip_special_tokens=False)

    def pieces(self, ids: np.ndarray) -> list[str]:
        if self.tok is None:
            return [f"<{int(i)}>" for i in ids]
        n = len(self.tok)
        return [self.tok.decode([int(i)], skip_special_tokens=False) if 0 <= int(i) < n else f"<{int(i)}?>"
                for i in ids] if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n) else \
            self.tok.batch_decode(ids.reshape(-1, 1).tolist(), skip_special_tokens=False)


def _worst_tokens(tok: _Tokens, flat: _Flat, replayed: np.ndarray, decoder: _Decoder, k: int) -> list[dict[str, Any]]:
    if tok.size == 0 or k <= 0:
        return []
    delta = replayed.astype(np.float64) - tok.recorded.astype(np.float64)
    ad = np.where(np.isnan(delta), np.inf, np.abs(delta))
    top = np.argpartition(-ad, min(k, ad.size) - 1)[: min(k, ad.size)] if ad.size > k else np.arange(ad.size)
    top = top[np.lexsort((top, -ad[top]))]
    out = []
    for i in top.tolist():
        f = int(tok.flat_index[i])
        s = int(tok.seq[i])
        a, b = int(flat.offsets[s]), int(flat.offsets[s + 1])
        before = decoder.text(flat.ids[max(a, f - _CONTEXT_TOKENS): f])[-_CONTEXT_CHARS:]
        after = decoder.text(flat.ids[f + 1: min(b, f + 1 + _CONTEXT_TOKENS)])[:_CONTEXT_CHARS]
        out.append({
            "rollout_id": flat.rollout_ids[int(tok.rollout[i])], "call_index": int(tok.call_index[i]),
            "position": int(tok.position[i]), "token_id": int(tok.token_id[i]),
            "token": decoder.text(flat.ids[f: f + 1]), "recorded_logprob": float(tok.recorded[i]),
            "replayed_logprob": float(replayed[i]), "delta": float(delta[i]), "before": before, "after": after,
        })
    return out


def _details(tok: _Tokens, flat: _Flat, replayed: np.ndarray, per_rollout: list[dict[str, Any]], decoder: _Decoder,
             n: int) -> list[dict[str, Any]]:
    scored = [r for r, m in enumerate(per_rollout) if m["tokens"]]
    worst = sorted(scored, key=lambda r: -(per_rollout[r]["max_abs_dlogprob"] or 0.0))[: max(n, 0)]
    delta_flat = np.full(flat.ids.size, np.nan)
    delta_flat[tok.flat_index] = replayed.astype(np.float64) - tok.recorded.astype(np.float64)
    out = []
    for r in worst:
        segments = []
        for s in np.flatnonzero(flat.seq_rollout == r).tolist():
            a, b = int(flat.offsets[s]), int(flat.offsets[s + 1])
            gen = flat.mask[a:b]
            d = delta_flat[a:b]
            segments.append({
                "pieces": decoder.pieces(flat.ids[a:b]), "generated": gen.tolist(),
                "delta": [None if not g else float(v) for g, v in zip(gen.tolist(), d.tolist())],
                "call_index": flat.call_index[a:b].tolist(),
            })
        out.append({"rollout_id": flat.rollout_ids[r], "max_abs_dlogprob": per_rollout[r]["max_abs_dlogprob"],
                    "segments": segments})
    return out
