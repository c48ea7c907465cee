"""Mismatch metrics against values worked out by hand on small arrays, and the trainer's view of
them (``trainer_bridge.mismatch_metrics``, torch) against replay's (numpy) on the same tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from replay import grouped_metrics, token_metrics
from trainer_bridge import MISMATCH_METRIC_NAMES as METRIC_NAMES
from trainer_bridge import mismatch_metrics

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trainer_step_and_replay_report_the_same_mismatch_on_the_same_tokens(seed: int, dtype: torch.dtype) -> None:
    """The torch metrics a training step logs equal replay's numpy ones, group by group, extremes included."""
    rng = np.random.default_rng(seed)
    n, n_groups = 301, 5
    rec = rng.normal(-2.0, 1.5, n)
    rep = rec + rng.normal(0.0, 0.3, n)
    # |d| far beyond exp's float64 range both ways, an exact match, and a token the sampler found impossible-ish
    rep[:4] = rec[:4] + np.array([750.0, -800.0, 0.0, 1e4])
    groups = rng.integers(0, n_groups - 1, n)  # the last group stays empty
    groups[:4] = 0
    mask = rng.random(n) < 0.7
    mask[:4] = True
    rep_t, rec_t = torch.tensor(rep, dtype=dtype), torch.tensor(rec, dtype=dtype)
    rep_np, rec_np = rep_t.double().numpy(), rec_t.double().numpy()  # what each side sees, same rounding
    sel = np.flatnonzero(mask)
    per_group = grouped_metrics(rep_np[sel], rec_np[sel], groups[sel], n_groups, calls=np.zeros(sel.size, np.int64))
    for g in range(n_groups):
        trainer = mismatch_metrics(rep_t, rec_t, torch.tensor(mask & (groups == g)))
        assert set(trainer) <= set(METRIC_NAMES)
        for k, v in trainer.items():
            want = per_group[g][k]
            if want is None:
                assert v is None, f"group {g} {k}: the trainer reports {v} for a group without tokens"
            else:
                assert v == pytest.approx(want, rel=1e-12, abs=0), \
                    f"group {g} {k}: trainer {v} != replay {want}: the two definitions have drifted apart"
                assert math.isfinite(v), f"group {g} {k} = {v}: overflow must saturate, not reach inf/NaN"
    assert per_group[0]["max_abs_dlogprob"] == pytest.approx(1e4, rel=1e-6) and per_group[n_groups - 1]["tokens"] == 0
    empty = mismatch_metrics(rep_t, rec_t, torch.zeros(n, dtype=torch.bool))
    assert empty and all(v is None for v in empty.values()), "an empty mask has no metrics"
