"""One fsync per group commit: the log batch carries the call-key index entries of its calls.

`gymtape serve` writes a call's index entry after its row is durable in the write-ahead log and
before answering; on a local disk the entry is not fsynced on its own, because the log batch
holds it too (custom metadata). These tests pin what that must still guarantee: entries visible
to every reader at once, durable before their rows leave the log, and written again from the
log when a power loss took the index file's tail.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa

from recorder import CallRecord, Tape, TapeWriter
from recorder.tape._keys import HEADER, KEYS_DIR, LOG_METADATA_KEY, RECOVERED, KeyEntry, KeyIndex, KeyLog, call_key, \
    encode, shares_page_cache
from recorder.tape._wal import batch_metadata

ROOT = Path(__file__).resolve().parents[2]


def _call(rid: str, k: int, prompt: list[int], gen: list[int]) -> CallRecord:
    return CallRecord(rollout_id=rid, call_index=k, prompt_ids=prompt, generation_ids=gen,
                      generation_logprobs=[-0.25] * len(gen))


def test_each_log_batch_carries_its_calls_index_entries(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    entries = [(call_key([1, 2], [3]), KeyEntry(1, "ra", 0)), (call_key([4], [5, 6]), KeyEntry(2, "rb", 0))]
    with TapeWriter(tape, writer_id="w", durable=True, flush_seconds=None, handle_signals=False) as w:
        w.add_call(_call("ra", 0, [1, 2], [3]), log_note=encode(entries[:1]))
        w.commit()
        w.add_call(_call("rb", 0, [4], [5, 6]), log_note=encode(entries[1:]))
        w.add_call(_call("rc", 0, [7], [8]))  # no note: nothing for it in the metadata
        w.commit()
        (segment,) = (tape / "wal" / "calls").glob("*.arrows")
        assert batch_metadata(segment.read_bytes(), LOG_METADATA_KEY) == [encode(entries[:1]), encode(entries[1:])]
        assert Tape(tape).read("calls").num_rows == 3  # readers of the rows ignore the metadata


def test_small_and_large_batches_are_the_same_arrow_data_as_column_by_column(tmp_path: Path) -> None:
    w = TapeWriter(tmp_path / "t", durable=True, flush_seconds=None, handle_signals=False)
    for n in (1, 3, 300):  # 300: past the struct-array path, column by column
        for i in range(n):
            w.add_call(CallRecord(rollout_id=f"r{n}-{i}", call_index=0, prompt_ids=[i, 7], generation_ids=[i % 5, 1],
                                  generation_logprobs=[float("nan") if i % 2 else -0.5, -1.0],
                                  top_k=None if i % 3 else 5, messages=[{"role": "user", "content": f"#{i}"}]))
        buf = w._calls.take()
        want = pa.RecordBatch.from_arrays([pa.array(buf.values[c.name], type=c.type) for c in buf.columns],
                                          schema=buf.schema)
        got = buf.to_batch()
        assert got.schema.remove_metadata().equals(want.schema.remove_metadata())
        assert got.serialize().to_pybytes() == want.serialize().to_pybytes(), n
    w.abort()


def test_a_written_entry_is_visible_to_a_fresh_reader_at_once(tmp_path: Path) -> None:
    assert shares_page_cache(tmp_path), "the test tape is on a local filesystem"
    assert not shares_page_cache(Path("/proc/self")), "not a local disk filesystem: every append is synced"
    log = KeyLog(tmp_path, "w")
    assert log.sync_each is False
    log.append([(call_key([1], [2]), KeyEntry(5, "r1", 0))])
    fresh = KeyIndex(tmp_path)
    fresh.refresh()
    assert [e.rollout_id for e in fresh.candidates(call_key([1], [2]))] == ["r1"]
    synced = KeyLog(tmp_path, "s", sync_each=True)  # what a network filesystem gets
    synced.append([(call_key([3], [4]), KeyEntry(6, "r2", 0))])
    fresh.refresh()
    assert fresh.has_call("r2", 0)
    log.close()
    synced.close()


def test_the_index_file_is_synced_before_a_segment_with_its_entries_is_sealed(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    w = TapeWriter(tape, writer_id="w", durable=True, flush_rows=2, flush_seconds=None, handle_signals=False)
    seen: list[list[str]] = []
    w.before_seal = lambda: seen.append(sorted(p.name for p in (tape / "wal" / "calls").glob("*.arrows")))
    w.add_call(_call("r1", 0, [1], [2]))
    w.commit(seal=False)
    w.add_call(_call("r2", 0, [3], [4]))
    w.commit(seal=False)
    assert seen == [] and not list((tape / "calls").glob("*.parquet")), "seal=False leaves sealing to seal_due"
    w.seal_due()
    assert seen == [["w-000000.arrows"]], "called while the segment is still in the log"
    assert [p.name for p in (tape / "calls").glob("*.parquet")] == ["w-000000.parquet"]
    w.close()


_CHILD = textwrap.dedent("""
    import asyncio, os, sys
    from recorder import CallRecord
    from recorder.serve._call_log import CallLog

    log = CallLog(sys.argv[1], writer_id="dead")
    async def main():
        for i in range(5):
            rid, k = log.assign(None)
            await log.record(CallRecord(rollout_id=rid, call_index=k, prompt_ids=[1, 2, i], generation_ids=[i],
                                        generation_logprobs=[-0.5]))
            print(rid, flush=True)
    asyncio.run(main())
    os._exit(0)  # gone without closing: its log segment stays, unsealed, as after a crash
""")


def test_entries_a_power_loss_took_from_the_index_are_written_again_from_the_log(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tape)], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    assert len(out) == 5
    keys_file = tape / KEYS_DIR / "dead.keys"
    keys_file.write_bytes(keys_file.read_bytes()[: len(HEADER) + 2 * 80])  # the last three entries never hit the disk
    before = KeyIndex(tape)
    before.refresh()
    assert sum(before.has_call(rid, 0) for rid in out) == 2
    TapeWriter(tape, writer_id="next", durable=True, flush_seconds=None, handle_signals=False).close()  # recovers
    assert not list((tape / "wal" / "calls").glob("*.arrows")), "the dead writer's segment was sealed"
    assert [p.name for p in (tape / KEYS_DIR).glob(f"*{RECOVERED}.keys")] == [f"dead-000000{RECOVERED}.keys"]
    after = KeyIndex(tape)
    after.refresh()
    assert all(after.has_call(rid, 0) for rid in out)
    for i, rid in enumerate(out):
        assert [e.rollout_id for e in after.candidates(call_key([1, 2, i], [i]))] == [rid]
        assert after.scan([call_key([1, 2, i], [i])])[call_key([1, 2, i], [i])] == after.candidates(
            call_key([1, 2, i], [i])), "found once, though two files may hold it"
    assert sorted(Tape(tape).read("calls", ["rollout_id"])["rollout_id"].to_pylist()) == sorted(out)
    # a second recovery finds nothing more to do
    TapeWriter(tape, writer_id="again", durable=True, flush_seconds=None, handle_signals=False).close()
    assert len(list((tape / KEYS_DIR).glob(f"*{RECOVERED}.keys"))) == 1
