"""Train-inference mismatch metrics between sampler (recorded) and trainer (replayed) logprobs:
the one definition gymtape has.

`gymtape replay` reports them per rollout, call and position (``replay.grouped_metrics`` is
:func:`grouped_mismatch_metrics`), and :func:`~trainer_bridge.mismatch_metrics` logs them for
every training step (a torch front over :func:`token_mismatch_metrics`), so a number in a replay
report and the same number in a training log mean the same thing. numpy, no torch: replay
imports it without loading torch.

Per token, ``d = replayed − recorded`` and ``r = exp(d)`` (the trainer/sampler importance
ratio). Every metric is a per-group reduction over flat per-token arrays, so the same code
gives the overall numbers, per-rollout, per-call and per-position-bucket tables, and works on
arrays concatenated from several scoring workers. Formulas (see ``docs/replay.md``):

* ``mean/max_abs_dlogprob`` = mean/max |d|; ``mean/max_abs_dprob`` = mean/max |exp(replayed) − exp(recorded)|
* ``kl_k1`` = mean(−d), ``kl_k2`` = mean(d²/2), ``kl_k3`` = mean(r − 1 − d): Schulman's estimators
  of KL(sampler ‖ trainer) from samples of the sampler (k3 is unbiased and never negative)
* ``token_mult_prob_error`` = mean(exp|d|) (NeMo RL's multiplicative probability error; 1 = exact)
* ``seq_is_ratio`` = mean over the group's calls of exp(Σ d over the call's tokens in the group)
* ``geo_mean_is_ratio`` = exp(mean d)
* ``frac_outside_is_bounds`` = share of tokens with r outside ``[lo, hi]``
* ``chi2`` = mean((r − 1)²); ``ess`` = (Σr)² / (N·Σr²) in (0, 1]

Arithmetic is float64; a value that overflows it is reported as ±1e308 (see :func:`finite`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._errors import BridgeValueError

#: Every metric, in report order (``tokens`` is the count, the rest are floats or None).
MISMATCH_METRIC_NAMES: tuple[str, ...] = (
    "tokens", "mean_abs_dlogprob", "max_abs_dlogprob", "mean_abs_dprob", "max_abs_dprob", "kl_k1", "kl_k2", "kl_k3",
    "token_mult_prob_error", "seq_is_ratio", "geo_mean_is_ratio", "frac_outside_is_bounds", "chi2", "ess",
)
#: Importance ratios outside these count in ``frac_outside_is_bounds``.
DEFAULT_IS_BOUNDS: tuple[float, float] = (0.5, 2.0)
#: exp() arguments are clipped here so ratios stay finite in float64 (e^709 is the largest).
_MAX_EXP = 700.0
_SATURATE = 1e308


def finite(x: float) -> float:
    """Float for JSON: ±inf saturates at ±1e308 (NaN stays NaN: it means bad input, not overflow)."""
    if math.isinf(x):
        return _SATURATE if x > 0 else -_SATURATE
    return float(x)


def grouped_mismatch_metrics(
    replayed: np.ndarray,
    recorded: np.ndarray,
    groups: np.ndarray,
    n_groups: int,
    *,
    calls: np.ndarray,
    is_bounds: Sequence[float] = DEFAULT_IS_BOUNDS,
) -> list[dict[str, Any]]:
    """The metrics of each group ``0..n_groups-1``: one dict per group, keys :data:`MISMATCH_METRIC_NAMES`.

    ``groups[i]`` is token i's group, ``calls[i]`` a code of the call that generated it (for
    the sequence-level IS ratio: a call's tokens inside the group form one sequence). Groups
    without tokens get ``tokens = 0`` and None for every other metric.
    """
    rep = np.asarray(replayed, dtype=np.float64)
    rec = np.asarray(recorded, dtype=np.float64)
    g = np.asarray(groups, dtype=np.int64)
    c = np.asarray(calls, dtype=np.int64)
    if not (rep.shape == rec.shape == g.shape == c.shape) or rep.ndim != 1:
        raise BridgeValueError(f"replayed, recorded, groups and calls must be 1-D of one length, got "
                         f"{rep.shape}, {rec.shape}, {g.shape}, {c.shape}")
    lo, hi = float(is_bounds[0]), float(is_bounds[1])
    if not 0 < lo <= hi:
        raise BridgeValueError(f"is_bounds must satisfy 0 < lo <= hi, got {is_bounds}")

    def total(w: np.ndarray) -> np.ndarray:
        return np.bincount(g, weights=w, minlength=n_groups)[:n_groups]

    def largest(w: np.ndarray) -> np.ndarray:
        out = np.full(n_groups, -np.inf)
        np.maximum.at(out, g, w)
        return out

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        d = rep - rec
        ad = np.abs(d)
        em1 = np.expm1(np.minimum(d, _MAX_EXP))  # r - 1, accurate for small d
        n = np.bincount(g, minlength=n_groups)[:n_groups].astype(np.int64)
        nf = np.maximum(n, 1).astype(np.float64)
        outside = (d < math.log(lo)) | (d > math.log(hi))
        # ess = (Σr)² / (N Σr²), computed on r / max(r) within the group so it never overflows
        top = largest(d)
        scaled = np.exp(d - top[g])
        ess = total(scaled) ** 2 / (nf * total(scaled * scaled))
        # one "sequence" per (group, call): exp of its summed d, averaged over the group's calls
        pair, pair_of_token = np.unique(g * (int(c.max(initial=0)) + 1) + c, return_inverse=True)
        pair_sum = np.bincount(pair_of_token, weights=d, minlength=pair.size)
        pair_group = pair // (int(c.max(initial=0)) + 1)
        seq_ratio = np.exp(np.clip(pair_sum, -_MAX_EXP, _MAX_EXP))
        seq_is = (np.bincount(pair_group, weights=seq_ratio, minlength=n_groups)[:n_groups]
                  / np.maximum(np.bincount(pair_group, minlength=n_groups)[:n_groups], 1))
        columns = {
            "mean_abs_dlogprob": total(ad) / nf,
            "max_abs_dlogprob": largest(ad),
            "mean_abs_dprob": total(np.abs(np.exp(rep) - np.exp(rec))) / nf,
            "max_abs_dprob": largest(np.abs(np.exp(rep) - np.exp(rec))),
            "kl_k1": total(-d) / nf,
            "kl_k2": total(d * d / 2) / nf,
            "kl_k3": total(em1 - d) / nf,
            "token_mult_prob_error": total(np.exp(np.minimum(ad, _MAX_EXP))) / nf,
            "seq_is_ratio": seq_is,
            "geo_mean_is_ratio": np.exp(np.clip(total(d) / nf, -_MAX_EXP, _MAX_EXP)),
            "frac_outside_is_bounds": total(outside.astype(np.float64)) / nf,
            "chi2": total(em1 * em1) / nf,
            "ess": ess,
        }
    out: list[dict[str, Any]] = []
    for k in range(n_groups):
        if n[k] == 0:
            out.append({"tokens": 0, **{name: None for name in MISMATCH_METRIC_NAMES[1:]}})
        else:
            out.append({"tokens": int(n[k]), **{name: finite(float(v[k])) for name, v in columns.items()}})
    return out


def token_mismatch_metrics(
    replayed: np.ndarray,
    recorded: np.ndarray,
    *,
    calls: np.ndarray | None = None,
    is_bounds: Sequence[float] = DEFAULT_IS_BOUNDS,
) -> dict[str, Any]:
    """The metrics of one group of tokens (``calls``: call code per token; default: all one call)."""
    rep = np.asarray(replayed)
    c = np.zeros(rep.shape, dtype=np.int64) if calls is None else np.asarray(calls)
    return grouped_mismatch_metrics(rep, recorded, np.zeros(rep.shape, dtype=np.int64), 1, calls=c,
                                    is_bounds=is_bounds)[0]
