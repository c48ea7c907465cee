"""`gymtape replay` scoring throughput against two baselines measured in the same run.

Data: sequences of skewed lengths (log-uniform, default 48 of 32..1024 tokens, random IDs) on a
randomly initialised Qwen2-shaped model built from a config (no download): ``tiny`` (CPU, the
default) or ``qwen2-0.5b`` (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
vocab 151936; for a GPU: ``--device cuda --config qwen2-0.5b``).

Every method computes the same thing, the logprob of every token given the tokens before it:

* **replay scorer**: ``replay._score.score_sequences``, exactly what ``gymtape replay`` runs
  (token-budget packed rows, per-sequence attention, chunked output head);
* **plain unpadded**: each sequence forwarded alone (batch 1), full logits, ``log_softmax``, gather;
* **padded arrival order**: batches of ``--batch-count`` sequences in arrival order, right-padded to
  the longest, attention mask, full logits.

Targets (the replay issue): scorer >= 90% of plain unpadded tokens/s, and >= 1.5x padded.
Tokens/s counts real tokens (padding excluded). A last line times the scorer the way replay
uses it on a tape (only the generated tokens, here the last quarter of each sequence, go
through the output head); it has no target.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import best_of, machine, pin_to_one_core, target  # noqa: E402

if "cuda" not in " ".join(sys.argv):
    pin_to_one_core()

import argparse  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from replay import ScoreSettings, score_sequences  # noqa: E402

CONFIGS = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=1024, vocab_size=16384),
    "qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936),
}


def build_model(name: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**CONFIGS[name], max_position_embeddings=32768, tie_word_embeddings=name == "qwen2-0.5b",
                         attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()


def plain_unpadded(model: torch.nn.Module, seqs: list[np.ndarray], device: str) -> list[torch.Tensor]:
    out = []
    with torch.inference_mode():
        for s in seqs:
            ids = torch.from_numpy(s.astype(np.int64)).to(device)[None]
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            out.append(logp.gather(1, ids[0, 1:, None])[:, 0])
            del logp
    return out


def padded_arrival_order(model: torch.nn.Module, seqs: list[np.ndarray], device: str, count: int) -> list[torch.Tensor]:
    out = []
    with torch.inference_mode():
        for a in range(0, len(seqs), count):
            group = seqs[a : a + count]
            longest = max(len(s) for s in group)
            ids = torch.zeros(len(group), longest, dtype=torch.long)
            mask = torch.zeros(len(group), longest, dtype=torch.long)
            for i, s in enumerate(group):
                ids[i, : len(s)] = torch.from_numpy(s.astype(np.int64))
                mask[i, : len(s)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(ids, attention_mask=mask).logits
            for i, s in enumerate(group):
                logp = torch.log_softmax(logits[i, : len(s) - 1].float(), -1)
                out.append(logp.gather(1, ids[i, 1 : len(s), None])[:, 0])
            del logits
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--seqs", type=int, default=None, help="default: 48 (tiny) / 64 (qwen2-0.5b)")
    ap.add_argument("--min-len", type=int, default=None, help="default: 32 (tiny) / 128 (qwen2-0.5b)")
    ap.add_argument("--max-len", type=int, default=None, help="default: 1024 (tiny) / 8192 (qwen2-0.5b)")
    ap.add_argument("--batch-count", type=int, default=8, help="padded baseline: sequences per batch")
    ap.add_argument("--token-budget", type=int, default=None, help="default: ScoreSettings' (2048 cpu / 16384 cuda)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    big = args.config == "qwen2-0.5b"
    n = args.seqs or (64 if big else 48)
    lo, hi = args.min_len or (128 if big else 32), args.max_len or (8192 if big else 1024)
    cuda = args.device.startswith("cuda")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if cuda else "float32")]
    if not cuda:
        torch.set_num_threads(1)
    settings = ScoreSettings(token_budget=args.token_budget).resolve(torch.device(args.device))

    model = build_model(args.config, args.device, dtype)
    rng = np.random.default_rng(0)
    lengths = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(np.int64)
    vocab = model.config.vocab_size
    seqs = [rng.integers(0, vocab, int(k)).astype(np.int32) for k in lengths]
    tokens = int(lengths.sum())
    padded_tokens = sum(len(g) * max(map(len, g)) for g in (seqs[a : a + args.batch_count] for a in range(0, n, args.batch_count)))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    gen_masks = [np.arange(len(s)) >= len(s) * 3 // 4 for s in seqs]
    methods = {
        "scorer": lambda: score_sequences(model, seqs, settings=settings),
        "plain": lambda: plain_unpadded(model, seqs, args.device),
        "padded": lambda: padded_arrival_order(model, seqs, args.device, args.batch_count),
        "replay": lambda: score_sequences(model, seqs, score_masks=gen_masks, settings=settings),
    }

    def once(fn):  # noqa: ANN001, ANN202
        def run() -> None:
            fn()
            sync()
        return run

    for fn in methods.values():
        once(fn)()  # warm-up (allocator, kernels)
    # Rounds interleave the methods, so a busy spell on a shared machine hits all of them alike.
    best = {k: float("inf") for k in methods}
    for _ in range(args.runs):
        for k, fn in methods.items():
            best[k] = min(best[k], best_of(1, once(fn)))
    t_scorer, t_plain, t_padded, t_replay = best["scorer"], best["plain"], best["padded"], best["replay"]

    # the three agree (the scorer is checked against the plain forward, token by token)
    ours = score_sequences(model, seqs, settings=settings)
    ref = plain_unpadded(model, seqs, args.device)
    worst = max(float(np.abs(o[1:] - r.float().cpu().numpy()).max()) for o, r in zip(ours, ref))

    print(f"# machine: {machine()}; device {args.device} ({torch.cuda.get_device_name() if cuda else 'pinned to 1 core'})")
    print(f"# model: random Qwen2 '{args.config}' {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {dtype}; "
          f"data: {n} sequences, log-uniform {lo}..{hi} tokens, {tokens:,} tokens "
          f"(padded baseline holds {padded_tokens:,}: {1 - tokens / padded_tokens:.0%} padding); token budget "
          f"{settings.token_budget}, chunk {settings.chunk_tokens}")
    print(f"# replay scorer {tokens / t_scorer:,.0f} tokens/s ({t_scorer:.2f} s); plain unpadded {tokens / t_plain:,.0f} "
          f"tokens/s ({t_plain:.2f} s); padded arrival order {tokens / t_padded:,.0f} tokens/s ({t_padded:.2f} s)")
    print(f"# replay as on a tape (head over the last quarter of each sequence only): {tokens / t_replay:,.0f} tokens/s; "
          f"max |scorer - plain| logprob {worst:.2e}")
    ok = [
        target("replay_vs_plain_unpadded", t_plain / t_scorer, "x", ">=", 0.9),
        target("replay_vs_padded_arrival", t_padded / t_scorer, "x", ">=", 1.5),
    ]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
