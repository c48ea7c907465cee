"""Packing (C2): bins under a token budget, one unpadded row, and logprobs that never cross a boundary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer_bridge import PackedBatch, pack, packed_token_logprobs, plan_bins


@pytest.fixture(scope="module")
def smol(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _alone(model: torch.nn.Module, seq: np.ndarray, temperature: np.ndarray | float = 1.0) -> np.ndarray:
    """Reference: the sequence forwarded on its own (batch 1), full logits, log_softmax."""
    ids = torch.as_tensor(seq, dtype=torch.long)[None]
    with torch.inference_mode():
        logits = model(ids).logits[0].float()[:-1]
    t = torch.from_numpy(np.broadcast_to(np.asarray(temperature, dtype=np.float32), seq.shape)[1:].copy())
    logp = torch.log_softmax(logits / t[:, None], -1).gather(1, ids[0, 1:, None])[:, 0]
    return np.concatenate([[0.0], logp.numpy()])


def _seqs(lengths: list[int], seed: int = 0, vocab: int = 49152) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).astype(np.int32) for n in lengths]


def test_plan_bins_respects_budget_and_places_every_sequence_once() -> None:
    rng = np.random.default_rng(1)
    lengths = np.exp(rng.uniform(np.log(8), np.log(900), 200)).astype(np.int64)
    lengths[[3, 77]] = [1500, 2100]  # longer than the budget: a bin each
    bins = plan_bins(lengths, 1024)
    flat = np.concatenate(bins)
    assert sorted(flat.tolist()) == list(range(200))
    for b in bins:
        assert lengths[b].sum() <= 1024 or b.size == 1
    assert [b.tolist() for b in bins if lengths[b].sum() > 1024] == [[77], [3]]
    # first-fit-decreasing wastes little: total room left is under one budget per 10 bins
    assert len(bins) <= int(np.ceil(lengths.sum() / 1024) * 1.1) + 2


def test_plan_bins_first_fit_decreasing_and_max_seqs() -> None:
    lengths = np.array([5, 1, 17, 9, 30])
    assert [b.tolist() for b in plan_bins(lengths, 20)] == [[4], [2, 1], [3, 0]]
    assert all(b.size <= 2 for b in plan_bins(np.ones(7, dtype=np.int64), 100, max_seqs=2))
    assert plan_bins(np.array([], dtype=np.int64), 10) == []
    with pytest.raises(ValueError):
        plan_bins(lengths, 0)


def _first_fit_decreasing(lengths: np.ndarray, budget: int, max_seqs: int | None) -> list[list[int]]:
    """The textbook algorithm, scanning every bin for every sequence (the oracle for plan_bins)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        fit = [k for k in range(len(bins)) if n <= budget and room[k] >= n
               and (max_seqs is None or len(bins[k]) < max_seqs)]
        if not fit:
            bins.append([])
            room.append(budget)
            fit = [len(bins) - 1]
        bins[fit[0]].append(i)
        room[fit[0]] -= n
    return bins


@pytest.mark.parametrize("seed", range(6))
def test_plan_bins_equals_textbook_first_fit_decreasing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for budget, spread, max_seqs in [(1024, 900, None), (64, 3000, None), (2048, 1100, 3), (8192, 200, 8),
                                     (1000, 600, None), (1000, 600, 1)]:
        # (1000, 600): most sequences over half the budget, so hundreds of bins stay open at once
        lengths = rng.integers(1, spread, size=int(rng.integers(1, 500)))
        got = [b.tolist() for b in plan_bins(lengths, budget, max_seqs=max_seqs)]
        assert got == _first_fit_decreasing(lengths, budget, max_seqs), (budget, spread, max_seqs)


