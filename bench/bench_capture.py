"""NeMo Gym token capture: ``TapeSink.put`` against Gym's own ``TokenCaptureStore``, same run, same entries.

Data: multi-turn agent rollouts (a first prompt of 300-600 tokens, then per call 60-300
generated tokens and a 30-150-token tool output; Qwen-sized token IDs; float32 logprobs, as
vLLM returns them), captured once by Gym's own capture path (``capture_tokens`` with Gym's file
lineage store and ``delta_records`` on, so continuations are stored as parent-relative suffixes).
Those entries are then put into each contender from 32 concurrent asyncio tasks, as Gym's model
server awaits ``put`` (each task puts one rollout's calls in order, then takes the next rollout).

Measured (wall clock, best of --rounds rounds in which both contenders take turns, each round
into a fresh folder):
* Gym: ``nemo_gym.token_id_capture.store.TokenCaptureStore.put`` (one JSONL per rollout, an fsync
  per entry, a state file per rollout).
* gymtape: ``recorder.TapeSink.put`` (a call row through the tape's write-ahead log: durable and
  visible to every process before it returns; concurrent puts share an fsync).
* Bytes: every file under each folder once the contender is closed (for the tape: the log sealed
  into Parquet shards; both hold every entry and their lineage metadata).

Targets (the durable-capture issue): puts/s >= 2x Gym's at concurrency 32; bytes <= 1/3 of Gym's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, target  # noqa: E402

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nemo_gym.token_id_capture.lineage import FileLineageStore  # noqa: E402
from nemo_gym.token_id_capture.records import TokenEntry  # noqa: E402
from nemo_gym.token_id_capture.sink import (  # noqa: E402
    CaptureContext,
    capture_tokens,
    reset_token_sink,
    resolve_parent,
    set_token_sink,
)
from nemo_gym.token_id_capture.store import TokenCaptureStore  # noqa: E402

from recorder import TapeSink  # noqa: E402

VOCAB = 150_000
CONCURRENCY = 32


async def _capture_rollout(store: TokenCaptureStore, lineage: FileLineageStore, rid: str, turns: int,
                           rng: np.random.Generator) -> None:
    request: list[dict[str, Any]] = [{"role": "user", "content": f"task {rid}: find the answer with the tool"}]
    prompt = rng.integers(0, VOCAB, int(rng.integers(300, 600))).tolist()
    previous: list[int] = []
    for k in range(turns):
        if k:
            prompt = prompt + previous + rng.integers(0, VOCAB, int(rng.integers(30, 150))).tolist()
            request = request + [{"type": "function_call_output", "call_id": f"t{k - 1}",
                                  "output": f"tool result {k - 1}: " + "x" * int(rng.integers(100, 500))}]
        n = int(rng.integers(60, 300))
        gen = rng.integers(0, VOCAB, n).tolist()
        item = ({"type": "message", "role": "assistant", "id": f"m-{rid}-{k}",
                 "content": [{"type": "output_text", "text": "final answer " + "y" * 4 * n}]} if k == turns - 1 else
                {"type": "function_call", "id": f"f-{rid}-{k}", "call_id": f"t{k}", "name": "search",
                 "arguments": '{"query": "' + "z" * 2 * n + '"}'})
        logprobs = (-rng.random(n) * 5).astype(np.float32).astype(float).tolist()  # float32 values, as vLLM's
        response = {"id": f"resp-{rid}-{k}", "model": "policy", "object": "response",
                    "output": [{**item, "prompt_token_ids": prompt, "generation_token_ids": gen,
                                "generation_log_probs": logprobs}]}
        ctx = CaptureContext(rollout_id=rid, model_call_id=f"{rid}-{k}", token_sink=store, lineage_store=lineage,
                             model="policy", delta_records=True)
        token = set_token_sink(ctx)
        try:
            await resolve_parent(request)
            await capture_tokens(response, request)
        finally:
            reset_token_sink(token)
        assert ctx.committed
        request = request + response["output"]
        previous = gen


def make_entries(rollouts: int, turns: int, seed: int) -> list[list[TokenEntry]]:
    """Entries as Gym's capture path stores them (delta records on), per rollout."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        store, lineage = TokenCaptureStore(d), FileLineageStore(d)

        async def go() -> None:
            for r in range(rollouts):
                await _capture_rollout(store, lineage, f"rollout-{r:05d}", turns, rng)

        asyncio.run(go())
        out = [store.read_entries(f"rollout-{r:05d}") for r in range(rollouts)]
    deltas = sum(e.prompt_is_delta for es in out for e in es)
    assert deltas == rollouts * (turns - 1), f"expected every continuation as a delta record, got {deltas}"
    return out


