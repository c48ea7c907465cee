"""`gymtape check` throughput on one core, against a naive per-call loop measured in the same run.

Data: short multi-turn chat rollouts recorded the way `gymtape serve` records them
(recorder._prompting.PromptBuilder, on-policy splice), embedded SmolLM2 tokenizer: GRPO groups
of 8 rollouts per task, 4 calls each, 10 to 40 generated tokens per call; every 4th rollout has
a planted merge (the model emitted " Ski" + "nny"), so the problem-reporting path is timed too.

Baseline: per call ``tokenizer.decode`` + ``tokenizer.encode`` of the generation and
``apply_chat_template`` + ``encode`` of the rebuilt messages, compared with the recorded prompt
(what one writes without batching or caching).

Target (the replay issue): check >= 2,000 calls/s on one core.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import best_of, machine, pin_to_one_core, target  # noqa: E402

pin_to_one_core()
import os  # noqa: E402

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import orjson  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recorder import CallRecord, RolloutRecord, Tape, TapeWriter, tokenizer_identity  # noqa: E402
from recorder import PromptBuilder, default_model_dir  # noqa: E402
from replay import check_tape  # noqa: E402

WORDS = ("the cat sat on a warm mat while rain fell outside and the kettle sang softly in the small kitchen "
         "numbers add up to seven because three plus four equals seven every single time we check it").split()


def build_tape(path: Path, tokenizer, rollouts: int, calls: int) -> int:  # noqa: ANN001
    builder = PromptBuilder(tokenizer)
    eos = builder.eos_token_id
    rng = random.Random(0)
    n = 0
    with TapeWriter(path, tokenizer=tokenizer_identity(default_model_dir()), flush_seconds=None,
                    handle_signals=False) as w:
        for r in range(rollouts):
            task = r // 8
            msgs = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"Task {task}: " + " ".join(WORDS[task % 20: task % 20 + 12])}]
            rid = f"r{r:05d}"
            for k in range(calls):
                p = builder.build(msgs, None)
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 36))).capitalize() + "."
                gen = list(tokenizer.encode(text, add_special_tokens=False))
                if r % 4 == 3 and k == 0:
                    gen = gen + tokenizer.encode(" Ski", add_special_tokens=False) + \
                        tokenizer.encode("nny", add_special_tokens=False)
                    text += " Skinny"
                gen.append(eos)
                w.add_call(CallRecord(rollout_id=rid, call_index=k, prompt_ids=p.ids, generation_ids=gen,
                                      generation_logprobs=[-0.5] * len(gen), messages=p.messages))
                n += 1
                msgs = msgs + [{"role": "assistant", "content": text, "prompt_token_ids": p.ids,
                                "generation_token_ids": gen},
                               {"role": "user", "content": f"Go on ({k})."}]
            w.add_rollout(RolloutRecord(rollout_id=rid, reward=1.0, group_key=str(task)))
    return n


def naive_check(tape: Tape, tokenizer) -> int:  # noqa: ANN001
    """Per call: decode + encode the generation, re-template the messages, compare."""
    builder = PromptBuilder(tokenizer)
    differ = 0
    for _, c in tape.iter_rollout_calls(("new_messages_json", "messages_prefix_len", "tools_json")):
        msgs: list = []
        for k in range(len(c["call_index"])):
            gen = c["generation_ids"][k].tolist()
            text = tokenizer.decode(gen, skip_special_tokens=False)
            differ += tokenizer.encode(text, add_special_tokens=False) != gen
            msgs = msgs[: c["messages_prefix_len"][k]] + orjson.loads(c["new_messages_json"][k])
            ids = builder.render(builder._template_messages(msgs), None, add_generation_prompt=True)
            differ += ids != c["prompt_ids"][k].tolist()
    return differ



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rollouts", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    work = Path(tempfile.mkdtemp(prefix="gymtape-bench-check-"))
    try:
        n = build_tape(work / "tape", tokenizer, args.rollouts, args.calls)
        tape = Tape(work / "tape")
        print(f"# machine: {machine()}; pinned to 1 core")
        report = check_tape(tape, tokenizer)
        d = report.to_dict()
        print(f"# data: {args.rollouts} rollouts x {args.calls} calls = {n} calls, {d['generated_tokens']:,} "
              f"generated tokens; problems {d['totals']}; off-policy fraction {d['off_policy_fraction']:.3f}")
        t_check = best_of(args.runs, lambda: check_tape(tape, tokenizer))
        t_naive = best_of(1, lambda: naive_check(tape, tokenizer))
        print(f"# check {t_check:.3f} s ({n / t_check:,.0f} calls/s); naive per-call loop {t_naive:.3f} s "
              f"({n / t_naive:,.0f} calls/s); speed-up {t_naive / t_check:.2f}x")
        ok = [
            target("check_calls_per_s", n / t_check, "calls/s", ">=", 2000),
            target("check_vs_naive", t_naive / t_check, "x", ">=", 1.0),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
