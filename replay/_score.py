"""Trainer-side re-scoring: a transformers model, token-budget packed batches, chunked logprobs.

:func:`score_sequences` is a pure function of (model, sequences, settings) → per-token
logprobs, so a caller can shard the sequences over processes or Ray workers and concatenate
what comes back; :func:`trainer_bridge.grouped_mismatch_metrics` works on the concatenated arrays.

Throughput comes from three things: sequences are packed into rows of up to ``token_budget``
tokens with no padding (first-fit-decreasing bins, so rows are full); attention runs per
sequence inside a row (no wasted masked blocks, see :mod:`trainer_bridge._logprobs`); and the
output head runs only over the positions that are scored (generated tokens), in chunks, so no
``[tokens × vocab]`` fp32 tensor ever exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recorder import GymtapeError
from trainer_bridge import pack, packed_token_logprobs, plan_bins

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ReplayModelError(GymtapeError):
    """The model for re-scoring cannot be loaded or used as asked."""


@dataclass(frozen=True)
class ScoreSettings:
    """How sequences are batched; None picks the device's default (see :meth:`resolve`)."""

    #: Tokens per packed row (a longer sequence gets a row of its own).
    token_budget: int | None = None
    #: Output-head positions per chunk: bounds the fp32 logits to ``chunk_tokens × vocab``.
    chunk_tokens: int | None = None
    #: Sequences per row at most (None: no cap).
    max_seqs: int | None = None

    def resolve(self, device: torch.device) -> ScoreSettings:
        """Fill in defaults measured on each device kind (``bench/bench_replay.py``).

        On a CPU, rows of 2048 tokens and head chunks of 256 keep activations and logits
        cache-sized (4096 / 1024 ran about 10% slower); a GPU wants big rows to fill it.
        """
        gpu = device.type != "cpu"
        return ScoreSettings(token_budget=self.token_budget or (16384 if gpu else 2048),
                             chunk_tokens=self.chunk_tokens or (1024 if gpu else 256), max_seqs=self.max_seqs)


def load_model(path: str | Path, *, device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    """A causal LM from a local checkpoint directory, in eval mode on ``device``."""
    if dtype not in DTYPES:
        raise ReplayModelError(f"--dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    if not (Path(path) / "config.json").is_file():
        raise ReplayModelError(f"{path} is not a model checkpoint directory (no config.json); pass the directory "
                               "a model was saved to with save_pretrained()")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ReplayModelError(f"--device {device}: no CUDA device is available here; use --device cpu")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise ReplayModelError(f"cannot load the model at {path}: {e}") from e
    return model.to(device).eval()


def score_sequences(
    model: torch.nn.Module,
    sequences: Sequence[np.ndarray],
    *,
    temperatures: Sequence[np.ndarray] | None = None,
    score_masks: Sequence[np.ndarray] | None = None,
    settings: ScoreSettings = ScoreSettings(),
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Per-token logprobs of each sequence under ``model`` (float32, one array per sequence).

    ``out[j][t] = log softmax(logits / temperatures[j][t])[sequences[j][t]]`` given the tokens
    before t in sequence j; 0.0 at t = 0 and wherever ``score_masks[j][t]`` is 0 (those
    positions skip the output head). ``progress(n)`` is called after each packed row with the
    number of tokens it held.
    """
    n = len(sequences)
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * n
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=n)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and n and int(lengths.max()) > limit:
        j = int(lengths.argmax())
        raise ReplayModelError(f"sequence {j} has {int(lengths[j])} tokens, more than the model's "
                               f"max_position_embeddings ({limit})")
    nonempty = np.flatnonzero(lengths > 0)
    device = next(model.parameters()).device
    settings = settings.resolve(device)
    assert settings.token_budget is not None and settings.chunk_tokens is not None
    for idx in plan_bins(lengths[nonempty], settings.token_budget, max_seqs=settings.max_seqs):
        members = nonempty[idx]
        extras: dict[str, list[np.ndarray]] = {}
        if temperatures is not None:
            extras["temperature"] = [np.asarray(temperatures[j], dtype=np.float32) for j in members]
        if score_masks is not None:
            extras["mask"] = [np.asarray(score_masks[j]).astype(bool) for j in members]
        batch = pack([sequences[j] for j in members], index=members, extras=extras or None).to(device)
        with torch.inference_mode():
            lp = packed_token_logprobs(model, batch, temperature=batch.extras.get("temperature", 1.0),
                                       chunk_tokens=settings.chunk_tokens, score_mask=batch.extras.get("mask"))
        for j, piece in zip(batch.index, batch.split(lp)):
            out[int(j)] = piece
        if progress is not None:
            progress(batch.num_tokens)
    return out