async def put_all(sink: Any, rollouts: list[list[TokenEntry]]) -> float:
    """Seconds to put every entry from CONCURRENCY tasks (one rollout at a time each, calls in order)."""
    queue: asyncio.Queue[list[TokenEntry]] = asyncio.Queue()
    for entries in rollouts:
        queue.put_nowait(entries)

    async def worker() -> None:
        while not queue.empty():
            for entry in queue.get_nowait():
                await sink.put(entry)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - t0


def folder_bytes(path: Path) -> tuple[int, int, int]:
    """(bytes in files, bytes of disk blocks, files) under ``path``."""
    size = blocks = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            st = os.stat(os.path.join(root, name))
            size, blocks, files = size + st.st_size, blocks + st.st_blocks * 512, files + 1
    return size, blocks, files


def run_gym(root: Path, rollouts: list[list[TokenEntry]]) -> tuple[float, Path]:
    folder = root / "gym"
    store = TokenCaptureStore(folder)

    async def go() -> float:
        seconds = await put_all(store, rollouts)
        await store.close()
        return seconds

    return asyncio.run(go()), folder


def run_tape(root: Path, rollouts: list[list[TokenEntry]]) -> tuple[float, float, Path]:
    folder = root / "tape"

    async def go() -> tuple[float, float]:
        sink = TapeSink(folder)
        seconds = await put_all(sink, rollouts)
        t0 = time.perf_counter()
        await sink.close()
        return seconds, time.perf_counter() - t0

    seconds, close = asyncio.run(go())
    return seconds, close, folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rollouts", type=int, default=192)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    rollouts = make_entries(args.rollouts, args.turns, args.seed)
    n = sum(len(r) for r in rollouts)
    tokens = sum(len(e.prompt_token_ids) + len(e.generation_token_ids) for r in rollouts for e in r)
    print(f"data: {args.rollouts} rollouts x {args.turns} calls = {n} entries, {tokens:,} stored tokens "
          f"(delta records), made by Gym's capture path in {time.perf_counter() - t0:.1f} s; concurrency {CONCURRENCY}")
    best_gym = best_tape = float("inf")
    sizes: dict[str, tuple[int, int, int]] = {}
    close_s = 0.0
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
            root = Path(d)
            gym_s, gym_dir = run_gym(root, rollouts)
            tape_s, close, tape_dir = run_tape(root, rollouts)
            sizes = {"gym": folder_bytes(gym_dir), "tape": folder_bytes(tape_dir)}
            if tape_s < best_tape:
                close_s = close
            best_gym, best_tape = min(best_gym, gym_s), min(best_tape, tape_s)
            shutil.rmtree(root / "gym")
    gym_rate, tape_rate = n / best_gym, n / best_tape
    print(f"Gym TokenCaptureStore.put: {gym_rate:,.0f} puts/s ({best_gym:.2f} s); "
          f"{sizes['gym'][0]:,} bytes in {sizes['gym'][2]} files ({sizes['gym'][1]:,} on disk)")
    print(f"gymtape TapeSink.put:      {tape_rate:,.0f} puts/s ({best_tape:.2f} s, then {close_s:.2f} s to close); "
          f"{sizes['tape'][0]:,} bytes in {sizes['tape'][2]} files ({sizes['tape'][1]:,} on disk)")
    target("capture_put_speedup_vs_gym_store", tape_rate / gym_rate, "x", ">=", 2)
    target("capture_bytes_vs_gym_store", sizes["tape"][0] / sizes["gym"][0], "x", "<=", 1 / 3)


if __name__ == "__main__":
    main()
