"""Claims from a child process, many threads at once, started together by the parent.

    python -m tests.tape.claims_child TAPE MODE THREADS KEY_HEX [KEY_HEX ...]

MODE ``continue``: each thread asks once which recorded call with the first key it continues.
MODE ``join``: each thread tries once to join an agent rollout whose calls have these keys.
Prints ``READY`` once the index is read, waits for a line on stdin (the parent's go), then one
line per thread: ``CLAIM <rollout> <call index>``, ``AGAIN <rollout> <call index>`` (every
call was taken: the latest is continued again), ``JOIN <rollout>`` or ``NONE``.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from recorder.tape._claims import CallClaims
from recorder.tape._keys import KeyIndex

tape, mode, threads = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
keys = [bytes.fromhex(k) for k in sys.argv[4:]]
index = KeyIndex(tape)
index.refresh()
claims = CallClaims(tape, index)
barrier = threading.Barrier(threads)
lines: list[str] = []
lock = threading.Lock()


def work() -> None:
    barrier.wait()
    if mode == "continue":
        c = claims.continue_call(keys[0])
        line = "NONE" if c is None else f"{'CLAIM' if c.path else 'AGAIN'} {c.rollout_id} {c.call_index}"
    else:
        chain = claims.join(keys)
        line = "NONE" if chain is None else f"JOIN {chain.rollout_id}"
    with lock:
        lines.append(line)


print("READY", flush=True)
sys.stdin.readline()
workers = [threading.Thread(target=work) for _ in range(threads)]
for t in workers:
    t.start()
for t in workers:
    t.join()
print("\n".join(lines), flush=True)
