"""A tape written through ``TapeSink`` by Gym's own capture path is one training set, read two ways.

Gym rebuilds a rollout from its frozen entries (``consumer.trajectories_from_source`` over a
``TapeSource``: parent links verified by digest, delta prompts rebuilt, the chain projected to
output items); gymtape's trainer bridge builds the same rollout from the tape's call rows
(``build_sequences``: offsets arithmetic over the delta-encoded prompts). Both must give the
tokens the sampler saw, the loss mask over exactly the generated tokens, and the sampling
logprobs. A difference would mean one reader trains on tokens the policy never produced.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from tests.gym_capture.conftest import require_gym

require_gym()

from nemo_gym.token_id_capture.consumer import trajectories_from_source  # noqa: E402

from recorder import Tape, TapeLineage, TapeSink, TapeSource, TapeWriter  # noqa: E402
from tests.gym_capture.driver import expected_sequence, run_rollout  # noqa: E402
from trainer_bridge import TapeDataset, TapeFilters, build_sequences  # noqa: E402

TURNS = {f"rollout-{n}": (n, 2 + n % 4) for n in range(8)}  # id: (seed, turns); 2-5 calls each


def _gym_sequence(built: dict) -> tuple[list[int], list[int], list[float]]:
    """Tokens, loss mask and logprobs of Gym's rebuilt response (its generated items)."""
    items = [i for i in built["rebuilt_response"]["output"] if i.get("generation_token_ids") is not None]
    last = items[-1]
    ids = list(last["prompt_token_ids"]) + list(last["generation_token_ids"])
    mask, lps = [0] * len(ids), [0.0] * len(ids)
    for item in items:
        start = len(item["prompt_token_ids"])
        for j, lp in enumerate(item["generation_log_probs"]):
            mask[start + j], lps[start + j] = 1, lp
    return ids, mask, lps


async def _capture(tape: Path) -> None:
    sink, lineage = TapeSink(tape), TapeLineage(tape)
    try:
        await asyncio.gather(*(run_rollout(sink, lineage, rid, seed, turns) for rid, (seed, turns) in TURNS.items()))
    finally:
        await sink.close()
        await lineage.close()


@pytest.fixture
def captured(tmp_path: Path) -> Path:
    tape = tmp_path / "tape"
    asyncio.run(_capture(tape))
    return tape


def test_gym_trajectories_from_a_tape_match_build_sequences_token_for_token(captured: Path) -> None:
    source = TapeSource(captured)
    built = {rid: asyncio.run(trajectories_from_source(rid, source)) for rid in TURNS}
    asyncio.run(source.close())
    seqs = build_sequences(captured, include_open=True)
    assert sorted(seqs["rollout_id"].to_pylist()) == sorted(TURNS), "one sequence per linear rollout"
    by_rollout = {r["rollout_id"]: r for r in seqs.to_pylist()}
    for rid, (seed, turns) in TURNS.items():
        g = built[rid]
        assert not g["mask_sample"], f"{rid}: Gym masked a clean rollout: {g.get('error') or g['metrics']}"
        assert g["metrics"]["n_calls"] == turns and g["metrics"]["chains"] == 1
        ids, mask, lps = _gym_sequence(g)
        ours = by_rollout[rid]
        assert ours["input_ids"] == ids, f"{rid}: the trainer bridge and Gym's builder see different tokens"
        assert ours["loss_mask"] == mask, f"{rid}: they train on different tokens"
        np.testing.assert_array_equal(np.asarray(ours["behaviour_logprobs"], np.float32), np.asarray(lps, np.float32),
                                      err_msg=f"{rid}: behaviour logprobs differ")
        want_ids, want_mask, want_lps = expected_sequence(seed, turns)
        assert ids == want_ids and mask == want_mask, f"{rid}: not the tokens the sampler produced"
        assert lps == want_lps, f"{rid}: Gym's logprobs from the tape are not the sampler's, exactly"


def test_calls_on_the_tape_are_delta_encoded_like_any_recorded_call(captured: Path) -> None:
    """Gym's delta records (prompts relative to the resolved parent) become the tape's own delta
    encoding: each call stores only what its prompt adds to the previous context."""
    calls = Tape(captured).read("calls").to_pylist()
    assert len(calls) == sum(t for _, t in TURNS.values())
    for c in calls:
        added = len(c["prompt_suffix_ids"])
        if c["call_index"]:
            assert c["prefix_len"] > 0 and added < 12, f"{c['call_id']}: stored {added} prompt tokens, not a delta"
        assert c["call_id"].startswith(c["rollout_id"] + "/")


def test_dropped_rollouts_train_with_tape_dataset_and_an_incomplete_one_is_left_out(captured: Path) -> None:
    async def finalize() -> None:
        source, sink = TapeSource(captured), TapeSink(captured)
        for rid in TURNS:
            if rid == "rollout-3":
                await sink.mark_incomplete(rid, "lost-call")
            built = await trajectories_from_source(rid, source)
            snap = built["_capture_snapshot"]
            assert built["mask_sample"] == (rid == "rollout-3")
            assert await source.drop(rid, snapshot_id=snap["snapshot_id"], version=snap["version"])
        await source.close()
        await sink.close()

    asyncio.run(finalize())
    rollouts = {r["rollout_id"]: r for r in Tape(captured).read("rollouts").to_pylist()}
    assert set(rollouts) == set(TURNS)
    assert rollouts["rollout-3"]["token_status"] == "incomplete"
    assert all(r["token_status"] == "ok" and r["num_calls"] == TURNS[rid][1]
               for rid, r in rollouts.items() if rid != "rollout-3")
    ds = TapeDataset(captured, token_budget=4096, shuffle=False, filters=TapeFilters(require_reward=False))
    assert ds.stats["rollouts_incomplete"] == 1 and ds.num_rollouts == len(TURNS) - 1
    got = {}
    for mb in ds:
        for sid, ids, mask in zip(mb.sequence_ids, mb.split(mb.input_ids), mb.split(mb.extras["loss_mask"])):
            got[sid] = (ids.tolist(), mask.astype(int).tolist())
    want = {rid: expected_sequence(*TURNS[rid])[:2] for rid in TURNS if rid != "rollout-3"}
    assert sorted(got.values()) == sorted(want.values()), "TapeDataset trains on other tokens than were sampled"


def test_a_capture_tape_is_a_tape_other_writers_can_share(captured: Path) -> None:
    """Rows that are not capture rows (a `gymtape serve` writer on the same tape) are left alone."""
    from recorder import CallRecord

    with TapeWriter(captured, handle_signals=False) as w:
        w.add_call(CallRecord(rollout_id="served-0", call_index=0, prompt_ids=[1, 2], generation_ids=[3],
                              generation_logprobs=[-0.5], output={"role": "assistant", "content": "hi"}))
    source = TapeSource(captured, share=False)
    snap = asyncio.run(source.freeze("rollout-1"))
    assert len(snap.entries) == TURNS["rollout-1"][1] and not snap.incomplete
    assert asyncio.run(source.freeze("served-0")).entries == ()
    asyncio.run(source.close())
