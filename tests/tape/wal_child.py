"""A durable writer in a child process, killed by the parent (SIGKILL) while it commits.

    python -m tests.tape.wal_child TAPE WRITER_ID THREADS

Each of THREADS threads writes rollouts of 3 calls, committing after every call and after the
rollout row, and prints ``ACK <call_id>`` / ``ACK rollout <rollout_id>`` only once commit()
returned: what the parent may count as acknowledged. Runs until killed.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from recorder import CallRecord, RolloutRecord, TapeWriter

tape, writer_id, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
w = TapeWriter(tape, writer_id=writer_id, durable=True, flush_rows=64, flush_seconds=None, handle_signals=False)
out_lock = threading.Lock()


def ack(line: str) -> None:
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def work(t: int) -> None:
    rng = np.random.default_rng(t)
    r = 0
    while True:
        rid = f"{writer_id}-t{t}-r{r}"
        context = rng.integers(0, 50_000, 40).tolist()
        for k in range(3):
            gen = rng.integers(0, 50_000, 8).tolist()
            cid = w.add_call(CallRecord(rollout_id=rid, call_index=k, prompt_ids=context, generation_ids=gen,
                                        generation_logprobs=[-0.5] * 8))
            w.commit()
            ack(f"ACK {cid}")
            context = context + gen + rng.integers(0, 50_000, 5).tolist()
        w.add_rollout(RolloutRecord(rollout_id=rid, reward=1.0))
        w.commit()
        ack(f"ACK rollout {rid}")
        r += 1


for t in range(threads):
    threading.Thread(target=work, args=(t,), daemon=True).start()
print("READY", flush=True)
threading.Event().wait()
