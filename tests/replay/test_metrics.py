"""Replay mismatch metrics against values worked out by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from replay._metrics import METRIC_NAMES, grouped_metrics, token_metrics

LN2 = math.log(2)
# Probabilities: recorded (sampler) 0.5, 0.25, 0.1; replayed (trainer) 0.5, 0.5, 0.05.
# So d = [0, ln 2, -ln 2] and r = exp(d) = [1, 2, 0.5]; the first two tokens are call 0, the last call 1.
RECORDED = np.log([0.5, 0.25, 0.1]).astype(np.float32)
REPLAYED = np.log([0.5, 0.5, 0.05]).astype(np.float32)
CALLS = np.array([0, 0, 1])


def test_metrics_of_three_tokens_by_hand() -> None:
    m = token_metrics(REPLAYED, RECORDED, calls=CALLS, is_bounds=(0.6, 1.5))
    assert set(m) == set(METRIC_NAMES)
    expected = {
        "tokens": 3,
        "mean_abs_dlogprob": 2 * LN2 / 3,
        "max_abs_dlogprob": LN2,
        "mean_abs_dprob": (0 + 0.25 + 0.05) / 3,
        "max_abs_dprob": 0.25,
        "kl_k1": 0.0,                                   # mean(-d)
        "kl_k2": (LN2**2 / 2) * 2 / 3,                  # mean(d^2 / 2)
        "kl_k3": ((2 - 1 - LN2) + (0.5 - 1 + LN2)) / 3,  # mean(r - 1 - d) = 0.5 / 3
        "token_mult_prob_error": (1 + 2 + 2) / 3,       # mean(exp|d|)
        "seq_is_ratio": (2 + 0.5) / 2,                  # call 0: exp(0 + ln2) = 2, call 1: exp(-ln2) = 0.5
        "geo_mean_is_ratio": 1.0,                       # exp(mean d) = exp(0)
        "frac_outside_is_bounds": 2 / 3,                # r = 2 and r = 0.5 lie outside [0.6, 1.5]
        "chi2": (0 + 1 + 0.25) / 3,                     # mean((r - 1)^2)
        "ess": 3.5**2 / (3 * (1 + 4 + 0.25)),           # (sum r)^2 / (N sum r^2)
    }
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-6), k
    assert m["kl_k3"] == pytest.approx(0.5 / 3, abs=1e-6)


def test_identical_logprobs_are_a_perfect_match() -> None:
    lp = np.log(np.array([0.9, 0.01, 0.3, 0.7]))
    m = token_metrics(lp, lp)
    zero = ("mean_abs_dlogprob", "max_abs_dlogprob", "mean_abs_dprob", "max_abs_dprob", "kl_k1", "kl_k2", "kl_k3",
            "frac_outside_is_bounds", "chi2")
    assert all(m[k] == 0.0 for k in zero)
    assert m["token_mult_prob_error"] == m["seq_is_ratio"] == m["geo_mean_is_ratio"] == m["ess"] == 1.0


def test_grouping_splits_tokens_and_empty_groups_are_null() -> None:
    groups = np.array([0, 1, 1])
    per = grouped_metrics(REPLAYED, RECORDED, groups, 3, calls=CALLS)
    assert [p["tokens"] for p in per] == [1, 2, 0]
    assert per[0]["max_abs_dlogprob"] == pytest.approx(0.0, abs=1e-6)
    # group 1 holds token 1 (call 0, d = ln2) and token 2 (call 1, d = -ln2): two one-token "sequences"
    assert per[1]["seq_is_ratio"] == pytest.approx((2 + 0.5) / 2, abs=1e-6)
    assert per[1]["kl_k1"] == pytest.approx(0.0, abs=1e-6)
    assert per[1]["ess"] == pytest.approx(2.5**2 / (2 * 4.25), abs=1e-6)
    assert all(v is None for k, v in per[2].items() if k != "tokens")
    # the default bounds [0.5, 2] hold r = 1.5, and not r = 2.5
    m = token_metrics(np.log([1.5, 2.5]), np.zeros(2))
    assert m["frac_outside_is_bounds"] == 0.5


def test_overflow_saturates_instead_of_inf() -> None:
    m = token_metrics(np.array([0.0]), np.array([-1000.0]))  # the trainer finds a token e^1000 times likelier
    assert m["max_abs_dlogprob"] == 1000.0
    assert m["chi2"] == 1e308 and m["seq_is_ratio"] == pytest.approx(math.exp(700))
    assert m["ess"] == 1.0  # one token: ess is 1 whatever its ratio


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="1-D"):
        grouped_metrics(np.zeros(3), np.zeros(2), np.zeros(3, dtype=int), 1, calls=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="is_bounds"):
        token_metrics(np.zeros(2), np.zeros(2), is_bounds=(2.0, 0.5))
