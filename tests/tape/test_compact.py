"""Compaction: merged shards, supersession, vanishing shards, crashes, copies, recompaction, one compactor."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli import app
from recorder import (
    CompactionBusyError,
    ShardCatalog,
    ShardInfo,
    ShardListing,
    StorageError,
    Tape,
    TapeStorage,
    compact_tape,
    summarize,
)
from recorder.tape._shards import ROW_GROUP_ROWS
from tests.conftest import wait_until
from tests.tape.factories import ids, rows, write_rollouts
from trainer_bridge import TapeFollower


def _info(name: str, replaces: tuple[str, ...] = ()) -> ShardInfo:
    return ShardInfo("calls", f"/t/calls/{name}", 1, 1, name.rsplit("-", 1)[0], frozenset(replaces), {},
                     "2026-01-01T00:00:00+00:00" if replaces else None)


def _files(tape: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tape)): p.read_bytes() for p in sorted(tape.rglob("*")) if p.is_file()}


# -- supersession rules (pure) ----------------------------------------------------------------------


def test_a_listed_compacted_shard_hides_the_shards_it_replaces() -> None:
    listing = ShardListing.of("calls", [_info("w-000000.parquet"), _info("w-000001.parquet"),
                                        _info("c-000000.parquet", ("w-000000.parquet",))])
    assert [s.name for s in listing.live] == ["c-000000.parquet", "w-000001.parquet"]
    assert [s.name for s in listing.superseded] == ["w-000000.parquet"]
    assert listing.coverage == {"c-000000.parquet", "w-000000.parquet", "w-000001.parquet"}


def test_deleting_an_intermediate_never_resurrects_its_ancestor() -> None:
    # c2 compacted c1 while c1's own source s was still present: c2 names both.
    c1 = _info("c1-000000.parquet", ("s-000000.parquet",))
    c2 = _info("c2-000000.parquet", ("c1-000000.parquet", "s-000000.parquet"))
    listing = ShardListing.of("calls", [_info("s-000000.parquet"), c2])  # c1 deleted, s not yet
    assert [s.name for s in listing.live] == ["c2-000000.parquet"], "s must stay hidden once c1 is gone"
    assert not ShardListing.of("calls", [_info("s-000000.parquet"), c1, c2]).missed_by(listing)


def test_a_listing_that_missed_a_compaction_is_caught_by_the_next() -> None:
    # The first listing ran while the compactor published c and deleted s1: it saw neither.
    first = ShardListing.of("calls", [_info("s-000002.parquet")])
    later = ShardListing.of("calls", [_info("c-000000.parquet", ("s-000001.parquet", "s-000002.parquet"))])
    assert later.missed_by(first), "s1's rows were in no shard of the first listing"
    # A compaction of what the first listing saw is no reason to start over.
    assert not ShardListing.of("calls", [_info("c-000000.parquet", ("s-000002.parquet",))]).missed_by(first)


# -- compaction on a real tape ------------------------------------------------------------------------


def test_compaction_merges_every_shard_keeping_each_row_once_with_calls_sorted(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    write_rollouts(tape, "a", range(0, 30), calls=3)
    write_rollouts(tape, "b", range(0, 20), calls=2, flush_every=3)
    before = {t: rows(tape, t) for t in ("calls", "rollouts")}
    assert len(Tape(tape).shards("calls")) == 30 + 7
    report = compact_tape(tape)
    t = Tape(tape)
    assert [len(t.shards(x)) for x in ("calls", "rollouts")] == [1, 1]
    assert report.tables["calls"].shards_in == 37 and report.tables["calls"].deleted == 37
    assert sorted(os.listdir(tape / "calls")) == [t.shards("calls")[0].name], "sources are deleted"
    for table, expected in before.items():
        assert rows(t, table).equals(expected), f"{table}: compaction changed rows"
    calls = t.read("calls")
    keys = list(zip(calls["rollout_id"].to_pylist(), calls["call_index"].to_pylist()))
    assert keys == sorted(keys), "calls are written sorted by (rollout_id, call_index)"
    md = pq.ParquetFile(t.shards("calls")[0].path).metadata
    assert all(md.row_group(i).num_rows <= ROW_GROUP_ROWS for i in range(md.num_row_groups))
    assert set(t.shards("calls")[0].writers) == {"a", "b"}
    assert len(t.prompts()) == 30 * 3 + 20 * 2, "prompts still rebuild from the delta encoding"
    assert compact_tape(tape).shards_in == 0, "a compacted tape has nothing left to compact"


def test_compacting_a_compacted_tape_merges_the_new_shards_with_the_small_compacted_one(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    write_rollouts(tape, "a", range(0, 10))
    compact_tape(tape)
    first = Tape(tape).shards("calls")[0]
    write_rollouts(tape, "a", range(10, 16))  # the same writer id again, after its shards were compacted away
    names = [s.name for s in Tape(tape).shards("calls") if not s.compacted]
    assert names[0] == "a-000010.parquet", "a reused writer id continues after the compacted sequence numbers"
    report = compact_tape(tape)
    t = Tape(tape)
    (second,) = t.shards("calls")
    assert report.tables["calls"].shards_in == 7 and first.name in second.replaces
    assert ids(rows(t, "calls")) == sorted(f"a-r{r}-{k}" for r in range(16) for k in range(2))
    assert ids(rows(t, "rollouts")) == sorted(f"a-r{r}" for r in range(16))


def test_a_long_lived_catalog_forgets_the_checks_of_shards_compacted_away(tmp_path: Path) -> None:
    """A follower's catalog lives as long as training: it keeps a footer check per shard listed
    now, not per shard ever written (a live writer flushes one every few seconds)."""
    tape = tmp_path / "t"
    catalog = ShardCatalog(TapeStorage(tape))
    for start in (0, 10, 20):
        write_rollouts(tape, "a", range(start, start + 10))  # ten shards per table each time
        assert len(catalog.listing("calls").live) >= 10
        compact_tape(tape)
        live = catalog.listing("calls").live
        assert len(live) == 1 and live[0].compacted
        checked = catalog._checked.values()  # the cache under test (no public view of it)
        assert {i.path for i in checked if i.table == "calls"} == {live[0].path}
    assert catalog.read("calls").num_rows == 60


def test_retention_keeps_superseded_shards_that_readers_skip_and_inspect_counts_apart(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    write_rollouts(tape, "a", range(0, 8))
    before = rows(tape, "calls")
    report = compact_tape(tape, retention=3600)
    assert report.tables["calls"].retained == 8 and report.tables["calls"].deleted == 0
    t = Tape(tape)
    assert rows(t, "calls").equals(before) and t.calls().collect().height == before.num_rows
    s = summarize(t)
    assert s["superseded"]["calls"]["count"] == 8 and s["shards"]["calls"]["count"] == 1
    live = sum(x.bytes for table in ("calls", "rollouts") for x in t.shards(table))
    assert s["tape_bytes"] == live + (tape / "tape.json").stat().st_size, "tape_bytes counts live shards only"
    assert s["writers"]["seen"] == ["a"] and s["writers"]["not_closed"] == []
    assert compact_tape(tape, retention=0).tables["calls"].deleted == 8, "a later run deletes what expired"
    assert summarize(Tape(tape))["superseded"]["calls"]["count"] == 0


# -- readers beside a compactor -----------------------------------------------------------------------


class _CompactingCatalog(ShardCatalog):
    """Runs a real compaction right after the reader listed the shards and before it reads them."""

    def __init__(self, storage: TapeStorage, tape: Path) -> None:
        super().__init__(storage)
        self.tape = tape
        self.compactions = 0

    def read_shard(self, info: ShardInfo, columns: list[str] | None = None) -> pa.Table:
        if not self.compactions:
            self.compactions += 1
            compact_tape(self.tape)  # deletes every shard the reader just listed
        return super().read_shard(info, columns)


def test_a_shard_vanishing_between_listing_and_reading_restarts_the_read(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    write_rollouts(tape, "a", range(0, 6))
    expected = rows(tape, "calls")
    catalog = _CompactingCatalog(TapeStorage(tape), tape)
    got = catalog.read("calls")
    assert catalog.compactions == 1 and len(Tape(tape).shards("calls")) == 1
    assert got.sort_by("call_id").equals(expected), "the read started over on the compacted shard: each row once"


def test_an_exception_after_publishing_leaves_sources_that_readers_skip(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    write_rollouts(tape, "a", range(0, 12))
    before = {t: rows(tape, t) for t in ("calls", "rollouts")}

    def crash(table: str, done: int, total: int) -> None:  # after the first compacted shard is published
        raise RuntimeError("crash mid-compaction")

    with pytest.raises(RuntimeError):
        compact_tape(tape, shard_bytes=1, progress=crash)  # one source per compacted shard
    t = Tape(tape)
    assert len(t.listing("calls").superseded) == 1, "the published shard supersedes its source, not yet deleted"
    for table, expected in before.items():
        assert rows(t, table).equals(expected), f"{table}: no row lost or doubled after the crash"
    assert t.calls().collect().height == before["calls"].num_rows
    compact_tape(tape)
    assert rows(tape, "calls").equals(before["calls"]) and not Tape(tape).listing("calls").superseded


def test_an_exception_while_writing_publishes_nothing(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    write_rollouts(tape, "a", range(0, 4))
    listing = sorted(os.listdir(tape / "calls"))
    real = pq.write_table

    def failing(*args: object, **kw: object) -> None:
        raise OSError("disk full")

    pq.write_table = failing  # the compactor's write fails part-way
    try:
        with pytest.raises(OSError, match="disk full"):
            compact_tape(tape)
    finally:
        pq.write_table = real
    assert sorted(os.listdir(tape / "calls")) == listing, "no compacted shard, no temporary file, no deletion"


def test_a_second_compactor_is_refused_while_one_runs(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    write_rollouts(tape, "a", range(0, 4))
    inside, release = threading.Event(), threading.Event()

    def hold(table: str, done: int, total: int) -> None:
        inside.set()
        release.wait(60)

    first = threading.Thread(target=compact_tape, args=(tape,), kwargs={"progress": hold})
    first.start()
    try:
        wait_until(inside.is_set, what="the first compactor to start")
        with pytest.raises(CompactionBusyError, match="one compactor per tape"):
            compact_tape(tape)
    finally:
        release.set()
        first.join()
    assert compact_tape(tape).shards_in == 0, "the lock is released when the first compactor ends"


# -- a copy elsewhere -----------------------------------------------------------------------------------


def test_a_compacted_copy_equals_the_source_which_stays_untouched(tmp_path: Path) -> None:
    tape, copy = tmp_path / "t", tmp_path / "copy"
    write_rollouts(tape, "a", range(0, 9), calls=3)
    write_rollouts(tape, "b", range(0, 5))
    files = _files(tape)
    report = compact_tape(tape, to=str(copy))
    assert _files(tape) == files, "--to leaves the source untouched"
    assert report.to == str(copy) and report.tables["calls"].shards_out == 1
    for table in ("calls", "rollouts"):
        assert rows(copy, table).equals(rows(tape, table))
    assert (copy / "tape.json").read_bytes() == (tape / "tape.json").read_bytes()
    assert Tape(copy).writers() == Tape(tape).writers(), "writer manifests travel with the copy"
    assert summarize(Tape(copy))["writers"]["not_closed"] == []
    with pytest.raises(StorageError, match="already holds a tape"):
        compact_tape(tape, to=str(copy))


def test_gymtape_compact_command_in_place_and_to_a_copy(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    write_rollouts(tape, "a", range(0, 5))
    runner = CliRunner()
    r = runner.invoke(app, ["compact", str(tape), "--to", str(tmp_path / "copy"), "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["tables"]["rollouts"]["rows"] == 5
    r = runner.invoke(app, ["compact", str(tape)])
    assert r.exit_code == 0 and "calls: 5 shard(s) -> 1" in r.stderr and "5 superseded shard(s) deleted" in r.stderr
    r = runner.invoke(app, ["compact", str(tmp_path / "copy"), "--to", str(tmp_path / "copy")])
    assert r.exit_code == 2 and "already holds a tape" in r.stderr


# -- the follower beside a compactor ---------------------------------------------------------------


def _sequences(tape: Path, follower: TapeFollower | None, n: int) -> dict[str, list[int]]:
    follower = follower or TapeFollower(tape, max_staleness=10**6, groups_per_batch=n, group_size=1)
    batch = follower.next_batch(trainer_version=0, timeout=10).table
    return dict(zip(batch["rollout_id"].to_pylist(), batch["input_ids"].to_pylist()))


@pytest.mark.parametrize("compactions", [1, 2])
def test_the_follower_reads_a_compacted_shard_it_partly_read_without_doubling_calls(tmp_path: Path,
                                                                                 compactions: int) -> None:
    tape = tmp_path / "t"
    write_rollouts(tape, "a", range(0, 4))
    follower = TapeFollower(tape, max_staleness=10**6, groups_per_batch=8, group_size=1)
    assert follower.poll() == 8, "four flushes: a calls and a rollouts shard each"
    write_rollouts(tape, "a", range(4, 6))
    compact_tape(tape)
    write_rollouts(tape, "a", range(6, 8))
    if compactions == 2:  # the second compaction forgets the (deleted) names the follower read
        compact_tape(tape)
        (shard,) = Tape(tape).shards("calls")
        assert "a-000000.parquet" not in shard.replaces and len(shard.replaces) == 3
    assert follower.poll() == (2 if compactions == 2 else 6)
    assert _sequences(tape, follower, 8) == _sequences(tape, None, 8), \
        "sequences from partly-read compacted shards equal those of a follower reading the tape afresh"


def test_the_follower_skips_a_compacted_shard_whose_sources_it_read(tmp_path: Path) -> None:
    tape = tmp_path / "t"
    write_rollouts(tape, "a", range(0, 4))
    follower = TapeFollower(tape, max_staleness=10**6, groups_per_batch=4, group_size=1)
    assert follower.poll() == 8
    compact_tape(tape)
    assert follower.poll() == 0 and follower.stats().shards_read == 8
    assert len(_sequences(tape, follower, 4)) == 4
