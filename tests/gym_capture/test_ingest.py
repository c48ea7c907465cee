"""`gymtape ingest` of NeMo Gym's own capture store, written by Gym's own ``TokenCaptureStore``.

The store is filled the way a Gym run fills it: Gym's capture path with its file lineage store
and delta records on, intents before every call, a mark_incomplete, an intent whose call never
landed, a retired rollout, and entries whose logprobs float32 cannot hold. After ingest, a
``TapeSource`` over the tape must give back every entry exactly (same JSON) and the same
incompleteness the store gives.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.gym_capture.conftest import require_gym

require_gym()

from nemo_gym.token_id_capture.lineage import FileLineageStore, stamp_continuation  # noqa: E402
from nemo_gym.token_id_capture.records import ParentResolutionStatus, TokenEntry, stamp_lineage  # noqa: E402
from nemo_gym.token_id_capture.store import TokenCaptureStore  # noqa: E402

from cli import app  # noqa: E402
from recorder import GymFormatError, Tape, TapeSource, ingest_gym_capture  # noqa: E402
from tests.gym_capture.driver import run_rollout  # noqa: E402

CLEAN = {f"clean-{n}": (n, 3 + n % 3) for n in range(4)}


async def _fill(store_dir: Path) -> TokenCaptureStore:
    store, lineage = TokenCaptureStore(store_dir), FileLineageStore(store_dir)
    for rid, (seed, turns) in {**CLEAN, "marked": (50, 3), "dangling": (60, 2), "retired": (70, 2)}.items():
        await run_rollout(store, lineage, rid, seed, turns)
    await store.mark_incomplete("marked", "marked-call1")
    await store.begin_call("dangling", "dangling-call-lost")
    snap = store.freeze_now("retired")
    assert await store.drop("retired", snapshot_id=snap.snapshot_id, version=snap.version)
    entry = TokenEntry(rollout_id="float64", model_call_id="c0", model="m", prompt_token_ids=[5, 6, 7],
                       generation_token_ids=[8, 9], generation_log_probs=[-0.1, -1e-300], created_at=1.5,
                       output_items=[{"type": "message", "role": "assistant", "content": []}], token_item_index=0,
                       extra_field={"kept": [1, 2.5, None]})
    stamp_continuation(entry, [{"role": "user", "content": "q"}])
    stamp_lineage(entry, None, parent_resolution=ParentResolutionStatus.ROOT)
    await store.put(entry)
    await lineage.close()
    return store


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    path = tmp_path / "gym-capture"
    asyncio.run(_fill(path))
    return path


def _frozen(tape: Path, rid: str):  # type: ignore[no-untyped-def]
    source = TapeSource(tape, share=False)
    try:
        return asyncio.run(source.freeze(rid))
    finally:
        asyncio.run(source.close())


def test_ingest_gives_back_every_entry_of_gyms_store_exactly(tmp_path: Path, store_dir: Path) -> None:
    report = ingest_gym_capture([store_dir], tmp_path / "tape", strict=True)
    store = TokenCaptureStore(shutil.copytree(store_dir, tmp_path / "copy"))  # freeze_now writes state: use a copy
    rollouts = [*CLEAN, "marked", "dangling", "float64"]
    assert (report.rollouts, report.retired, report.incomplete) == (len(rollouts), 1, 2)
    assert report.entries == sum(len(store.read_entries(r)) for r in rollouts) and not report.errors
    for rid in rollouts:
        theirs, ours = store.freeze_now(rid), _frozen(tmp_path / "tape", rid)
        assert [e.model_dump(mode="json") for e in ours.entries] == \
            [e.model_dump(mode="json") for e in theirs.entries], f"{rid}: an entry changed on the way"
        assert ours.incomplete == theirs.incomplete, f"{rid}: incompleteness changed on the way"
    assert any(e.prompt_is_delta for e in store.read_entries("clean-1")), "the store held delta records"
    calls = Tape(tmp_path / "tape").read("calls")
    assert calls.num_rows == report.entries


def test_ingesting_the_same_store_again_adds_nothing(tmp_path: Path, store_dir: Path) -> None:
    first = ingest_gym_capture([store_dir], tmp_path / "tape")
    again = ingest_gym_capture([store_dir], tmp_path / "tape")
    assert again.entries == 0 and again.skipped_existing == first.entries
    assert Tape(tmp_path / "tape").read("calls").num_rows == first.entries
    assert _frozen(tmp_path / "tape", "marked").version == _frozen(tmp_path / "tape", "marked").version


def test_a_malformed_capture_file_is_named_and_the_others_land(tmp_path: Path, store_dir: Path) -> None:
    bad = store_dir / "broken.tokens.jsonl"
    good = (store_dir / "clean-0.tokens.jsonl").read_bytes().splitlines()
    bad.write_bytes(good[0].replace(b'"clean-0"', b'"broken"') + b"\n{not json\n" + good[0] + b"\n")
    report = ingest_gym_capture([store_dir], tmp_path / "tape")
    assert [(Path(e.source).name, e.line_no) for e in report.errors] == [("broken.tokens.jsonl", 2)]
    assert _frozen(tmp_path / "tape", "broken").entries == (), "a rollout lands whole or not at all"
    with pytest.raises(GymFormatError, match="broken.tokens.jsonl:2: not JSON"):
        ingest_gym_capture([bad], tmp_path / "tape2", strict=True)


def test_gymtape_ingest_takes_a_capture_store_folder(tmp_path: Path, store_dir: Path) -> None:
    result = CliRunner().invoke(app, ["ingest", str(store_dir), "--tape", str(tmp_path / "tape")])
    assert result.exit_code == 0, result.output
    assert "ingested 7 captured rollouts" in result.output and "incomplete: 2" in result.output
    assert len(_frozen(tmp_path / "tape", "clean-2").entries) == CLEAN["clean-2"][1]
