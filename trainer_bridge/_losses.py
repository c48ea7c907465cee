"""Policy-gradient loss helpers: clipped GRPO/PPO loss with behaviour logprobs, and the
train-inference mismatch corrections used in practice, with their metrics.

Three log-probabilities meet in an RL update on tape data, per generated token t:

* ``logprobs`` — log π_θ(t), the trainer's current policy, with gradients;
* ``old_logprobs`` — log π_old(t), the trainer's policy when the batch was handed over (no
  gradient; with one optimiser step per batch it equals ``logprobs.detach()``);
* ``behaviour_logprobs`` — log μ(t), what the sampler (vLLM, gymtape serve) reported when it
  drew the token, read from the tape.

μ ≠ π_old for two reasons: the sampler ran an older policy (asynchronous RL, staleness) and it
computes the "same" policy differently (kernels, precision, batch shapes: the mismatch of Yao et
al. 2025). The clipped ratio π_θ/π_old keeps the update step small (PPO); an importance
weight built from π_old/μ corrects the rest (the decoupled objective of Hilton et al. 2021,
"Batch size-invariance for policy optimization", as used by AReaL). Formulas and sources:

* **Clipped surrogate** (PPO, Schulman et al. 2017, arXiv:1707.06347; GRPO, Shao et al. 2024,
  "DeepSeekMath", arXiv:2402.03300, uses it per token with group-normalised advantages):
  ``ρ = exp(logπ_θ − logπ_old)``, ``ℓ_t = −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)``.
  ``ε_high > ε_low`` is DAPO's "clip-higher" (Yu et al. 2025, arXiv:2503.14476).
* **Truncated IS, TIS** (Yao et al. 2025, "Your efficient RL framework secretly brings you
  off-policy RL training", fengyao.notion.site/off-policy-rl): per token
  ``w_t = min(π_old(t)/μ(t), C)``, C = 2 by default, multiplying ℓ_t (no gradient through w).
* **Masked IS, MIS** (Liu et al. 2025, "When speed kills stability: demystifying RL collapse
  from the training-inference mismatch", yingru.notion.site; verl's rollout correction
  ``rollout_rs``): instead of truncating, tokens whose ratio leaves ``[low, high]`` are dropped.
  Token level: ``w_t = r_t · 1[low ≤ r_t ≤ high]`` with ``r_t = π_old(t)/μ(t)``. Sequence level:
  ``R = Π_t r_t = exp(Σ_t log r_t)`` over the sequence's generated tokens, and every token of the
  sequence gets ``w = R · 1[low ≤ R ≤ high]``. IcePop (Ling team 2025, "Every step evolves",
  arXiv:2510.18855) is the token-level mask with the weight itself left out.
* **Geometric-mean sequence masking** (verl ``rollout_rs="geometric"``; NeMo RL's sequence
  masking on the same statistic): ``G = exp(mean_t log r_t)`` per sequence; the sequence keeps
  weight 1 if ``low ≤ G ≤ high`` and is dropped otherwise. Being a per-token average, G does
  not explode with length as R does, so its bounds are tight (default [0.99, 1.01]).

Metrics over generated tokens, with ``d_t = log π_old(t) − log μ(t)`` and ``r_t = exp(d_t)``
(defined once, in :mod:`trainer_bridge._mismatch`, which replay's report uses too):
``kl_k1 = mean(−d)``, ``kl_k3 = mean(r − 1 − d)`` (Schulman, "Approximating KL divergence",
joschu.net/blog/kl-approx.html: unbiased, always ≥ 0, estimates KL(μ‖π) from samples of μ),
``token_mult_prob_error = mean(exp|d|)`` (NeMo RL's
name; 1.0 is a perfect match), ``ess = (Σr)² / (N·Σr²)`` (Kish's effective sample size share),
IS weight mean/min/max (the weights actually applied), ``masked_frac`` (share of generated
tokens given weight 0 by a mask) and ``clip_frac`` (share where the PPO clip was active).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ._errors import BridgeValueError
from ._mismatch import token_mismatch_metrics

#: The mismatch metrics a training step logs (of :data:`~trainer_bridge.MISMATCH_METRIC_NAMES`).
TRAINER_MISMATCH_METRICS: tuple[str, ...] = ("kl_k1", "kl_k3", "token_mult_prob_error", "mean_abs_dlogprob",
                                             "max_abs_dlogprob", "ess")

Correction = Literal["none", "tis", "mis-token", "mis-sequence", "geo-mask"]
CORRECTIONS: tuple[str, ...] = ("none", "tis", "mis-token", "mis-sequence", "geo-mask")
Aggregate = Literal["token-mean", "seq-mean-token-mean"]

#: Default ratio bounds per correction: MIS follows replay's ``is_bounds``; the geometric mean
#: is a per-token average, so its bounds are tight.
_DEFAULT_BOUNDS = {"mis-token": (0.5, 2.0), "mis-sequence": (0.5, 2.0), "geo-mask": (0.99, 1.01)}


@dataclass(frozen=True)
class ISCorrection:
    """Which train-inference mismatch correction :func:`policy_loss` applies.

    ``kind``: ``"tis"`` (truncate each token's ratio at ``cap``), ``"mis-token"`` /
    ``"mis-sequence"`` (drop tokens / whole sequences whose ratio leaves ``[low, high]``, weight
    the rest by the ratio), ``"geo-mask"`` (drop sequences whose geometric-mean ratio leaves
    ``[low, high]``, weight 1 otherwise), ``"none"``. ``low``/``high`` default per kind.
    """

    kind: Correction = "tis"
    cap: float = 2.0
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in CORRECTIONS:
            raise BridgeValueError(f"correction must be one of {CORRECTIONS}, got {self.kind!r}")
        if self.cap <= 0:
            raise BridgeValueError(f"cap must be positive, got {self.cap}")
        low, high = self.bounds
        if not 0 <= low < high:
            raise BridgeValueError(f"need 0 <= low < high, got [{low}, {high}]")

    @property
    def bounds(self) -> tuple[float, float]:
        d_low, d_high = _DEFAULT_BOUNDS.get(self.kind, (0.5, 2.0))
        return (d_low if self.low is None else self.low, d_high if self.high is None else self.high)


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                         chunk_tokens: int = 1024) -> torch.Tensor:
    """``log softmax(logits / temperature)[..., target]`` per position, ``chunk_tokens`` rows at a time.

    ``logits`` is ``[..., V]`` (any dtype), ``targets`` ``[...]``; the result is float32 ``[...]``.
    Only one chunk is upcast to float32 at a time, so a bf16 ``[T, V]`` input never gets an fp32
    copy of its own size. For a model, prefer :func:`packed_token_logprobs`, which never builds
    the full logits at all.
    """
    if chunk_tokens <= 0:
        raise BridgeValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    shape = targets.shape
    flat = logits.reshape(-1, logits.shape[-1])
    tgt = targets.reshape(-1, 1).to(flat.device, torch.long)
    pieces = []
    for a in range(0, flat.shape[0], chunk_tokens):
        chunk = flat[a:a + chunk_tokens].float()
        if temperature != 1.0:
            chunk = chunk / temperature
        pieces.append(chunk.gather(1, tgt[a:a + chunk_tokens])[:, 0] - torch.logsumexp(chunk, dim=-1))
    out = torch.cat(pieces) if pieces else flat.new_zeros(0, dtype=torch.float32)
    return out.reshape(shape)


def sequence_index(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[T]`` int64: which packed sequence each token belongs to, from ``[n+1]`` boundaries."""
    cu = cu_seqlens.to(torch.long)
    return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1])


