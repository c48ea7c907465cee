"""`gymtape replay`: re-scoring recorded tokens with a real model and a real vLLM, and the report.

The end-to-end tests record real conversations through `gymtape serve` (the hf engine in fp32,
and a stock vLLM) and replay them; the others build small tapes with the real SmolLM2 model's
own logprobs (raw and temperature-processed) so every expected number has a reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from recorder import CallRecord, RolloutRecord, Tape, TapeWriter, tokenizer_identity
from replay._replay import SCHEMA, ReplayError, UnknownMetricError, parse_fail_above, replay_tape
from tests.recorder.test_serve_onpolicy import run_conversation
from tests.servers import Server, start_gymtape_serve

runner = CliRunner()
METRIC_KEYS = {"tokens", "mean_abs_dlogprob", "max_abs_dlogprob", "mean_abs_dprob", "max_abs_dprob", "kl_k1", "kl_k2",
               "kl_k3", "token_mult_prob_error", "seq_is_ratio", "geo_mean_is_ratio", "frac_outside_is_bounds", "chi2",
               "ess"}


@pytest.fixture(scope="module")
def smol(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _call_logprobs(model: torch.nn.Module, prompt: np.ndarray, gen: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Reference: one call's prompt + generation forwarded alone, log_softmax(logits / T) of each generated token."""
    ids = torch.as_tensor(np.concatenate([prompt, gen]).astype(np.int64))[None]
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt) :, None])[:, 0].numpy()


def _per_call_deltas(report: dict[str, Any]) -> dict[tuple[str, int], np.ndarray]:
    """Replayed − recorded of each call's generated tokens, in order, from the token-level details."""
    out: dict[tuple[str, int], list[float]] = {}
    for r in report["details"]:
        for seg in r["segments"]:
            for gen, delta, ci in zip(seg["generated"], seg["delta"], seg["call_index"]):
                if gen:
                    out.setdefault((r["rollout_id"], ci), []).append(delta)
    return {k: np.array(v) for k, v in out.items()}


def _copy_tape(src: Path, dst: Path, edit: Any = None) -> None:
    """Rewrite a tape call by call through TapeWriter; ``edit(record)`` may change each CallRecord."""
    tape = Tape(src)
    extra = ("temperature", "top_p", "top_k", "logprobs_kind", "engine", "model", "generation_logprobs", "policy_version")
    with TapeWriter(dst, tokenizer=tape.meta.tokenizer, flush_seconds=None, handle_signals=False) as w:
        for rid, calls in tape.iter_rollout_calls(extra):
            for k in range(len(calls["call_index"])):
                rec = CallRecord(rollout_id=rid, call_index=calls["call_index"][k], prompt_ids=calls["prompt_ids"][k],
                                 generation_ids=calls["generation_ids"][k],
                                 generation_logprobs=np.array(calls["generation_logprobs"][k], np.float32),
                                 temperature=calls["temperature"][k], top_p=calls["top_p"][k], top_k=calls["top_k"][k],
                                 logprobs_kind=calls["logprobs_kind"][k], engine=calls["engine"][k],
                                 model=calls["model"][k], policy_version=calls["policy_version"][k])
                w.add_call(edit(rec) if edit else rec)


# -- small tapes with reference logprobs ------------------------------------------------------------


def test_synthetic_multi_turn_tape_matches_a_per_call_forward(make_tape: Any, smol: torch.nn.Module,
                                                              model_dir: Path) -> None:
    """Rollouts scored once as whole sequences (history rewrites split) give each call's own logprobs."""
    tape_dir, _ = make_tape(repeats=2, calls=3, context_tokens=48, vocab_size=49152, rewrite_every=3, empty_every=4)
    d = replay_tape(tape_dir, model=smol, tokenizer=model_dir, detail_rollouts=100).to_dict()
    assert d["schema"] == SCHEMA and d["mode"] == "model" and d["dtype"] == "float32"
    tape = Tape(tape_dir)
    calls = tape.calls().collect()
    empty = calls.filter(token_status="empty")
    assert d["skipped"] == {"calls_without_tokens": empty.height,
                            "rollouts_without_tokens": empty["rollout_id"].n_unique()} and empty.height > 0
    assert any("logprobs_kind is null" in w for w in d["warnings"]), "ingested Gym calls do not say raw/processed"
    deltas = _per_call_deltas(d)
    checked = 0
    for rid, c in tape.iter_rollout_calls(("generation_logprobs", "token_status")):
        if c["token_status"][0] != "ok":
            continue
        for k in range(len(c["call_index"])):
            ref = _call_logprobs(smol, c["prompt_ids"][k], c["generation_ids"][k])
            np.testing.assert_allclose(deltas[(rid, k)], ref - c["generation_logprobs"][k], atol=1e-4, rtol=0,
                                       err_msg=f"{rid} call {k}")
            checked += 1
    assert checked == sum(len(r["calls"]) for r in d["rollouts"]) == calls.height - empty.height
    assert d["overall"]["tokens"] == sum(v.size for v in deltas.values()) == d["timing"]["tokens"] - sum(
        s["generated"].count(False) for r in d["details"] for s in r["segments"])
    # report shape: every metric everywhere, buckets cover the positions, worst tokens sorted by |delta|
    assert set(d["overall"]) == METRIC_KEYS
    assert [b["bucket"] for b in d["by_position"]] == ["0-15", "16-63", "64-255", "256-1023", "1024-4095", "4096+"]
    assert sum(b["tokens"] for b in d["by_position"]) == d["overall"]["tokens"]
    assert all(METRIC_KEYS <= set(c) for r in d["rollouts"] for c in r["calls"])
    worst = [abs(w["delta"]) for w in d["worst_tokens"]]
    assert len(worst) == 20 and worst == sorted(worst, reverse=True)
    assert worst[0] == pytest.approx(d["overall"]["max_abs_dlogprob"])
    json.dumps(d, allow_nan=False)  # the report is plain JSON


