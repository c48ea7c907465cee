"""Per-token logprobs of a packed batch, without a ``[tokens x vocab]`` fp32 tensor.

A 150k-entry vocabulary makes full fp32 logits 0.6 MB per token: 8k tokens would need 5 GB
just for them. So the decoder body runs once over the packed row, and the output head +
``log_softmax`` run over chunks of ``chunk_tokens`` positions; each chunk's logits are freed
before the next. Only positions that are scored at all go through the head (a replay scores
generated tokens only, which skips most of the head's work on long prompts).

Attention: with ``sdpa``/``eager`` models the packed row runs through a varlen attention that
calls ``scaled_dot_product_attention(is_causal=True)`` once per sequence (the model's config
points at it only for the duration of the call). The alternative, transformers' block-diagonal
``[T, T]`` mask built from the ``position_ids`` restarts, computes every masked-out block too
and cannot use the fused causal kernels: on skewed lengths that made packing slower than no
packing at all. Flash-attention models get ``cu_seq_lens_*`` and use their own varlen kernels;
any other implementation falls back to the ``position_ids`` restarts.

The same function serves replay (under ``torch.inference_mode()``) and the trainer (under
autograd: gradients flow through every chunk).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ._errors import BridgeValueError, UnsupportedModelError
from ._packing import PackedBatch

#: Name under which the per-sequence attention is registered with transformers.
VARLEN_ATTENTION = "gymtape_varlen_sdpa"
_REGISTER_LOCK = threading.Lock()
_registered = False


def _varlen_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 gymtape_bounds: list[int] | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention of each packed sequence on its own; ``[1, H, T, D]`` in, ``[1, T, H, D]`` out."""
    if gymtape_bounds is None:
        raise RuntimeError(f"attention {VARLEN_ATTENTION!r} needs sequence bounds; call it via packed_token_logprobs")
    if key.shape[2] != query.shape[2]:
        raise RuntimeError(f"{VARLEN_ATTENTION} runs without a KV cache (query and key lengths differ)")
    gqa = query.shape[1] != key.shape[1]
    outs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling,
            dropout_p=dropout if module.training else 0.0, enable_gqa=gqa)
        for a, b in zip(gymtape_bounds[:-1], gymtape_bounds[1:])
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    global _registered
    with _REGISTER_LOCK:
        if not _registered:
            from transformers import AttentionInterface

            AttentionInterface.register(VARLEN_ATTENTION, _varlen_sdpa)
            _registered = True


@contextmanager
def _attention_for_packing(model: torch.nn.Module, batch: PackedBatch) -> Iterator[dict[str, Any]]:
    """Point the model at varlen attention for one call; yield the extra forward kwargs."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in ("sdpa", "eager"):
        _register()
        config._attn_implementation = VARLEN_ATTENTION
        try:
            yield {"gymtape_bounds": batch.cu_seqlens.tolist()}
        finally:
            config._attn_implementation = impl
    elif isinstance(impl, str) and impl.startswith("flash_attention"):
        device = model.get_output_embeddings().weight.device
        cu = batch.cu_seqlens.to(device)
        longest = int((batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).max())
        yield {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    else:
        yield {}


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder body (hidden states, final norm included) and the output head of a causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no output head (get_output_embeddings() is None); "
                        "pass a causal LM such as AutoModelForCausalLM")
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        body = model.get_decoder()
    return body, head


def scored_positions(batch: PackedBatch, score_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Positions t that have a logprob: not the first token of their sequence (and in ``score_mask``)."""
    t = batch.num_tokens
    device = batch.input_ids.device
    keep = torch.ones(t, dtype=torch.bool, device=device)
    keep[batch.cu_seqlens[:-1].to(device=device, dtype=torch.long)] = False
    if score_mask is not None:
        keep &= score_mask.reshape(-1).to(device=device, dtype=torch.bool)
    return keep.nonzero().reshape(-1)


def packed_token_logprobs(
    model: torch.nn.Module,
    batch: PackedBatch,
    *,
    temperature: float | torch.Tensor = 1.0,
    chunk_tokens: int = 1024,
    score_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[T]`` float32: ``out[t] = log p(input_ids[t] | earlier tokens of its own sequence)``.

    The distribution is ``softmax(logits / temperature)``; ``temperature`` may be a ``[T]``
    (or ``[1, T]``) tensor holding, at t, the temperature that applied when token t was
    sampled. ``out`` is 0.0 at the first token of each sequence, and at positions where the
    optional ``score_mask`` is false (those skip the output head entirely). Attention stays
    within each sequence (the restarts in ``batch.position_ids`` mark the boundaries).
    """
    if chunk_tokens <= 0:
        raise BridgeValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    body, head = _decoder_and_head(model)
    device = head.weight.device
    ids = batch.input_ids.to(device)
    with _attention_for_packing(model, batch) as attn_kwargs:
        out = body(input_ids=ids, position_ids=batch.position_ids.to(device), attention_mask=None, use_cache=False,
                   **attn_kwargs)
    hidden = out.last_hidden_state[0] if hasattr(out, "last_hidden_state") else out[0][0]
    pos = scored_positions(batch, score_mask).to(device)
    targets = ids[0, pos].long()  # gather wants int64 indices; the batch carries int32
    temp = None
    if isinstance(temperature, torch.Tensor):
        temp = temperature.reshape(-1).to(device=device, dtype=torch.float32)[pos]
    elif float(temperature) != 1.0:
        temp = torch.full((pos.numel(),), float(temperature), device=device)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    pieces = []
    for a in range(0, pos.numel(), chunk_tokens):
        b = min(a + chunk_tokens, pos.numel())
        logits = head(hidden[pos[a:b] - 1]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        if temp is not None:
            logits = logits / temp[a:b, None]
        picked = logits.gather(1, targets[a:b, None])[:, 0]
        pieces.append(picked - torch.logsumexp(logits, dim=-1))
        del logits
    values = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    zeros = torch.zeros(batch.num_tokens, dtype=torch.float32, device=device)
    return zeros.index_put((pos,), values)
