"""HFEngine: batching that changes nothing but speed, raw logprobs, sampling, stops, errors, weight loads.

Everything runs on the real default model (SmolLM2-135M, fp32, CPU) with short generations.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from recorder.serve.engines._protocol import Engine, EngineError, Generation, SamplingParams
from recorder.serve.engines._hf import HFEngine
from recorder.serve.engines._models import default_model_dir

TEXTS = [
    "The capital of France is",
    "Write a haiku about the sea. The waves roll in and the gulls cry over the harbour at dawn.",
    "You are a careful assistant. List three prime numbers greater than ten, then explain in one "
    "sentence how you checked each of them, and finish with a short summary of the method.",
]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def gather(engine: HFEngine, *calls: tuple[list[int], SamplingParams]) -> list[Generation]:
    return list(await asyncio.gather(*(engine.generate(p, s) for p, s in calls)))


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[HFEngine]:
    eng = HFEngine(model_dir, max_batch_size=8)
    run(eng.start())
    yield eng
    run(eng.aclose())


@pytest.fixture(scope="module")
def prompts(model_dir: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [tokenizer.encode(text) for text in TEXTS]
    assert len({len(p) for p in ids}) == 3, "the prompts must differ in length to exercise padding"
    return ids


@pytest.fixture(scope="module")
def solo(engine: HFEngine, prompts: list[list[int]]) -> list[Generation]:
    """Each prompt generated greedily on its own (one batch each)."""

    async def one_by_one() -> list[Generation]:
        return [await engine.generate(p, GREEDY) for p in prompts]

    return run(one_by_one())


@pytest.fixture(scope="module")
def reference_model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_engine_satisfies_the_protocol(engine: HFEngine, model_dir: Path) -> None:
    assert isinstance(engine, Engine)
    assert (engine.name, engine.logprobs_kind, engine.model_name) == ("hf", "raw", model_dir.name)
    assert engine.max_model_len == 8192


def test_concurrent_greedy_requests_are_batched_and_match_solo_runs(
    engine: HFEngine, prompts: list[list[int]], solo: list[Generation]
) -> None:
    before = len(engine.batches_run)
    batched = run(gather(engine, *((p, GREEDY) for p in prompts)))
    assert max(engine.batches_run[before:]) >= 2, engine.batches_run
    for alone, together in zip(solo, batched):
        assert together.token_ids == alone.token_ids
        assert together.finish_reason == alone.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(together.logprobs), torch.tensor(alone.logprobs), rtol=0, atol=1e-4)


def test_logprobs_equal_a_full_forward_scoring(
    reference_model: torch.nn.Module, prompts: list[list[int]], solo: list[Generation]
) -> None:
    for prompt, gen in zip(prompts, solo):
        ids = torch.tensor([prompt + gen.token_ids])
        with torch.inference_mode():
            logits = reference_model(input_ids=ids).logits[0].float()
        # The logits at position t predict token t + 1.
        steps = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(gen.token_ids))
        scored = torch.log_softmax(logits[steps], dim=-1).gather(-1, torch.tensor(gen.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(gen.logprobs), scored, rtol=0, atol=1e-4)
        assert gen.token_ids == logits[steps].argmax(-1).tolist()  # greedy really is argmax


def test_seeded_sampling_is_reproducible_regardless_of_batch(engine: HFEngine, prompts: list[list[int]]) -> None:
    def sampled(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=12, temperature=1.0, seed=seed)

    p0, p1, _ = prompts
    together = run(gather(engine, (p1, sampled(7)), (p0, sampled(7)), (p0, sampled(8))))
    alone = run(engine.generate(p0, sampled(7)))
    assert together[1].token_ids == alone.token_ids
    torch.testing.assert_close(torch.tensor(together[1].logprobs), torch.tensor(alone.logprobs), rtol=0, atol=1e-4)
    assert together[2].token_ids != alone.token_ids  # another seed draws other tokens

    truncated = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    first, second = run(gather(engine, (p0, truncated), (p0, truncated)))
    assert first.token_ids == second.token_ids


def test_generation_stops_after_a_stop_token(
    engine: HFEngine, prompts: list[list[int]], solo: list[Generation]
) -> None:
    tokens = solo[0].token_ids
    k = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])  # its first occurrence
    stopped = run(engine.generate(prompts[0], SamplingParams(max_tokens=8, temperature=0.0,
                                                               stop_token_ids=(tokens[k], 99))))
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == tokens[: k + 1]
    assert stopped.logprobs == pytest.approx(solo[0].logprobs[: k + 1], abs=1e-4)
    assert solo[0].finish_reason == "length" and len(solo[0].token_ids) == GREEDY.max_tokens


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "words"),
    [
        ([1] * 8190, 4, ["8190", "4", "8194", "8192"]),
        ([1, 49152, 5], 4, ["49152", "[0, 49152)"]),
        ([1, -3], 4, ["-3"]),
        ([], 4, ["empty"]),
        ([1, 2], 0, ["max_tokens", "0"]),
    ],
    ids=["too-long", "out-of-vocab", "negative-id", "empty", "no-tokens"],
)
def test_bad_requests_fail_with_400_and_the_engine_keeps_serving(
    engine: HFEngine, prompt: list[int], max_tokens: int, words: list[str]
) -> None:
    with pytest.raises(EngineError) as info:
        run(engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0)))
    assert (info.value.status, info.value.type) == (400, "invalid_request_error")
    for word in words:
        assert word in str(info.value)
    assert len(run(engine.generate([1, 2, 3], SamplingParams(max_tokens=1, temperature=0.0))).token_ids) == 1


def test_a_failing_batch_fails_only_its_requests_and_the_worker_survives(
    engine: HFEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_forward = engine._forward
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:  # the first decoding step of the batch
            raise RuntimeError("injected failure")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", flaky)
    params = SamplingParams(max_tokens=3, temperature=0.0)
    results = run(asyncio.wait_for(_gather_outcomes(engine, [([1, 2, 3], params), ([1, 5], params)]), 120))
    assert all(isinstance(r, EngineError) and r.status == 500 and "injected" in str(r) for r in results)
    assert len(run(engine.generate([1, 2, 3], params)).token_ids) == 3


async def _gather_outcomes(engine: HFEngine, calls: list[tuple[list[int], SamplingParams]]) -> list[Any]:
    return list(await asyncio.gather(*(engine.generate(p, s) for p, s in calls), return_exceptions=True))


def test_load_weights_changes_the_policy_and_rejects_bad_checkpoints(
    engine: HFEngine, model_dir: Path, prompts: list[list[int]], solo: list[Generation], tmp_path: Path
) -> None:
    modified = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        modified.get_input_embeddings().weight.mul_(1.5)  # tied: the output head changes too
    modified.save_pretrained(tmp_path / "step1")
    state = {k: v.contiguous() for k, v in modified.state_dict().items() if k != "lm_head.weight"}
    del modified

    try:
        run(engine.load_weights(str(tmp_path / "step1")))
        after = run(engine.generate(prompts[0], GREEDY))
        assert after.logprobs != pytest.approx(solo[0].logprobs, abs=1e-3)
    finally:
        run(engine.load_weights(str(model_dir)))
    restored = run(engine.generate(prompts[0], GREEDY))
    assert restored.token_ids == solo[0].token_ids
    assert restored.logprobs == pytest.approx(solo[0].logprobs, abs=1e-4)

    def rejected(path: Path) -> str:
        with pytest.raises(EngineError) as info:
            run(engine.load_weights(str(path)))
        assert info.value.status == 400
        return str(info.value)

    assert "does not exist" in rejected(tmp_path / "nowhere")
    name = "model.layers.0.mlp.down_proj.weight"
    save_file({**state, name: state[name][:, :10].contiguous()}, tmp_path / "wrong_shape.safetensors")
    assert name in rejected(tmp_path / "wrong_shape.safetensors")
    save_file({k: v for k, v in state.items() if k != name}, tmp_path / "missing.safetensors")
    assert name in rejected(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    assert "no .safetensors" in rejected(tmp_path / "empty")
    # Rejected checkpoints left the live weights alone.
    assert run(engine.generate(prompts[0], GREEDY)).token_ids == solo[0].token_ids