def _scored_tape(path: Path, model: torch.nn.Module, model_dir: Path, calls: list[dict[str, Any]]) -> None:
    """One rollout whose calls carry the model's own logprobs: raw, or processed at the call's temperature."""
    rng = np.random.default_rng(7)
    context = rng.integers(3, 49000, 12)
    with TapeWriter(path, tokenizer=tokenizer_identity(model_dir), flush_seconds=None, handle_signals=False) as w:
        for k, c in enumerate(calls):
            prompt = np.concatenate([context, rng.integers(3, 49000, 4)])
            gen = rng.integers(3, 49000, 9)
            t = c["temperature"] if c.get("record_as", c["kind"]) == "processed" else 1.0
            w.add_call(CallRecord(rollout_id="r", call_index=k, prompt_ids=prompt, generation_ids=gen,
                                  generation_logprobs=_call_logprobs(model, prompt, gen, t), temperature=c["temperature"],
                                  top_p=c.get("top_p"), logprobs_kind=c["kind"]))
            context = np.concatenate([prompt, gen])
        w.add_rollout(RolloutRecord(rollout_id="r", reward=0.5, env="e", task_index=3, rollout_index=1))


def test_processed_logprobs_are_scored_at_the_recorded_temperature(tmp_path: Path, smol: torch.nn.Module,
                                                                   model_dir: Path) -> None:
    calls = [{"kind": "processed", "temperature": 0.6}, {"kind": "raw", "temperature": 0.6},
             {"kind": "processed", "temperature": 1.7}]
    _scored_tape(tmp_path / "ok", smol, model_dir, calls)
    d = replay_tape(tmp_path / "ok", model=smol, tokenizer=model_dir).to_dict()
    assert d["overall"]["tokens"] == 27 and d["overall"]["max_abs_dlogprob"] <= 1e-4
    assert [c["logprobs_kind"] for c in d["rollouts"][0]["calls"]] == ["processed", "raw", "processed"]
    assert d["rollouts"][0]["env"] == "e" and d["rollouts"][0]["task_index"] == 3 and d["rollouts"][0]["reward"] == 0.5
    assert not d["warnings"]
    # The same numbers labelled raw are compared with the plain distribution: a clear mismatch.
    _scored_tape(tmp_path / "mislabelled", smol, model_dir, [{**c, "kind": "raw", "record_as": c["kind"]} for c in calls])
    bad = replay_tape(tmp_path / "mislabelled", model=smol, tokenizer=model_dir).to_dict()
    per_call = [c["max_abs_dlogprob"] for c in bad["rollouts"][0]["calls"]]
    assert per_call[0] > 0.1 and per_call[1] <= 1e-4 and per_call[2] > 0.1
    # Processed under top-p cannot be rebuilt from logits and temperature: replay says so.
    _scored_tape(tmp_path / "top_p", smol, model_dir, [{"kind": "processed", "temperature": 0.8, "top_p": 0.9}])
    warned = replay_tape(tmp_path / "top_p", model=smol, tokenizer=model_dir).to_dict()
    assert any("top-p/top-k" in w for w in warned["warnings"])


def test_bad_settings_are_refused(tmp_path: Path, make_tape: Any) -> None:
    with pytest.raises(UnknownMetricError, match="unknown metric 'max_dlogprob'"):
        parse_fail_above(["max_dlogprob=1"])
    with pytest.raises(ReplayError, match="METRIC=VALUE"):
        parse_fail_above(["max_abs_dlogprob"])
    assert parse_fail_above(["max_abs_dlogprob=1e-3", "kl_k3=0.5"]) == {"max_abs_dlogprob": 1e-3, "kl_k3": 0.5}
    tape, _ = make_tape(repeats=1, calls=1, context_tokens=16)
    with pytest.raises(ReplayError, match="exactly one"):
        replay_tape(tape)
    code = runner.invoke(app, ["replay", str(tape), "--fail-above", "nope=1"])
    assert code.exit_code == 2 and "unknown metric 'nope'" in code.stderr


# -- end to end: a tape recorded by `gymtape serve` --------------------------------------------------


