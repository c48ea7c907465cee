"""What the tape-side call-key index and claims add to each `gymtape serve` call (in-process, no engine).

The recording path of `gymtape serve` (recorder.serve._call_log.CallLog) with the tape's call-key
index and claims (several replicas on one tape) against the same CallLog assigning rollouts in
its own memory only (as before: one replica). Sequential calls, so each commit is a group of one
(the worst case for the overlapped fsyncs). Per iteration, in turn: index off, index on, index
on with the continuation sent to a second replica on the same tape; reported as the median of
the per-iteration differences (paired: the disk's fsync time drifts far more than the effect).

* new-rollout call: assign + record (the log's fsync; with the index, its entry's fsync overlaps)
* continuation: assign (claim file + a read of what other writers appended) + record
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _report import machine  # noqa: E402

from recorder.serve._call_log import CallLog  # noqa: E402
from recorder.tape._records import CallRecord  # noqa: E402


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[int(q * (len(xs) - 1))] * 1e3


async def _one(log: CallLog, cont: CallLog, i: int) -> tuple[float, float, float]:
    prompt, gen = list(range(i, i + 300)), list(range(7, 47))
    t0 = time.perf_counter()
    rid, k = log.assign(None)
    await log.record(CallRecord(rollout_id=rid, call_index=k, prompt_ids=prompt, generation_ids=gen,
                                generation_logprobs=[-0.5] * len(gen)))
    log.remember(prompt, gen, rid, k)
    t1 = time.perf_counter()
    rid2, k2 = cont.assign((prompt, gen))
    t2 = time.perf_counter()
    assert (rid2, k2) == (rid, 1)
    p2 = prompt + gen + [5, 6, 7]
    await cont.record(CallRecord(rollout_id=rid2, call_index=k2, prompt_ids=p2, generation_ids=gen,
                                 generation_logprobs=[-0.5] * len(gen)))
    cont.remember(p2, gen, rid2, k2)
    return t1 - t0, t2 - t1, time.perf_counter() - t1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--dir", type=Path, default=None, help="where the tapes go (default: a temporary folder)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gymtape-bench-keys-", dir=args.dir))
    print(f"# machine: {machine()}; tapes in {work}")
    on, other = CallLog(work / "on", writer_id="replica-a"), CallLog(work / "on", writer_id="replica-b")
    off = CallLog(work / "off", writer_id="memory-only")
    off.keys.close()  # type: ignore[union-attr]
    off.keys = off.index = off.claims = None  # assignment in memory, no index: the baseline
    res: dict[str, list[tuple[float, float, float]]] = {"off": [], "on": [], "cross": []}

    async def run() -> None:
        for i in range(args.iterations):
            res["off"].append(await _one(off, off, 3 * i))
            res["on"].append(await _one(on, on, 3 * i + 1))
            res["cross"].append(await _one(on, other, 3 * i + 2))

    try:
        asyncio.run(run())
    finally:
        for log in (on, other, off):
            log.close()
    for name, label in (("on", "one replica"), ("cross", "continuation on the other replica")):
        d = [[a[j] - b[j] for a, b in zip(res[name], res["off"])] for j in range(3)]
        print(f"index + claims, {label}: new-rollout call {_pct(d[0], .5):+.3f} ms p50 (IQR {_pct(d[0], .25):+.3f} .. "
              f"{_pct(d[0], .75):+.3f}); continuation assign {_pct(d[1], .5):+.3f} ms; continuation call "
              f"{_pct(d[2], .5):+.3f} ms (IQR {_pct(d[2], .25):+.3f} .. {_pct(d[2], .75):+.3f})")
    base = [x[0] for x in res["off"]]
    print(f"baseline (memory only) new-rollout call p50 {_pct(base, .5):.3f} ms: the log's own commit and fsync")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