def _per_sequence_sum(values: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    return torch.zeros(num_seqs, dtype=values.dtype, device=values.device).index_add_(0, seq_index, values)


def truncated_is_weights(log_ratio: torch.Tensor, mask: torch.Tensor, *, cap: float = 2.0) -> torch.Tensor:
    """TIS: ``min(exp(log_ratio), cap)`` on masked-in tokens, 0 elsewhere (Yao et al. 2025)."""
    return torch.clamp(torch.exp(log_ratio), max=cap) * mask


def masked_is_weights(log_ratio: torch.Tensor, mask: torch.Tensor, *, low: float, high: float,
                      level: Literal["token", "sequence"] = "token",
                      seq_index: torch.Tensor | None = None) -> torch.Tensor:
    """MIS: the ratio where it lies in ``[low, high]``, 0 where it does not (Liu et al. 2025).

    ``level="sequence"`` uses each sequence's product ratio ``exp(Σ log_ratio)`` over its masked-in
    tokens (needs ``seq_index``, e.g. from :func:`sequence_index`) for all of its tokens.
    """
    m = mask.to(log_ratio.dtype)
    if level == "token":
        r = torch.exp(log_ratio)
    elif level == "sequence":
        if seq_index is None:
            raise BridgeValueError("sequence-level MIS needs seq_index (which sequence each token is in)")
        n = int(seq_index.max().item()) + 1 if seq_index.numel() else 0
        r = torch.exp(_per_sequence_sum(log_ratio * m, seq_index, n))[seq_index]
    else:
        raise BridgeValueError(f"level must be 'token' or 'sequence', got {level!r}")
    return torch.where((r >= low) & (r <= high), r, torch.zeros_like(r)) * m


def geometric_mask(log_ratio: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor, *, low: float = 0.99,
                   high: float = 1.01) -> torch.Tensor:
    """Geo-mean sequence masking: weight 1 on the tokens of sequences whose ``exp(mean log_ratio)``
    over masked-in tokens lies in ``[low, high]``, 0 elsewhere (verl ``rollout_rs="geometric"``)."""
    m = mask.to(log_ratio.dtype)
    n = int(seq_index.max().item()) + 1 if seq_index.numel() else 0
    total = _per_sequence_sum(log_ratio * m, seq_index, n)
    count = _per_sequence_sum(m, seq_index, n)
    g = torch.exp(total / count.clamp(min=1.0))[seq_index]
    return ((g >= low) & (g <= high)).to(log_ratio.dtype) * m


def correction_weights(correction: ISCorrection, log_ratio: torch.Tensor, mask: torch.Tensor,
                       seq_index: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token weights (no gradient) for ``correction``, given ``log_ratio = log π_old − log μ``."""
    log_ratio = log_ratio.detach().float()
    m = mask.to(torch.float32)
    low, high = correction.bounds
    if correction.kind == "none":
        return m
    if correction.kind == "tis":
        return truncated_is_weights(log_ratio, m, cap=correction.cap)
    if correction.kind == "mis-token":
        return masked_is_weights(log_ratio, m, low=low, high=high, level="token")
    if seq_index is None:
        raise BridgeValueError(f"correction {correction.kind!r} works per sequence: pass seq_index")
    if correction.kind == "mis-sequence":
        return masked_is_weights(log_ratio, m, low=low, high=high, level="sequence", seq_index=seq_index)
    return geometric_mask(log_ratio, m, seq_index, low=low, high=high)


def mismatch_metrics(trainer_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, float | None]:
    """Trainer-vs-sampler mismatch over masked-in tokens (None when no tokens): ``kl_k1``,
    ``kl_k3``, ``token_mult_prob_error``, ``mean_abs_dlogprob``, ``max_abs_dlogprob``, ``ess``.

    A torch front over :func:`~trainer_bridge.token_mismatch_metrics`, the one definition replay
    reports too (same formulas, float64, the same saturation of overflowing values).
    """
    sel = mask.reshape(-1).to(torch.bool)
    # float64: with matched kernels d is ~1e-6, and r - 1 - d (~d²/2) vanishes in float32
    trainer = trainer_logprobs.detach().reshape(-1)[sel].double().cpu().numpy()
    behaviour = behaviour_logprobs.detach().reshape(-1)[sel].double().cpu().numpy()
    m = token_mismatch_metrics(trainer, behaviour)
    return {k: m[k] for k in TRAINER_MISMATCH_METRICS}


def policy_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    correction: ISCorrection | None = None,
    weights: torch.Tensor | None = None,
    seq_index: torch.Tensor | None = None,
    aggregate: Aggregate = "token-mean",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float | None]]:
    """The clipped GRPO/PPO loss over generated tokens, corrected for train-inference mismatch.

    All tensors are per token and the same shape (e.g. ``[T]`` or ``[1, T]`` from a packed
    batch): ``advantages`` holds each token's sequence advantage, ``loss_mask`` is 1 on generated
    tokens, ``weights`` an optional extra per-token weight (the follower's staleness down-weight).
    ``old_logprobs`` defaults to ``logprobs.detach()`` (one optimiser step per batch, so the PPO
    ratio is 1 in value and only its gradient matters). The correction weight uses
    ``old_logprobs − behaviour_logprobs`` (no gradient; default TIS with cap 2).

    ``aggregate``: ``"token-mean"`` divides the weighted sum by the number of generated tokens
    (DAPO; every token counts the same), ``"seq-mean-token-mean"`` averages within each sequence
    first (GRPO as published; needs ``seq_index``). ``normalizer`` replaces the token count
    (token-mean) or sequence count (seq-mean) — pass the whole batch's count when the batch is
    split into micro-batches whose gradients accumulate.

    Returns ``(loss, metrics)``; metrics are plain floats (see the module docstring).
    """
    correction = correction or ISCorrection()
    lp = logprobs.reshape(-1)
    mu = behaviour_logprobs.reshape(-1).to(lp.dtype)
    adv = advantages.reshape(-1).to(lp.dtype)
    m = loss_mask.reshape(-1).to(lp.dtype)
    old = lp.detach() if old_logprobs is None else old_logprobs.reshape(-1).detach().to(lp.dtype)
    seq = None if seq_index is None else seq_index.reshape(-1)
    is_w = correction_weights(correction, old - mu, m, seq).to(lp.dtype)
    total_w = is_w * (m if weights is None else weights.reshape(-1).to(lp.dtype) * m)

    ratio = torch.exp(lp - old)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped) * total_w

    if aggregate == "token-mean":
        denom = float(normalizer) if normalizer is not None else float(m.sum().clamp(min=1.0))
        loss = per_token.sum() / denom
    elif aggregate == "seq-mean-token-mean":
        if seq is None:
            raise BridgeValueError("aggregate='seq-mean-token-mean' needs seq_index")
        n = int(seq.max().item()) + 1 if seq.numel() else 0
        tokens = _per_sequence_sum(m, seq, n)
        per_seq = _per_sequence_sum(per_token, seq, n) / tokens.clamp(min=1.0)
        denom = float(normalizer) if normalizer is not None else float((tokens > 0).sum().clamp(min=1))
        loss = per_seq.sum() / denom
    else:
        raise BridgeValueError(f"aggregate must be 'token-mean' or 'seq-mean-token-mean', got {aggregate!r}")

    sel = m.to(torch.bool)
    n_tok = int(sel.sum())
    metrics: dict[str, float | None] = {"tokens": float(n_tok)}
    if n_tok:
        w_sel = is_w[sel]
        metrics.update({
            "is_weight_mean": float(w_sel.mean()), "is_weight_min": float(w_sel.min()),
            "is_weight_max": float(w_sel.max()),
            "masked_frac": float((w_sel == 0).float().mean()) if correction.kind != "none" else 0.0,
            "clip_frac": float(((unclipped != clipped) & sel)[sel].float().mean()),
        })
    else:
        metrics.update({k: None for k in ("is_weight_mean", "is_weight_min", "is_weight_max", "masked_frac",
                                          "clip_frac")})
    metrics.update(mismatch_metrics(old, mu, m))
    return loss, metrics
