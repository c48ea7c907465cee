"""Compaction throughput, against a plain pyarrow read + write of the same shards in the same run.

Data: a tape as `gymtape serve` writes it: many small shards. 64 rollouts in flight, their
calls interleaved, 4 calls each with contexts growing to about 2,000 tokens (tool turns between
calls), Qwen-sized random token IDs, a calls shard every 32 calls and a rollouts shard with
each flush, written by gymtape's TapeWriter (zstd, byte-stream-split logprobs).

Measured (one core, best of --runs rounds in which both contenders take turns, CPU time):
* ``compact_tape(tape, to=DIR)``: list and check every shard (footer, version, schema), read,
  concatenate, sort the calls by (rollout_id, call_index), write large shards (zstd,
  4,096-row row groups, the replaces/writers metadata), copy the manifests, tape.json last.
* Baseline: ``pyarrow.parquet.ParquetFile(shard).read()`` of every shard of each table (faster
  on small files than ``read_table``, which goes through the dataset layer), ``concat_tables``,
  one ``write_table`` per table with the same compression and row groups: what merging the
  shards costs with no gymtape at all.

Target (the redesign issue): compaction throughput >= 50% of the baseline's, source bytes per
CPU second. Wall-clock rates are printed alongside.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import best_of_each, machine, pin_to_one_core, target  # noqa: E402

pin_to_one_core()

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

pa.set_cpu_count(1)
pa.set_io_thread_count(1)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recorder import CallRecord, RolloutRecord, Tape, TapeWriter, compact_tape  # noqa: E402
from recorder.tape._shards import ROW_GROUP_ROWS  # noqa: E402

IN_FLIGHT = 64
CALLS = 4
VOCAB = 150_000


def calls_of(r: int, rng: np.random.Generator) -> Iterator[CallRecord]:
    prompt = rng.integers(0, VOCAB, size=int(rng.integers(200, 600)))
    for k in range(CALLS):
        n = int(rng.integers(50, 300))
        gen = rng.integers(0, VOCAB, size=n)
        yield CallRecord(rollout_id=f"r{r:06d}", call_index=k, prompt_ids=prompt, generation_ids=gen,
                         generation_logprobs=-rng.random(n).astype(np.float32) * 3, engine="bench", model="bench",
                         temperature=1.0, max_tokens=512)
        prompt = np.concatenate([prompt, gen, rng.integers(0, VOCAB, size=int(rng.integers(20, 120)))])


def write_live_tape(path: Path, rollouts: int, flush_calls: int) -> None:
    """Rollouts interleaved as a live server sees them, a flush (small shards) every ``flush_calls`` calls."""
    rng = np.random.default_rng(0)
    with TapeWriter(path, writer_id="serve", flush_rows=10**9, flush_seconds=None, handle_signals=False) as w:
        live = {r: calls_of(r, rng) for r in range(min(IN_FLIGHT, rollouts))}
        started, written = len(live), 0
        while live:
            for r in list(live):
                call = next(live[r], None)
                if call is None:
                    del live[r]
                    w.add_rollout(RolloutRecord(rollout_id=f"r{r:06d}", env="bench", task_index=r % 97,
                                                rollout_index=r // 97, reward=float(r % 2)))
                    if started < rollouts:
                        live[started] = calls_of(started, rng)
                        started += 1
                    continue
                w.add_call(call)
                written += 1
                if written % flush_calls == 0:
                    w.flush()


def plain_merge(src: Path, out: Path) -> None:
    """The baseline: read every shard, concatenate, write one file per table (no checks, no sort)."""
    out.mkdir()
    for table in ("calls", "rollouts"):
        paths = sorted(p for p in (src / table).iterdir() if p.suffix == ".parquet")
        data = pa.concat_tables([pq.ParquetFile(p).read() for p in paths])
        pq.write_table(data, out / f"{table}.parquet", compression="zstd", row_group_size=ROW_GROUP_ROWS,
                       use_byte_stream_split=["generation_logprobs"] if table == "calls" else False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rollouts", type=int, default=4096)
    ap.add_argument("--flush-calls", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gymtape-bench-"))
    try:
        tape = work / "tape"
        write_live_tape(tape, args.rollouts, args.flush_calls)
        t = Tape(tape)
        shards = {x: t.shards(x) for x in ("calls", "rollouts")}
        src_bytes = sum(s.bytes for ss in shards.values() for s in ss)
        mb = src_bytes / 1e6
        print(f"# machine: {machine()}; pinned to 1 core")
        print(f"# data: {args.rollouts} rollouts x {CALLS} calls, {IN_FLIGHT} in flight, a flush every "
              f"{args.flush_calls} calls: {len(shards['calls'])} calls + {len(shards['rollouts'])} rollouts shards, "
              f"{mb:.1f} MB")
        runs = iter(range(10**6))
        wall: dict[str, float] = {}

        def timed(name: str, fn: object) -> object:
            def run() -> None:
                out = work / f"{name}-{next(runs)}"
                t0 = time.perf_counter()
                fn(out)  # type: ignore[operator]
                wall[name] = min(wall.get(name, float("inf")), time.perf_counter() - t0)
                shutil.rmtree(out)
            return run

        cpu_plain, cpu_compact = best_of_each(args.runs, [
            timed("plain", lambda out: plain_merge(tape, out)),
            timed("compact", lambda out: compact_tape(tape, to=str(out))),
        ], clock=time.process_time)
        report = compact_tape(tape, to=str(work / "final"))
        out_bytes = report.bytes_out
        print(f"# plain read+write: {mb / cpu_plain:.1f} MB/s CPU ({mb / wall['plain']:.1f} MB/s wall); "
              f"compact: {mb / cpu_compact:.1f} MB/s CPU ({mb / wall['compact']:.1f} MB/s wall), "
              f"{report.shards_in} shards -> {report.shards_out}, {src_bytes:,} -> {out_bytes:,} bytes")
        ok = target("compact_vs_plain_read_write", cpu_plain / cpu_compact, "x", ">=", 0.5)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