@pytest.fixture(scope="module")
def served_tape(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A real `gymtape serve --engine hf --dtype float32` recording: (tape, id of the three-call rollout).

    The conversation helper first tries seeds with one call each, so the tape also holds a few
    one-call rollouts."""
    tmp = tmp_path_factory.mktemp("served")
    tape = tmp / "tape"
    server = start_gymtape_serve(tmp, "--engine", "hf", "--model", str(model_dir), "--dtype", "float32",
                                 "--tape", str(tape), "--served-model-name", "smol")
    try:
        responses, _ = run_conversation(server)
    finally:
        assert server.stop() in (0, -15), server.log_tail()
    return tape, responses[0]["gymtape"]["rollout_id"]


def _rollout(d: dict[str, Any], rollout_id: str) -> dict[str, Any]:
    return next(r for r in d["rollouts"] if r["rollout_id"] == rollout_id)


def test_served_hf_tape_replays_within_1e_4(served_tape: tuple[Path, str]) -> None:
    """End to end: a tape recorded with the embedded model in fp32 replays with max |Δlogprob| <= 1e-4."""
    tape, rid = served_tape
    r = runner.invoke(app, ["replay", str(tape), "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["overall"]["tokens"] > 0 and d["overall"]["max_abs_dlogprob"] <= 1e-4
    calls = _rollout(d, rid)["calls"]
    assert [c["call_index"] for c in calls] == [0, 1, 2]
    assert all(c["logprobs_kind"] == "raw" and c["temperature"] == pytest.approx(1.5) for c in calls)
    assert d["threshold_failures"] == [] and d["warnings"] == []
    r = runner.invoke(app, ["replay", str(tape), "--json", "--fail-above", "max_abs_dlogprob=1e-9"])
    assert r.exit_code == 1
    assert json.loads(r.stdout)["threshold_failures"][0].startswith("max_abs_dlogprob = ")


def test_planted_logprob_shift_is_pinned_to_its_call(served_tape: tuple[Path, str], tmp_path: Path,
                                                     model_dir: Path) -> None:
    tape, rid = served_tape

    def shift_call_1(rec: CallRecord) -> CallRecord:
        if rec.rollout_id == rid and rec.call_index == 1:
            rec.generation_logprobs = np.asarray(rec.generation_logprobs) + np.float32(0.5)
        return rec

    _copy_tape(tape, tmp_path / "shifted", shift_call_1)
    report = replay_tape(tmp_path / "shifted", model=model_dir, fail_above={"kl_k3": 0.01}, worst_tokens=5)
    d = report.to_dict()
    calls = _rollout(d, rid)["calls"]
    assert calls[1]["mean_abs_dlogprob"] == pytest.approx(0.5, abs=1e-4)
    assert calls[1]["kl_k1"] == pytest.approx(0.5, abs=1e-4)  # replayed is 0.5 below the (shifted) record
    assert calls[0]["max_abs_dlogprob"] <= 1e-4 and calls[2]["max_abs_dlogprob"] <= 1e-4
    assert {(w["rollout_id"], w["call_index"]) for w in d["worst_tokens"]} == {(rid, 1)}
    assert all(w["delta"] == pytest.approx(-0.5, abs=1e-4) for w in d["worst_tokens"])
    assert not report.ok and d["threshold_failures"][0].startswith("kl_k3 = ")
    html = tmp_path / "replay.html"
    r = runner.invoke(app, ["replay", str(tmp_path / "shifted"), "--html", str(html), "--top", "3"])
    assert r.exit_code == 0 and html.stat().st_size > 0 and "worst tokens" in r.stdout


# -- end to end: a tape recorded through vLLM, replayed on that vLLM ---------------------------------


def test_vllm_tape_replays_on_the_engine_url(vllm_upstream: Server, model_dir: Path, tmp_path: Path) -> None:
    """Engine vs recording: prompt_logprobs of the same vLLM agree with the sampling logprobs it returned."""
    tape = tmp_path / "tape"
    server = start_gymtape_serve(tmp_path, "--engine", "vllm", "--upstream", vllm_upstream.url, "--tokenizer", str(model_dir),
                                 "--tape", str(tape))
    try:
        run_conversation(server)
    finally:
        assert server.stop() in (0, -15), server.log_tail()
    r = runner.invoke(app, ["replay", str(tape), "--engine-url", f"{vllm_upstream.url}/v1", "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["mode"] == "engine" and d["model"] == "smol" and d["engine_url"] == f"{vllm_upstream.url}/v1"
    assert d["overall"]["tokens"] > 0 and d["overall"]["max_abs_dlogprob"] <= 1e-4
    assert d["worst_tokens"][0]["token"] != "" and not d["warnings"]  # decoded with the tape's own tokenizer
    # and the trainer-side model agrees with vLLM's recorded logprobs too (both fp32)
    m = replay_tape(tape, model=model_dir).to_dict()
    assert m["overall"]["tokens"] == d["overall"]["tokens"] and m["overall"]["max_abs_dlogprob"] <= 1e-3
