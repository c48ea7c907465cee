"""Durable capture: `kill -9` of `gymtape serve` under load loses no answered call.

Each round starts `gymtape serve --engine hf` (the embedded SmolLM2-135M) recording to a fresh
tape, drives it with --clients concurrent chat clients, SIGKILLs the server's process group once
--answered calls were answered 200, and counts answered calls missing from the tape (read by
``recorder.Tape``: the write-ahead log and shards). Then a new server opens the same tape
(sealing what the dead one left) and must answer and record one more call.

Also shown (no target): the durable commit itself, ``TapeWriter(durable=True)`` add + commit
from 32 threads at once, in commits per second and rows per fsync (group commit).

Target: 0 answered calls lost, summed over all rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _report import machine, target  # noqa: E402

from recorder import CallRecord, Tape, TapeWriter  # noqa: E402
from tests.servers import start_gymtape_serve  # noqa: E402


def one_round(tmp: Path, model: str, clients: int, answered_target: int) -> tuple[int, int, int]:
    tape = tmp / "tape"
    server = start_gymtape_serve(tmp, "--engine", "hf", "--model", model, "--tape", str(tape), "--max-batch-size", "8")
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(c: int) -> None:
        i = 0
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                try:
                    r = http.post(f"{server.url}/v1/chat/completions", json={
                        "model": "x", "messages": [{"role": "user", "content": f"Say {c} {i}."}],
                        "max_tokens": 3, "temperature": 1.0, "seed": c * 100_000 + i})
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    with lock:
                        answered.append(r.json()["id"])
                i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    while True:
        with lock:
            if len(answered) >= answered_target:
                break
        if server.proc.poll() is not None:
            raise SystemExit(f"server died on its own:\n{server.log_tail()}")
        stop.wait(0.01)
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    stop.set()
    for t in threads:
        t.join()
    on_tape = set(Tape(tape).read("calls", ["call_id"])["call_id"].to_pylist())
    lost = len(set(answered) - on_tape)
    again = start_gymtape_serve(tmp, "--engine", "hf", "--model", model, "--tape", str(tape), name="again")
    try:
        r = httpx.post(f"{again.url}/v1/chat/completions", timeout=120, json={
            "model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        appended = int(r.status_code == 200 and r.json()["id"] in
                       set(Tape(tape).read("calls", ["call_id"])["call_id"].to_pylist()))
    finally:
        again.stop()
    return len(answered), lost, appended


def commit_rate(tmp: Path, threads: int = 32, per_thread: int = 50) -> tuple[float, float]:
    w = TapeWriter(tmp / "commits", durable=True, flush_rows=10**9, flush_seconds=None, handle_signals=False)

    def work(t: int) -> None:
        for r in range(per_thread):
            w.add_call(CallRecord(rollout_id=f"t{t}-r{r}", call_index=0, prompt_ids=list(range(200)),
                                  generation_ids=list(range(50)), generation_logprobs=[-0.1] * 50))
            w.commit()

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    groups = len(w._segments["calls"].batches)
    w.close()
    return threads * per_thread / dt, threads * per_thread / groups


def main() -> int:
    from recorder import default_model_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--answered", type=int, default=60, help="answered calls before the kill")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    model = str(default_model_dir())
    tmp = Path(tempfile.mkdtemp(prefix="bench_durable_"))
    try:
        rate, per_group = commit_rate(tmp)
        print(f"durable commits from 32 threads: {rate:,.0f} commits/s, {per_group:.1f} rows per fsync (group commit)")
        total_lost = total = appended = 0
        for k in range(args.rounds):
            n, lost, ok = one_round(tmp / f"round{k}", model, args.clients, args.answered)
            print(f"round {k}: {n} calls answered before kill -9, {lost} missing from the tape, "
                  f"new server appended: {'yes' if ok else 'NO'}")
            total += n
            total_lost += lost
            appended += ok
        ok = target("serve_kill9_lost_calls", total_lost, f"calls lost of {total} answered", "<=", 0)
        ok &= target("serve_kill9_restart_appends", appended, f"of {args.rounds} rounds", ">=", args.rounds)
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
