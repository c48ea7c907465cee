"""Ingest throughput and storage of the tape, against naive conversion measured in the same run.

Data: synthetic agentic Gym rollouts with 16 model calls each, the context growing to about
4k tokens, token IDs from a 150k vocabulary (``recorder.synthesize_gym_rollouts``).

Baseline: ``json.loads`` per line + ``pyarrow.Table.from_pylist`` of one row per call with its
full prompt (no delta encoding) + zstd Parquet, i.e. what one writes without gymtape.

Targets (the foundation issue): tape bytes <= 1/5 of the Gym JSONL bytes; tokens stored <=
1.25x unique tokens; ingest >= 30 MB/s of JSONL on one core.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import best_of, machine, pin_to_one_core, target  # noqa: E402

pin_to_one_core()

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import orjson  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

pa.set_cpu_count(1)
pa.set_io_thread_count(1)

from recorder import Tape, ingest_gym_jsonl, synthesize_gym_rollouts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def naive_convert(src: Path, out: Path) -> None:
    out.mkdir()
    calls, rollouts, n = [], [], 0
    for line in open(src, "rb"):
        d = json.loads(line)
        rid = str(n)
        n += 1
        for k, item in enumerate(it for it in d["response"]["output"] if "prompt_token_ids" in it):
            calls.append({
                "rollout_id": rid,
                "call_index": k,
                "prompt_token_ids": item.pop("prompt_token_ids"),
                "generation_token_ids": item.pop("generation_token_ids"),
                "generation_log_probs": item.pop("generation_log_probs"),
            })
        rollouts.append({"rollout_id": rid, "reward": d.get("reward"), "line": json.dumps(d)})
    pq.write_table(pa.Table.from_pylist(calls), out / "calls.parquet", compression="zstd")
    pq.write_table(pa.Table.from_pylist(rollouts), out / "rollouts.parquet", compression="zstd")



def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rollouts", type=int, default=96)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tasks = [orjson.loads(x) for x in (ROOT / "datasets" / "demo_tasks.jsonl").read_bytes().splitlines() if x.strip()]
    repeats = max(1, args.rollouts // len(tasks))
    work = Path(tempfile.mkdtemp(prefix="gymtape-bench-"))
    try:
        src = work / "rollouts.jsonl"
        with open(src, "wb") as f:
            for line in synthesize_gym_rollouts(tasks, repeats=repeats, calls=16, context_tokens=4096, vocab_size=150_000):
                f.write(orjson.dumps(line) + b"\n")
        mb = src.stat().st_size / 1e6
        print(f"# machine: {machine()}; pinned to 1 core")
        print(f"# data: {repeats * len(tasks)} rollouts x 16 calls, context -> 4096 tokens, vocab 150k; {mb:.1f} MB JSONL")

        def run_ingest() -> None:
            shutil.rmtree(work / "tape", ignore_errors=True)
            ingest_gym_jsonl([src], work / "tape", strict=True)

        def run_naive() -> None:
            shutil.rmtree(work / "naive", ignore_errors=True)
            naive_convert(src, work / "naive")

        t_ingest = best_of(args.runs, run_ingest)
        t_naive = best_of(args.runs, run_naive)
        tape_bytes = dir_bytes(work / "tape")
        naive_bytes = dir_bytes(work / "naive")
        calls = Tape(work / "tape").calls().collect()
        stored = int(calls["prompt_suffix_ids"].list.len().sum() + calls["generation_ids"].list.len().sum())
        unique = 0
        for line in open(src, "rb"):
            last = [it for it in orjson.loads(line)["response"]["output"] if "prompt_token_ids" in it][-1]
            unique += len(last["prompt_token_ids"]) + len(last["generation_token_ids"])
        print(f"# ingest {t_ingest:.2f} s ({mb / t_ingest:.1f} MB/s); naive json.loads+pyarrow {t_naive:.2f} s "
              f"({mb / t_naive:.1f} MB/s); speed-up {t_naive / t_ingest:.2f}x")
        print(f"# bytes: JSONL {src.stat().st_size:,}  tape {tape_bytes:,}  naive parquet {naive_bytes:,} "
              f"(tape is {naive_bytes / tape_bytes:.1f}x smaller than naive)")
        ok = [
            target("ingest_throughput", mb / t_ingest, "MB/s", ">=", 30),
            target("ingest_vs_naive", t_naive / t_ingest, "x", ">=", 1.0),
            target("tape_bytes_over_jsonl", tape_bytes / src.stat().st_size, "ratio", "<=", 0.2),
            target("stored_over_unique_tokens", stored / unique, "ratio", "<=", 1.25),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
