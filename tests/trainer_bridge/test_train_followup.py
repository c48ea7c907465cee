"""`gymtape train` on the multi-turn `followup` env, short: each two-call rollout trains as ONE
sequence holding both turns, the loss mask on each call's generation and 0 on the env's message,
and sampler and trainer agree to the numeric floor. (Whether the env is learnable is shown by a
long `gymtape train` run, not by this test: a few steps cannot show learning.)"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest

from recorder import Tape
from trainer_bridge import build_sequences
from trainer_bridge._train import TrainConfig, train

pytestmark = pytest.mark.slow


def test_two_call_rollouts_train_as_one_sequence_masked_on_both_generations(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "run"
    # seed pinned (sampling is seeded per request): both rounds hold two-call rollouts and groups
    # whose rewards differ. Temperature 1 (the default): the hf engine records raw logprobs, which
    # are the sampling distribution's only at temperature 1.
    cfg = TrainConfig(out=out, env="followup", model=str(model_dir), steps=2, groups_per_step=2, group_size=4,
                      val_every=0, val_tasks=2, concurrency=16, threads=1, seed=0, lr=1e-5)
    report = train(cfg, log=lambda line: None)

    rows = [orjson.loads(x) for x in (out / "metrics.jsonl").read_bytes().splitlines()]
    steps = rows[1:]
    assert [r["policy_version"] for r in rows] == [0, 1, 2] and report.final_version == 2
    assert all(r["sequences_trained"] > 0 and math.isfinite(r["loss"]) for r in steps), steps
    assert all(r["calls_mean"] > 1 for r in steps), "the batches held two-call sequences"
    # fp32 sampler and trainer on the same weights, on-policy: mismatch at the numeric floor
    assert all(r["kl_k3"] < 1e-8 and r["token_mult_prob_error"] < 1.0001 and r["staleness_max"] == 0 for r in steps), \
        [{k: r[k] for k in ("kl_k3", "token_mult_prob_error", "max_abs_dlogprob")} for r in steps]
    assert len(rows[0]["val_turn_rewards"]) == 2 and rows[0]["val_calls_mean"] >= 1

    # What the follower builds from the run's tape: one sequence per rollout, spanning its calls.
    tape = Tape(out / "tape")
    seqs = build_sequences(tape, include_open=False).to_pylist()
    index = tape.calls_by_rollout(("generation_logprobs",))
    two_call = [s for s in seqs if s["num_calls"] == 2]
    assert two_call and len(seqs) == 2 * 2 * 4  # every training rollout, none split
    for s in two_call:
        calls = index.get(s["rollout_id"])
        (p0, p1), (g0, g1) = calls["prompt_ids"], calls["generation_ids"]
        ids, mask = np.array(s["input_ids"]), np.array(s["loss_mask"])
        assert np.array_equal(ids, np.concatenate([p1, g1])), "the last call's prompt + generation"
        assert np.array_equal(ids[: p0.size + g0.size], np.concatenate([p0, g0])), "turn 1 where it was sampled"
        expected = np.zeros(ids.size, dtype=np.int8)
        expected[p0.size: p0.size + g0.size] = 1  # turn 1's generation
        expected[p1.size:] = 1  # turn 2's generation; the env's follow-up between them stays 0
        assert np.array_equal(mask, expected)
        assert p1.size > p0.size + g0.size and mask[p0.size + g0.size: p1.size].sum() == 0
        lp = np.array(s["behaviour_logprobs"], dtype=np.float32)
        assert np.array_equal(lp[mask == 1], np.concatenate(calls["generation_logprobs"]).astype(np.float32))
        assert set(np.array(s["token_call_index"])[mask == 1]) == {0, 1}
        assert s["min_policy_version"] == s["max_policy_version"], "both turns sampled by one policy version"
