"""2 ranks (torchrun, gloo, CPU) x 2 DataLoader workers: every sequence exactly once per epoch."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson

from tests.conftest import ROOT
from trainer_bridge import build_sequences

WORKER = Path(__file__).with_name("sharding_worker.py")


def _run_ranks(tape: Path, out: Path, epoch: int) -> list[dict]:
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), str(tape), str(out), str(epoch)],
        env=env, capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [orjson.loads((out / f"rank{r}.json").read_bytes()) for r in range(2)]


def test_two_ranks_times_two_workers_see_every_sequence_exactly_once(make_tape, tmp_path: Path) -> None:
    tape, _ = make_tape(repeats=4, calls=3, context_tokens=160, rewrite_every=3, seed=3)
    table = build_sequences(tape)
    expected = table["sequence_id"].to_pylist()
    group_of = {r["sequence_id"]: r["group_key"] for r in table.select(["sequence_id", "group_key"]).to_pylist()}
    for epoch in (0, 1):
        ranks = _run_ranks(tape, tmp_path / f"epoch{epoch}", epoch)
        seen = Counter(s for r in ranks for b in r["batches"] for s in b["sequence_ids"])
        assert sorted(seen) == sorted(expected) and set(seen.values()) == {1}
        shards_of_group: dict[str, set] = {}
        for r in ranks:
            assert {tuple(b["shard"][:2]) for b in r["batches"]} == {(r["rank"], 2)}
            workers = {b["shard"][2] for b in r["batches"]}
            assert workers == {0, 1}, "both DataLoader workers of each rank produced batches"
            for b in r["batches"]:
                for s in b["sequence_ids"]:
                    shards_of_group.setdefault(group_of[s], set()).add(tuple(b["shard"]))
            # The main process counted each worker's batches: the state resumes this exact epoch.
            assert r["state"]["epoch"] == epoch
            assert sum(r["state"]["consumed"].values()) == len(r["batches"])
        assert all(len(s) == 1 for s in shards_of_group.values()), "GRPO groups stay whole on one shard"