def test_pack_layout_positions_and_extras() -> None:
    seqs = [np.array([7, 8, 9]), np.array([4]), np.array([5, 6])]
    b = pack(seqs, index=np.array([10, 11, 12]), extras={"w": [np.array([1.0, 2, 3]), np.array([4.0]), np.array([5.0, 6])]})
    assert isinstance(b, PackedBatch)
    assert b.input_ids.tolist() == [[7, 8, 9, 4, 5, 6]] and b.input_ids.dtype == torch.int32
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]] and b.position_ids.dtype == torch.int32
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6] and b.cu_seqlens.dtype == torch.int32
    assert b.index.tolist() == [10, 11, 12]
    assert b.extras["w"].shape == (1, 6) and b.extras["w"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert [p.tolist() for p in b.split(b.extras["w"])] == [[1, 2, 3], [4], [5, 6]]
    with pytest.raises(ValueError, match="extras"):
        pack(seqs, extras={"w": [np.array([1.0]), np.array([4.0]), np.array([5.0, 6])]})
    with pytest.raises(ValueError, match="empty"):
        pack([np.array([1]), np.array([], dtype=np.int64)])


def test_packed_logprobs_equal_each_sequence_alone(smol: torch.nn.Module) -> None:
    """The boundary test: attention never crosses a sequence boundary inside a packed row."""
    seqs = _seqs([23, 1, 40, 2, 31])
    batch = pack(seqs)
    with torch.inference_mode():
        packed = packed_token_logprobs(smol, batch, chunk_tokens=16)
    assert packed.shape == (batch.num_tokens,) and packed.dtype == torch.float32
    for seq, got in zip(seqs, batch.split(packed)):
        np.testing.assert_allclose(got, _alone(smol, seq), atol=1e-4, rtol=0)
        assert got[0] == 0.0
    # The check above can fail: the same row with positions that do not restart (one long
    # sequence) gives other logprobs after the first boundary.
    joined = pack([np.concatenate(seqs)])
    with torch.inference_mode():
        leaky = joined.split(packed_token_logprobs(smol, joined))[0]
    second = slice(24, 64)  # tokens 1.. of the third sequence
    assert np.abs(leaky[second] - packed.numpy()[second]).max() > 0.1


def test_transformers_position_restarts_also_keep_sequences_apart(smol: torch.nn.Module) -> None:
    """The fallback for attention implementations other than sdpa/eager/flash: a plain forward of
    the packed row with restarting position_ids, no mask and no cache (transformers builds its
    packed-sequence mask only then; with a KV cache it silently lets sequences see each other)."""
    seqs = _seqs([9, 14, 6], seed=5)
    batch = pack(seqs)
    with torch.inference_mode():
        logits = smol(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    for seq, (a, b) in zip(seqs, zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist())):
        got = logp[a : b - 1].gather(1, batch.input_ids[0, a + 1 : b, None])[:, 0].numpy()
        np.testing.assert_allclose(got, _alone(smol, seq)[1:], atol=1e-4, rtol=0)


def test_temperature_per_token_mask_and_chunking(smol: torch.nn.Module) -> None:
    seqs = _seqs([12, 20], seed=3)
    temps = [np.full(12, 0.7, np.float32), np.full(20, 1.5, np.float32)]
    batch = pack(seqs, extras={"temperature": temps})
    mask = torch.zeros(batch.num_tokens, dtype=torch.bool)
    mask[5:9] = mask[20:] = True
    with torch.inference_mode():
        full = packed_token_logprobs(smol, batch, temperature=batch.extras["temperature"], chunk_tokens=1024)
        chunked = packed_token_logprobs(smol, batch, temperature=batch.extras["temperature"], chunk_tokens=3)
        masked = packed_token_logprobs(smol, batch, temperature=batch.extras["temperature"], score_mask=mask)
        scalar = packed_token_logprobs(smol, batch, temperature=0.7)
    for seq, t, got in zip(seqs, temps, batch.split(full)):
        np.testing.assert_allclose(got, _alone(smol, seq, t), atol=1e-4, rtol=0)
    # chunks change only matmul shapes (float rounding), never which logits a token sees
    np.testing.assert_allclose(chunked.numpy(), full.numpy(), atol=1e-4, rtol=0)
    assert torch.equal(masked[~mask], torch.zeros(int((~mask).sum())))
    np.testing.assert_allclose(masked[mask].numpy(), full[mask].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(batch.split(scalar)[0], batch.split(full)[0], atol=1e-4, rtol=0)


def test_gradients_flow_through_chunks(smol: torch.nn.Module) -> None:
    batch = pack(_seqs([6, 5], seed=4))
    head = smol.get_output_embeddings().weight
    head.grad = None
    lp = packed_token_logprobs(smol, batch, chunk_tokens=2)
    assert lp.requires_grad
    lp.sum().backward()
    assert head.grad is not None and head.grad.abs().sum() > 0
    head.grad = None


def test_bins_as_two_arrays_reorder_like_a_list_of_bins() -> None:
    from trainer_bridge._packing import Bins, packed_bins

    lengths = np.random.default_rng(5).integers(1, 900, 300)
    bins = packed_bins(lengths, 1024)
    listed = plan_bins(lengths, 1024)
    assert [b.tolist() for b in bins.as_list()] == [b.tolist() for b in listed]
    assert len(bins) == len(listed) and Bins.of(listed).members.tolist() == bins.members.tolist()
    perm = np.random.default_rng(6).permutation(len(bins))
    assert [b.tolist() for b in bins.reorder(perm).as_list()] == [listed[i].tolist() for i in perm]
    assert len(packed_bins(np.zeros(0, np.int64), 10)) == 0 and Bins.of([]).as_list() == []
