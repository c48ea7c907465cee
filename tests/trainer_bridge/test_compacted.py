"""The loader on a compacted tape gives exactly the micro-batches of the tape it came from.

The source tape is written as a live recording writes it: rollouts in flight at once (their
calls interleaved), small shards, history rewrites, prompt suffixes of 1-3 tokens. Two copies
are checked against it: ``recorder.compact_tape``'s, and the same sorted layout by hand in
row groups of 16 rows (so rollouts straddle row groups: the loader reads several chunks) with
the rollout rows in reverse order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from recorder import CallRecord, RolloutRecord, Tape, TapeWriter, compact_tape
from trainer_bridge import TapeDataset


def _rollout(rng: np.random.Generator, r: int, calls: int) -> tuple[list[CallRecord], RolloutRecord]:
    rid = f"r{r:04d}"
    ctx = rng.integers(0, 50_000, int(rng.integers(5, 40)), dtype=np.int32)
    out = []
    for k in range(calls):
        if r % 3 == 2 and k == 2:  # a summarising harness rewrites the history
            ctx = np.concatenate([ctx[:4], rng.integers(0, 50_000, 6, dtype=np.int32)])
        # Tool output or just a chat template's few tokens (runs short enough to sit in a view).
        extra = int(rng.choice([1, 2, 3, 17])) if k else 0
        prompt = np.concatenate([ctx, rng.integers(0, 50_000, extra, dtype=np.int32)])
        gen = rng.integers(0, 50_000, int(rng.integers(1, 30)), dtype=np.int32)
        lp = -rng.random(gen.size, dtype=np.float32)
        out.append(CallRecord(rollout_id=rid, call_index=k, prompt_ids=prompt, generation_ids=gen,
                              generation_logprobs=lp, policy_version=r // 8))
        ctx = np.concatenate([prompt, gen])
    return out, RolloutRecord(rollout_id=rid, group_key=f"task{r // 4}", env="t", reward=float(rng.random() < 0.5))


def _write_live(path: Path, rollouts: int = 30, in_flight: int = 5) -> None:
    rng = np.random.default_rng(3)
    pending = [_rollout(rng, r, int(rng.integers(2, 6))) for r in range(rollouts)]
    active: list[list] = []
    with TapeWriter(path, flush_seconds=None, handle_signals=False, flush_rows=7) as w:
        while pending or active:
            while pending and len(active) < in_flight:
                active.append([*pending.pop(0), 0])
            for item in list(active):  # one call of every rollout in flight, in turn
                calls, rollout, k = item
                w.add_call(calls[k])
                item[2] += 1
                if item[2] == len(calls):
                    w.add_rollout(rollout)
                    active.remove(item)


def _sorted_copy(src: Path, dst: Path) -> None:
    """Compaction's layout (calls by rollout, call index) in small row groups, rollouts reversed."""
    tape = Tape(src)
    (dst / "calls").mkdir(parents=True)
    (dst / "rollouts").mkdir()
    (dst / "tape.json").write_bytes((src / "tape.json").read_bytes())
    for table, keys, order in (("calls", ["rollout_id", "call_index"], "ascending"),
                               ("rollouts", ["rollout_id"], "descending")):
        rows = tape.read(table)
        rows = rows.take(pc.sort_indices(rows, [(k, order) for k in keys]))
        metadata = pq.read_schema(str(tape.shards(table)[0].path)).metadata
        pq.write_table(rows.replace_schema_metadata(metadata), dst / table / "sortedcopy-000000.parquet",
                       compression="zstd", row_group_size=16)


def _epoch(tape: Path, cache: bool, epoch: int, shard: tuple[int, int]) -> list:
    ds = TapeDataset(tape, token_budget=160, seed=5, rank=shard[0], world_size=shard[1], cache=cache)
    ds.set_epoch(epoch)
    return list(ds)


@pytest.fixture(scope="module")
def tapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compacted")
    _write_live(root / "live")
    compact_tape(str(root / "live"), to=str(root / "compacted"))
    _sorted_copy(root / "live", root / "sorted")
    return {"live": root / "live", "compacted": root / "compacted", "sorted": root / "sorted"}


def test_the_copies_really_are_laid_out_differently(tapes: dict[str, Path]) -> None:
    live, compacted, by_hand = (Tape(tapes[k]) for k in ("live", "compacted", "sorted"))
    assert len(live.shards("calls")) > 10 and len(compacted.shards("calls")) == len(by_hand.shards("calls")) == 1
    live_rids = live.read("calls", ["rollout_id"])["rollout_id"].to_pylist()
    assert live_rids != sorted(live_rids)  # interleaved as recorded
    assert compacted.read("calls", ["rollout_id"])["rollout_id"].to_pylist() == sorted(live_rids)
    assert pq.ParquetFile(str(by_hand.shards("calls")[0].path)).num_row_groups > 4


@pytest.mark.parametrize("copy", ["compacted", "sorted"])
@pytest.mark.parametrize("cache", [False, True])
def test_compacted_tape_yields_the_same_micro_batches(tapes: dict[str, Path], copy: str, cache: bool) -> None:
    for epoch in (0, 1):
        for shard in ((0, 1), (0, 2), (1, 2)):
            want, got = _epoch(tapes["live"], cache, epoch, shard), _epoch(tapes[copy], cache, epoch, shard)
            assert len(got) == len(want) > 0
            for a, b in zip(want, got):
                assert a.sequence_ids == b.sequence_ids and a.group_keys == b.group_keys
                assert (a.epoch, a.shard, a.batch_index) == (b.epoch, b.shard, b.batch_index)
                for name in ("input_ids", "position_ids", "cu_seqlens", "rewards", "seq_advantages", "seq_weights"):
                    x, y = getattr(a, name), getattr(b, name)
                    assert x.dtype == y.dtype and torch.equal(x, y), name
                assert a.extras.keys() == b.extras.keys()
                for k in a.extras:
                    assert a.extras[k].dtype == b.extras[k].dtype and torch.equal(a.extras[k], b.extras[k]), k
            assert got[0].input_ids.dtype == torch.int32 and got[0].extras["loss_mask"].dtype == torch.bool
