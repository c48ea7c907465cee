"""A writer in a child process, for crash, signal and concurrency tests.

    python -m tests.recorder.writer_child TAPE MODE WRITER_ID ROLLOUTS

MODE:
  run           write ROLLOUTS rollouts (2 calls each), flushing after every 2 rollouts, then close
  pause-publish like run, but flush #3 stops after its temporary file is complete and before the
                rename, prints "PAUSED <tmp>" and waits for stdin (so the parent can SIGKILL it)
  pause-write   like run, but flush #3 stops after the first row group of its temporary file
  wait-signal   buffer ROLLOUTS rollouts without flushing, print "READY", wait for stdin
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow.parquet as pq

import recorder.tape._storage as storage_mod
from recorder import CallRecord, RolloutRecord, TapeWriter

tape, mode, writer_id, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
flushes = 0


def _pause(msg: str) -> None:
    print(msg, flush=True)
    sys.stdin.readline()


if mode == "pause-publish":
    real_publish = storage_mod.publish

    def publish(tmp, final, *, overwrite):  # type: ignore[no-untyped-def]
        global flushes
        flushes += str(final).endswith(".parquet")  # shards only (tape.json is published here too)
        if flushes == 5 and str(final).endswith(".parquet"):  # calls + rollouts: flush 3's calls shard is 5th
            _pause(f"PAUSED {tmp}")
        return real_publish(tmp, final, overwrite=overwrite)

    storage_mod.publish = publish
elif mode == "pause-write":
    real_write = pq.write_table

    def write_table(table, where, **kw):  # type: ignore[no-untyped-def]
        global flushes
        flushes += 1
        if flushes != 5:
            return real_write(table, where, **kw)
        kw.pop("row_group_size", None)
        with pq.ParquetWriter(where, table.schema, compression=kw.get("compression")) as w:
            w.write_table(table.slice(0, 1))
            _pause(f"PAUSED {where}")
            w.write_table(table.slice(1))

    pq.write_table = write_table

w = TapeWriter(tape, writer_id=writer_id, flush_rows=10**9, flush_seconds=None)
rng = np.random.default_rng(abs(hash(writer_id)) % 2**32)
for r in range(count):
    rid = f"{writer_id}-r{r}"
    prompt = rng.integers(0, 50_000, size=64)
    for k in range(2):
        gen = rng.integers(0, 50_000, size=16)
        w.add_call(CallRecord(rollout_id=rid, call_index=k, prompt_ids=prompt, generation_ids=gen,
                              generation_logprobs=-rng.random(16)))
        prompt = np.concatenate([prompt, gen, rng.integers(0, 50_000, size=8)])
    w.add_rollout(RolloutRecord(rollout_id=rid, task_index=r, rollout_index=0, reward=float(r % 2)))
    if mode != "wait-signal" and r % 2 == 1:
        w.flush()
if mode == "wait-signal":
    _pause("READY")
w.close()
print("DONE", flush=True)
