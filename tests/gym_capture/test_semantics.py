"""What the capture classes promise beyond Gym's conformance suite: retirement, bad values, and
entries that outlive the in-memory index."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.gym_capture.conftest import require_gym

require_gym()

from nemo_gym.token_id_capture.lineage import stamp_continuation  # noqa: E402
from nemo_gym.token_id_capture.records import ParentResolutionStatus, TokenEntry, stamp_lineage  # noqa: E402

from recorder import CaptureRetiredError, Tape, TapeLineage, TapeSink, TapeSource, TapeValueError  # noqa: E402
from tests.gym_capture.driver import run_rollout  # noqa: E402


def _entry(rollout_id: str, call_id: str, prompt: list[int], gen: list[int]) -> TokenEntry:
    entry = TokenEntry(rollout_id=rollout_id, model_call_id=call_id, prompt_token_ids=prompt, generation_token_ids=gen,
                       generation_log_probs=[-0.5] * len(gen), created_at=3.0)
    stamp_continuation(entry, [{"role": "user", "content": "q"}])
    return stamp_lineage(entry, None, parent_resolution=ParentResolutionStatus.ROOT)


def test_a_retired_rollout_refuses_writes_and_freezes_but_keeps_its_rows(tmp_path: Path) -> None:
    async def go() -> None:
        sink, source = TapeSink(tmp_path / "t"), TapeSource(tmp_path / "t")
        await sink.begin_call("r1", "c1")
        await sink.put(_entry("r1", "c1", [1, 2], [3]))
        snap = await source.freeze("r1")
        assert not snap.incomplete, "an intent with its entry does not mask the rollout"
        assert await source.drop("r1", snapshot_id=snap.snapshot_id, version=snap.version)
        assert await source.drop("r1", snapshot_id=snap.snapshot_id, version=snap.version), "retiring twice is fine"
        assert not await source.drop("r1", snapshot_id=snap.snapshot_id, version=snap.version + 1)
        for late in (sink.put(_entry("r1", "c2", [1, 2, 3], [4])), sink.begin_call("r1", "c3"),
                     sink.mark_incomplete("r1", "c3"), source.freeze("r1")):
            with pytest.raises(CaptureRetiredError, match="r1"):
                await late
        await sink.close()
        await source.close()

    asyncio.run(go())
    tape = Tape(tmp_path / "t")
    assert tape.read("calls").num_rows == 1
    (row,) = tape.read("rollouts").to_pylist()
    assert (row["rollout_id"], row["status"], row["token_status"], row["num_calls"]) == ("r1", "ok", "ok", 1)


def test_a_value_the_tape_cannot_hold_fails_the_put_and_gym_marks_the_rollout(tmp_path: Path) -> None:
    async def go() -> None:
        sink, source = TapeSink(tmp_path / "t"), TapeSource(tmp_path / "t")
        with pytest.raises(TapeValueError, match="outside 0..2\\^31-1"):
            await sink.put(_entry("r1", "c1", [1, 2**40], [3]))
        with pytest.raises(TapeValueError, match="rollout id"):
            await sink.put(_entry("../escape", "c1", [1], [3]))
        await sink.mark_incomplete("r1", "c1")  # what Gym's capture path does when put raises
        snap = await source.freeze("r1")
        assert snap.incomplete and snap.entries == ()
        await sink.close()
        await source.close()

    asyncio.run(go())
    (row,) = Tape(tmp_path / "t").read("rollouts").to_pylist()
    assert row["token_status"] == "incomplete", "tape readers see the mark as well as Gym's source"


def test_rollouts_evicted_from_memory_are_read_back_from_the_tape(tmp_path: Path) -> None:
    """A small token budget evicts rollouts from the index; freezes and continuations still see them."""
    async def go() -> None:
        sink = TapeSink(tmp_path / "t", share=False, max_cached_tokens=200)
        lineage = TapeLineage(tmp_path / "t", share=False)
        # each rollout is ~150 tokens, so the interleaved puts keep evicting each other's rollouts
        await asyncio.gather(*(run_rollout(sink, lineage, f"r{n}", n, 3) for n in range(6)))
        source = TapeSource(tmp_path / "t", share=False, max_cached_tokens=200)
        for n in range(6):
            snap = await source.freeze(f"r{n}")
            assert [e.model_call_id for e in snap.entries] == [f"r{n}-call{k}" for k in range(3)]
        for closable in (sink, lineage, source):
            await closable.close()

    asyncio.run(go())


def test_the_sinks_tokenizer_is_recorded_so_check_and_replay_find_it(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": {"vocab": {}}}')

    async def go() -> None:
        sink = TapeSink(tmp_path / "t", tokenizer=tok)
        await sink.put(_entry("r1", "c1", [1, 2], [3]))
        await sink.close()

    asyncio.run(go())
    meta = Tape(tmp_path / "t").meta
    assert meta.tokenizer is not None and meta.tokenizer.name == "tok"
