"""TapeFollower: a writer thread appends shards with rising policy versions while the follower reads."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from recorder import CallRecord, RolloutRecord, TapeWriter
from trainer_bridge import FollowerTimeout, TapeFollower

GROUP_SIZE = 3


def _write_group(w: TapeWriter, key: str, version: int, rng: np.random.Generator) -> None:
    for i in range(GROUP_SIZE):
        rid = f"{key}-{i}"
        prompt = rng.integers(0, 1000, size=6).tolist()
        for k in range(2):  # two calls, the second extends the first
            gen = rng.integers(0, 1000, size=3).tolist()
            w.add_call(CallRecord(rollout_id=rid, call_index=k, prompt_ids=prompt, generation_ids=gen,
                                  generation_logprobs=[-0.5] * 3, policy_version=version))
            prompt = prompt + gen + [7, 7]
        w.add_rollout(RolloutRecord(rollout_id=rid, group_key=key, env="e", reward=float(i == 0)))
    w.flush()  # publish: the follower may see this group now


class _Sampler(threading.Thread):
    """Writes rounds of groups, one round per trainer version; samplers lag 0..3 versions behind."""

    def __init__(self, tape: Path) -> None:
        super().__init__(daemon=True)
        self.tape = tape
        self.version = 0
        self.changed = threading.Condition()
        self.stop = False
        self.error: BaseException | None = None
        self.written: dict[str, int] = {}

    def publish(self, version: int) -> None:
        with self.changed:
            self.version = version
            self.changed.notify_all()

    def finish(self) -> None:
        with self.changed:
            self.stop = True
            self.changed.notify_all()
        self.join(timeout=30)

    def run(self) -> None:
        rng = np.random.default_rng(0)
        try:
            with TapeWriter(self.tape, flush_seconds=None, handle_signals=False) as w:
                while True:
                    with self.changed:
                        if self.stop:
                            return
                        v = self.version
                    for lag in (2, 0, 3, 1):  # stale groups arrive between fresh ones
                        key = f"v{v}-lag{lag}"
                        self.written[key] = max(0, v - lag)
                        _write_group(w, key, max(0, v - lag), rng)
                    with self.changed:
                        self.changed.wait_for(lambda: self.stop or self.version != v)
        except BaseException as e:  # surfaced by the test
            self.error = e


def test_follower_respects_the_staleness_bound_while_a_writer_appends(tmp_path: Path) -> None:
    tape = tmp_path / "tape"
    sampler = _Sampler(tape)
    follower = TapeFollower(tape, max_staleness=1, groups_per_batch=2, group_size=GROUP_SIZE, poll_interval=0.01)
    sampler.start()
    used: list[str] = []
    try:
        for version in range(6):
            batch = follower.next_batch(trainer_version=version, timeout=60)
            t = batch.table
            assert batch.num_groups == 2
            assert (np.asarray(t["staleness"]) <= 1).all()
            assert (np.asarray(t["staleness"]) == version - np.asarray(t["min_policy_version"])).all()
            assert (np.asarray(t["weight"]) == 1.0).all()
            groups = set(t["group_key"].to_pylist())
            assert all(sum(1 for g in t["group_key"].to_pylist() if g == k) == GROUP_SIZE for k in groups)
            adv = np.asarray(t["advantage"]).reshape(-1)
            assert abs(adv.sum()) < 1e-4  # centred within each group
            used += t["rollout_id"].to_pylist()
            mbs = batch.micro_batches(token_budget=64)
            assert sorted(s for mb in mbs for s in mb.sequence_ids) == sorted(t["sequence_id"].to_pylist())
            sampler.publish(version + 1)
    finally:
        sampler.finish()
    assert sampler.error is None, sampler.error
    assert len(used) == len(set(used)), "a rollout was used twice"
    stats = follower.stats()
    assert stats.batches == 6 and stats.groups_used == 12 and stats.rollouts_used == 36
    assert stats.groups_dropped_stale >= 6  # the lag-2 and lag-3 groups of each round
    assert stats.staleness_max <= 1 and 0 <= stats.staleness_mean <= 1
    stale_keys = {k for k, v in sampler.written.items() if int(k.split("-")[0][1:]) - v > 1}
    assert not stale_keys & {rid.rsplit("-", 1)[0] for rid in used}


def _static_tape(tmp_path: Path, versions: list[int]) -> Path:
    tape = tmp_path / "static"
    rng = np.random.default_rng(1)
    with TapeWriter(tape, flush_seconds=None, handle_signals=False) as w:
        for g, v in enumerate(versions):
            _write_group(w, f"g{g}", v, rng)
    return tape


def test_downweight_keeps_stale_groups_with_decaying_weight(tmp_path: Path) -> None:
    tape = _static_tape(tmp_path, [5, 3, 1])
    follower = TapeFollower(tape, max_staleness=1, groups_per_batch=3, group_size=GROUP_SIZE, stale="downweight")
    t = follower.next_batch(trainer_version=5, timeout=10).table
    weight = dict(zip(t["group_key"].to_pylist(), t["weight"].to_pylist()))
    assert weight == {"g0": 1.0, "g1": 0.5, "g2": 0.125}  # staleness 0, 2, 4 with bound 1
    s = follower.stats()
    assert s.sequences_downweighted == 2 * GROUP_SIZE and s.staleness_max == 4 and s.groups_dropped_stale == 0


def test_strictly_on_policy_drops_everything_older_and_times_out(tmp_path: Path) -> None:
    tape = _static_tape(tmp_path, [2, 3, 3])
    follower = TapeFollower(tape, max_staleness=0, groups_per_batch=2, group_size=GROUP_SIZE)
    t = follower.next_batch(trainer_version=3, timeout=10).table
    assert set(t["group_key"].to_pylist()) == {"g1", "g2"}
    assert follower.stats().groups_dropped_stale == 1
    with pytest.raises(FollowerTimeout, match="0 complete group"):
        follower.next_batch(trainer_version=3, timeout=0.05)  # nothing left: each rollout is used once


def test_follower_reads_through_an_fsspec_filesystem(tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    tape = _static_tape(tmp_path, [0, 0])
    mem = fsspec.filesystem("memory")
    for f in tape.rglob("*"):
        if f.is_file():
            mem.pipe(f"/remote/tape/{f.relative_to(tape)}", f.read_bytes())
    mem.pipe("/remote/tape/calls/.half-written.parquet.1-abc.tmp", b"not parquet")  # readers skip temp files
    follower = TapeFollower("/remote/tape", filesystem=mem, max_staleness=0, groups_per_batch=2, group_size=GROUP_SIZE)
    t = follower.next_batch(trainer_version=0, timeout=10).table
    assert t.num_rows == 2 * GROUP_SIZE and follower.stats().shards_read == 4  # 2 flushes x (calls, rollouts)
