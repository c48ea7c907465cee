"""Loss helpers against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from trainer_bridge._losses import (
    ISCorrection,
    correction_weights,
    geometric_mask,
    logprobs_from_logits,
    masked_is_weights,
    mismatch_metrics,
    policy_loss,
    sequence_index,
    truncated_is_weights,
)


def logs(*ratios: float) -> torch.Tensor:
    return torch.log(torch.tensor(ratios, dtype=torch.float32))


def test_truncated_is_caps_each_token_and_zeroes_the_prompt() -> None:
    w = truncated_is_weights(logs(0.5, 1.0, 3.0, 1.5), torch.tensor([1.0, 1, 1, 0]), cap=2.0)
    assert torch.allclose(w, torch.tensor([0.5, 1.0, 2.0, 0.0]))


def test_masked_is_token_level_drops_ratios_outside_the_bounds() -> None:
    w = masked_is_weights(logs(0.4, 1.0, 2.5, 1.5, 0.5), torch.ones(5), low=0.5, high=2.0)
    assert torch.allclose(w, torch.tensor([0.0, 1.0, 0.0, 1.5, 0.5]))


def test_masked_is_sequence_level_uses_the_product_over_generated_tokens() -> None:
    # seq 0: ratios 2 * 1.5 = 3 -> outside [0.5, 2] -> dropped.
    # seq 1: a prompt token (mask 0, ratio e^5, must not count), then 0.8 * 1.25 = 1 -> weight 1.
    lr = torch.cat([logs(2.0, 1.5), torch.tensor([5.0]), logs(0.8, 1.25)])
    mask = torch.tensor([1.0, 1, 0, 1, 1])
    seq = sequence_index(torch.tensor([0, 2, 5]))
    assert seq.tolist() == [0, 0, 1, 1, 1]
    w = masked_is_weights(lr, mask, low=0.5, high=2.0, level="sequence", seq_index=seq)
    assert torch.allclose(w, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="seq_index"):
        masked_is_weights(lr, mask, low=0.5, high=2.0, level="sequence")


def test_geometric_mask_keeps_sequences_whose_mean_log_ratio_is_near_zero() -> None:
    # seq 0: mean log ratio 0.01 -> exp = 1.01005 > 1.01 -> dropped; seq 1: mean 0 -> kept (weight 1, not the ratio).
    lr = torch.tensor([0.02, 0.0, 0.01, -0.01, 3.0])
    mask = torch.tensor([1.0, 1, 1, 1, 0])
    seq = torch.tensor([0, 0, 1, 1, 1])
    assert torch.equal(geometric_mask(lr, mask, seq, low=0.99, high=1.01), torch.tensor([0.0, 0, 1, 1, 0]))
    assert torch.equal(geometric_mask(lr, mask, seq, low=0.9, high=1.1), torch.tensor([1.0, 1, 1, 1, 0]))


def test_correction_defaults_and_validation() -> None:
    assert ISCorrection().kind == "tis" and ISCorrection().cap == 2.0
    assert ISCorrection("mis-token").bounds == (0.5, 2.0)
    assert ISCorrection("geo-mask").bounds == (0.99, 1.01)
    assert ISCorrection("geo-mask", low=0.9).bounds == (0.9, 1.01)
    for bad in (dict(kind="clip"), dict(cap=0.0), dict(kind="mis-token", low=2.0, high=1.0)):
        with pytest.raises(ValueError):
            ISCorrection(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seq_index"):
        correction_weights(ISCorrection("geo-mask"), torch.zeros(2), torch.ones(2))
    assert torch.equal(correction_weights(ISCorrection("none"), logs(9.0, 9.0), torch.tensor([1.0, 0.0])),
                       torch.tensor([1.0, 0.0]))


def test_mismatch_metrics_match_hand_computed_values() -> None:
    # d = log 2, 0 (and a masked-out token that must not count): r = 2, 1
    trainer = torch.tensor([math.log(2.0), 0.0, 7.0])
    behaviour = torch.zeros(3)
    m = mismatch_metrics(trainer, behaviour, torch.tensor([1, 1, 0]))
    assert m["kl_k1"] == pytest.approx(-math.log(2) / 2)
    assert m["kl_k3"] == pytest.approx((1 - math.log(2)) / 2)
    assert m["token_mult_prob_error"] == pytest.approx(1.5)
    assert m["ess"] == pytest.approx(9 / 10)
    assert m["max_abs_dlogprob"] == pytest.approx(math.log(2))
    assert all(v is None for v in mismatch_metrics(trainer, behaviour, torch.zeros(3)).values())


def test_on_policy_loss_is_minus_the_tis_weighted_advantage_mean_and_so_is_its_gradient() -> None:
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    ratios = torch.tensor([1.0, 3.0, 0.5, 1.0])  # trainer / sampler -> TIS weights 1, 2, 0.5
    behaviour = lp.detach() - torch.log(ratios)
    adv = torch.tensor([1.0, 1.0, 2.0, 5.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last token is prompt: no loss
    loss, metrics = policy_loss(lp, behaviour, adv, mask)
    assert loss.item() == pytest.approx(-(1 * 1 + 1 * 2 + 2 * 0.5) / 3)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([-1 / 3, -2 / 3, -1 / 3, 0.0]))
    assert metrics["is_weight_mean"] == pytest.approx(3.5 / 3)
    assert (metrics["is_weight_min"], metrics["is_weight_max"]) == pytest.approx((0.5, 2.0))
    assert metrics["masked_frac"] == 0.0 and metrics["clip_frac"] == 0.0 and metrics["tokens"] == 3
    assert metrics["token_mult_prob_error"] == pytest.approx((1 + 3 + 2) / 3)


def test_ppo_clip_stops_the_gradient_only_where_the_clipped_term_is_smaller() -> None:
    old = torch.zeros(4)
    lp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, metrics = policy_loss(lp, old, adv, torch.ones(4), old_logprobs=old, clip_low=0.2, clip_high=0.28,
                                correction=ISCorrection("none"))
    # per token -min(rA, clip(r)A): r=1.5,A=1 -> -1.28 (clipped); r=0.5,A=1 -> -0.5;
    #                                r=1.5,A=-1 -> 1.5; r=0.5,A=-1 -> 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.5 + 0.8) / 4)
    loss.backward()
    # d/dlp of -r*A/4 = -r*A/4 where unclipped; 0 where clipped
    assert torch.allclose(lp.grad, torch.tensor([0.0, -0.5 / 4, 1.5 / 4, 0.0]))
    assert metrics["clip_frac"] == pytest.approx(1.0)  # every ratio is outside [0.8, 1.28]


def test_masking_corrections_report_the_masked_fraction() -> None:
    lp = torch.zeros(4, requires_grad=True)
    behaviour = -logs(0.4, 1.0, 2.5, 1.0)  # ratios 0.4, 1, 2.5, 1
    loss, metrics = policy_loss(lp, behaviour, torch.ones(4), torch.ones(4), correction=ISCorrection("mis-token"))
    assert loss.item() == pytest.approx(-(0 + 1 + 0 + 1) / 4)
    assert metrics["masked_frac"] == pytest.approx(0.5)
    assert (metrics["is_weight_min"], metrics["is_weight_max"]) == (0.0, 1.0)


def test_seq_mean_token_mean_averages_within_each_sequence_first() -> None:
    lp = torch.zeros(5, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, -2.0, -2.0])
    mask = torch.tensor([0.0, 1, 1, 1, 1])  # seq 0 = tokens 0-2 (2 generated), seq 1 = tokens 3-4
    seq = torch.tensor([0, 0, 0, 1, 1])
    w = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5])  # staleness down-weight of seq 1
    loss, _ = policy_loss(lp, lp.detach(), adv, mask, weights=w, seq_index=seq, aggregate="seq-mean-token-mean")
    assert loss.item() == pytest.approx((-1.0 + 1.0) / 2)  # seq 0: -1; seq 1: -(-2 * 0.5) = 1
    token_mean, _ = policy_loss(lp, lp.detach(), adv, mask, weights=w, normalizer=8.0)
    assert token_mean.item() == pytest.approx(-(1 + 1 - 1 - 1) / 8)
    with pytest.raises(ValueError, match="seq_index"):
        policy_loss(lp, lp.detach(), adv, mask, aggregate="seq-mean-token-mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_from_logits_equal_a_full_log_softmax(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g).to(dtype)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    want = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, targets[..., None])[..., 0]
    got = logprobs_from_logits(logits, targets, temperature=0.7, chunk_tokens=3)
    assert got.shape == (2, 5) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5)
