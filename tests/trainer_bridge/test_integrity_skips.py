"""TapeDataset and TapeFollower leave out rollouts whose calls are missing, incomplete ones and
failed rows a retry superseded, and count each in their stats (tapes written by TapeWriter)."""

from __future__ import annotations

from pathlib import Path

import pytest

from recorder import CallRecord, TapeWriter
from tests.tape.broken_tapes import write_integrity_tape
from trainer_bridge import FollowerTimeout, TapeDataset, TapeFollower


def _rollouts_of(batches: list) -> set[str]:  # noqa: ANN001
    return {sid.rsplit("/", 1)[0] for mb in batches for sid in mb.sequence_ids}


@pytest.mark.parametrize("cache", [True, False])
def test_dataset_skips_rollouts_missing_calls_or_incomplete_with_counts(tmp_path: Path, cache: bool) -> None:
    ids = write_integrity_tape(tmp_path / "t")
    ds = TapeDataset(tmp_path / "t", token_budget=64, seed=0, cache=cache)
    assert ds.stats == {"rollouts": 13, "rollouts_selected": 8, "rollouts_superseded": 1, "rollouts_incomplete": 1,
                        "rollouts_missing_calls": 3, "rollouts_filtered": 0, "rollouts_left_out_by_group": 0}
    used = _rollouts_of(list(ds))
    assert used == {ids["clean"], ids["retried_new"], *(f"clean-{t}-1" for t in range(6))}, \
        "a rollout with a gap in its calls must be left out, not fail the epoch or train on half a chain"


def test_follower_leaves_out_rollouts_whose_calls_never_come_and_counts_them(tmp_path: Path) -> None:
    ids = write_integrity_tape(tmp_path / "t")
    follower = TapeFollower(tmp_path / "t", max_staleness=0, groups_per_batch=6, group_size=2,
                            missing_calls_timeout=0.2, poll_interval=0.01)
    batch = follower.next_batch(trainer_version=0, timeout=60)
    s = batch.stats
    assert (s.rollouts_missing_calls, s.rollouts_incomplete, s.rollouts_superseded) == (3, 1, 1)
    assert s.rollouts_used == 8 and s.groups_used == 6 and s.rollouts_filtered == 0
    assert set(batch.table["rollout_id"].to_pylist()) == \
        {ids["clean"], ids["retried_new"], *(f"clean-{t}-1" for t in range(6))}


def test_follower_waits_for_calls_that_arrive_late(tmp_path: Path) -> None:
    """Within ``missing_calls_timeout`` a rollout row waits for its calls (another writer may
    publish them later); once they arrive the rollout is used, not counted as missing."""
    ids = write_integrity_tape(tmp_path / "t", kinds=("clean", "short"))
    follower = TapeFollower(tmp_path / "t", max_staleness=0, groups_per_batch=2, group_size=2,
                            missing_calls_timeout=600, poll_interval=0.01)
    with pytest.raises(FollowerTimeout):
        follower.next_batch(trainer_version=0, timeout=0.3)
    with TapeWriter(tmp_path / "t", flush_seconds=None, handle_signals=False) as w:
        w.add_call(CallRecord(rollout_id=ids["short"], call_index=2, prompt_ids=[1, 2, 3], generation_ids=[4, 5],
                              generation_logprobs=[-0.1, -0.2]))
    batch = follower.next_batch(trainer_version=0, timeout=60)
    assert ids["short"] in set(batch.table["rollout_id"].to_pylist())
    assert batch.stats.rollouts_missing_calls == 0 and batch.stats.rollouts_used == 4
