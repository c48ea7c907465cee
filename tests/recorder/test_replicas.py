"""Many servers, one tape: continuations and joins resolved on the tape, identical greedy repeats kept apart.

Two real `gymtape serve` replicas capture into one tape; `gymtape record` sends each call of a
rollout to the next replica and joins every rollout to the calls the replicas recorded, without
asking either of them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import polars as pl
import pytest

from recorder import CallRecord, Tape
from recorder.serve._call_log import CallLog
from recorder.tape._claims import CallClaims
from recorder.tape._keys import KEYS_DIR, KeyIndex, call_key
from tests.servers import ROOT, Server, start_gymtape_serve


# ---------------------------------------------------------------- two call logs in one process

def _record(log: CallLog, anchor: tuple[list[int], list[int]] | None, prompt: list[int], gen: list[int]) -> tuple[str, int]:
    rid, k = log.assign(anchor)
    asyncio.run(log.record(CallRecord(rollout_id=rid, call_index=k, call_id=f"{rid}-{k}-{len(prompt)}",
                                      prompt_ids=prompt, generation_ids=gen, generation_logprobs=[-0.5] * len(gen))))
    return rid, k


def test_a_replica_continues_another_replica_s_rollout_and_stores_a_prompt_that_rebuilds(tmp_path: Path) -> None:
    tape = tmp_path / "tape"
    a, b = CallLog(tape, writer_id="replica-a"), CallLog(tape, writer_id="replica-b")
    try:
        # two greedy repeats: the same first call twice, on replica a
        r1, r2 = _record(a, None, [1, 2], [3]), _record(a, None, [1, 2], [3])
        assert r1[0] != r2[0]
        # their continuations arrive at replica b: one each, oldest first
        # (the client rewrote the history: token 2 became 9)
        c1 = _record(b, ([1, 2], [3]), [1, 9, 3, 4], [5])
        c2 = _record(b, ([1, 2], [3]), [1, 9, 3, 4], [5])
        assert (c1, c2) == ((r1[0], 1), (r2[0], 1))
        # back on replica a, with the history rewritten back: a's delta state of r1 is call 0's,
        # not call 1's, the call before it on the tape, so the call must be stored whole to rebuild
        c3 = _record(a, ([1, 9, 3, 4], [5]), [1, 2, 3, 6], [8])
        assert c3 == (r1[0], 2)
        # a continuation that every recorded call already took (a client's retry) continues the latest
        assert _record(b, ([1, 2], [3]), [1, 9, 3, 4], [5]) == (r2[0], 1)
        # one replica's lookup sees the other's calls
        assert b.lookup([1, 2, 3, 6], [8]) == (r1[0], 2, 0)
    finally:
        a.close()
        b.close()
    t = Tape(tape)
    sent = {f"{r1[0]}-0-2": [1, 2], f"{r1[0]}-1-4": [1, 9, 3, 4], f"{r1[0]}-2-4": [1, 2, 3, 6]}
    prompts = {cid: p.tolist() for cid, p in t.prompts().items()}
    assert {cid: prompts[cid] for cid in sent} == sent


def test_a_continuation_that_was_not_recorded_gives_its_call_back(tmp_path: Path) -> None:
    tape = tmp_path / "tape"
    a, b = CallLog(tape, writer_id="replica-a"), CallLog(tape, writer_id="replica-b")
    try:
        rid, _ = _record(a, None, [1, 2], [3])
        taken = b.assign(([1, 2], [3]))
        assert taken == (rid, 1)
        b.unassign(([1, 2], [3]), *taken)  # its recording failed (503): the client retries, maybe elsewhere
        assert a.assign(([1, 2], [3])) == (rid, 1)
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------- real replicas

@pytest.fixture
def replicas(model_dir: Path, tmp_path: Path) -> Iterator[tuple[Server, Server, Path]]:
    tape = tmp_path / "tape"
    a = start_gymtape_serve(tmp_path, "--engine", "hf", "--model", str(model_dir), "--tape", str(tape), name="a")
    try:
        b = start_gymtape_serve(tmp_path, "--engine", "hf", "--model", str(model_dir), "--tape", str(tape), name="b")
    except BaseException:
        a.stop()
        raise
    yield a, b, tape
    b.stop()
    a.stop()


def _chat(server: Server, messages: list[dict], max_tokens: int = 4) -> dict:
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=300, json={
        "model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0})
    assert r.status_code == 200, r.text
    return r.json()


def _assert_integrity(tape: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """No call row twice, and every recorded rollout has its rollout row (none orphaned)."""
    t = Tape(tape)
    calls = t.calls().select("call_id", "rollout_id", "call_index").collect()
    rollouts = t.rollouts().select("rollout_id", "env", "task_index", "rollout_index", "num_calls").collect()
    assert calls["call_id"].n_unique() == calls.height, "a call row written twice"
    assert calls.select("rollout_id", "call_index").n_unique() == calls.height, "two rows for one (rollout, call)"
    assert rollouts["rollout_id"].n_unique() == rollouts.height, "one recorded rollout joined by two agent rollouts"
    orphans = set(calls["rollout_id"]) - set(rollouts["rollout_id"])
    assert not orphans, f"recorded rollouts without a rollout row: {sorted(orphans)}"
    return calls, rollouts


def _record_cli(tape: Path, *args: str) -> str:
    exe = Path(sys.executable).with_name("gymtape")
    r = subprocess.run([str(exe), "record", "--tape", str(tape), "--temperature", "0", "--max-tokens", "6", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def test_two_replicas_and_one_recorder_join_every_greedy_repeat_once(replicas: tuple[Server, Server, Path]) -> None:
    a, b, tape = replicas
    # 1. greedy repeats of a multi-turn conversation whose calls alternate between the replicas
    #    (as a round-robin balancer sends them): each continuation lands in its own repeat's rollout
    start = [{"role": "user", "content": "Name a color."}]
    firsts = [_chat(a, start) for _ in range(3)]
    assert len({f["choices"][0]["message"]["content"] for f in firsts}) == 1, "greedy: identical first calls"
    chains = []
    for f in firsts:
        history = [*start, f["choices"][0]["message"]]
        second = _chat(b, [*history, {"role": "user", "content": "Another one?"}])
        history += [{"role": "user", "content": "Another one?"}, second["choices"][0]["message"]]
        third = _chat(a, [*history, {"role": "user", "content": "And one more?"}])
        chains.append([f, second, third])
    for chain in chains:
        ids = [(c["gymtape"]["rollout_id"], c["gymtape"]["call_index"]) for c in chain]
        assert {rid for rid, _ in ids} == {ids[0][0]} and [k for _, k in ids] == [0, 1, 2], ids
    assert len({c[0]["gymtape"]["rollout_id"] for c in chains}) == 3, "identical repeats stay three rollouts"
    # b answers a lookup of a's calls from the tape, in order
    msg = chains[0][2]["choices"][0]["message"]
    looked = httpx.post(f"{b.url}/gymtape/lookup", json={"calls": [{
        "prompt_token_ids": c["choices"][0]["message"]["prompt_token_ids"],
        "generation_token_ids": c["choices"][0]["message"]["generation_token_ids"]} for c in chains[0]]}).json()
    assert [x["call_index"] for x in looked["calls"]] == [0, 1, 2] and msg["generation_token_ids"]
    # what `gymtape record` does with such a rollout: the three identical chains join once each
    index = KeyIndex(tape)
    claims = CallClaims(tape, index)
    keys = [call_key(c["choices"][0]["message"]["prompt_token_ids"], c["choices"][0]["message"]["generation_token_ids"])
            for c in chains[0]]
    joined = [claims.join(keys) for _ in range(4)]
    assert {j.rollout_id for j in joined[:3] if j} == {c[0]["gymtape"]["rollout_id"] for c in chains}
    assert joined[3] is None
    prompts = Tape(tape).prompts()
    for chain in chains:  # every prompt rebuilds to what the replica generated from, whichever wrote it
        for c in chain:
            assert prompts[c["id"]].tolist() == c["choices"][0]["message"]["prompt_token_ids"]

    # 2. gymtape record: greedy repeats of tasks, each call to the next replica; joined on the tape,
    #    once with both replicas named (--server-url twice), once with none named
    both = _record_cli(tape, "--env", "addition", "--task-index", "0", "--repeats", "4", "--model-url", f"{a.url}/v1",
                       "--model-url", f"{b.url}/v1", "--server-url", a.url, "--server-url", b.url)
    none = _record_cli(tape, "--env", "calculator", "--task-index", "0", "--task-index", "1", "--repeats", "3",
                       "--model-url", f"{a.url}/v1", "--model-url", f"{b.url}/v1")
    assert "joined with server calls 4" in both and "joined with server calls 6" in none, (both, none)
    # the direct conversations above have no rollout rows: give them theirs the way a recorder would
    calls, rollouts = _finish_direct(tape, chains, claims)
    assert rollouts.filter(pl.col("env").is_in(["addition", "calculator"])).height == 10
    recorded_by = {p.stem for p in (tape / KEYS_DIR).glob("*.keys") if p.stat().st_size > 16}
    assert len(recorded_by) == 2, "both replicas recorded calls"
    for s in (a, b):
        assert httpx.get(f"{s.url}/health").json()["recording"]["errors"] == 0


def _finish_direct(tape: Path, chains: list[list[dict]], claims: CallClaims) -> tuple[pl.DataFrame, pl.DataFrame]:
    from recorder import RolloutRecord, TapeWriter

    with TapeWriter(tape, handle_signals=False) as w:
        for chain in chains:
            w.add_rollout(RolloutRecord(rollout_id=chain[0]["gymtape"]["rollout_id"], env="direct"))
    return _assert_integrity(tape)


def test_greedy_repeats_on_one_server_are_separate_rollouts_each_joined_once(
        model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recorder import EnvConfig, RecordConfig, record
    from recorder.collect import _collector

    # As for a Gym agent: the recorder does not see which rollout the server answered each call
    # with; it finds the rollout by the calls' token IDs alone, and five identical calls match five.
    monkeypatch.setattr(_collector, "_joined_rollout_id", lambda joins: None)
    tape = tmp_path / "tape"
    server = start_gymtape_serve(tmp_path, "--engine", "hf", "--model", str(model_dir), "--tape", str(tape))
    try:
        env = EnvConfig(name="addition", builtin="addition", model_url=f"{server.url}/v1", task_indices=[2], repeats=5,
                        sampling={"temperature": 0.0, "max_tokens": 6})
        report = record(RecordConfig(tape=tape, envs=[env], concurrency=1))
    finally:
        server.stop()
    assert report.joined == 5 and report.failed == 0
    calls, rollouts = _assert_integrity(tape)
    assert rollouts.height == 5 and calls["rollout_id"].n_unique() == 5
    outputs = Tape(tape).read("calls", ["generation_ids"])["generation_ids"].to_pylist()
    assert len({tuple(g) for g in outputs}) == 1, "greedy: five identical calls, five rollouts"


def test_model_and_server_urls_take_one_several_or_none() -> None:
    from recorder import EnvConfig, RecordConfigError

    env = EnvConfig(name="a", builtin="addition", model_url=["http://a/v1", "http://b/v1"], server_url=[])
    env.validate()
    assert env.model_url == ["http://a/v1", "http://b/v1"] and env.server_url is None
    with pytest.raises(RecordConfigError, match="server_url must be a URL or a list of URLs"):
        EnvConfig(name="a", builtin="addition", model_url="http://a/v1", server_url=[3]).validate()  # type: ignore[list-item]
