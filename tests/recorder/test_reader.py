"""Tape reader: version checks, corrupt shards named, and plain Parquet engines read tapes."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from recorder import (
    FORMAT_VERSION,
    CorruptShardError,
    NotATapeError,
    Tape,
    TapeVersionError,
    TapeWriter,
    TokenizerIdentity,
    TokenizerMismatchError,
)


def _set_version(tape: Path, version: int) -> None:
    meta = json.loads((tape / "tape.json").read_text())
    meta["format_version"] = version
    (tape / "tape.json").write_text(json.dumps(meta))


def test_future_format_version_is_refused_naming_both_versions(make_tape) -> None:
    tape, _ = make_tape(repeats=1, calls=2, context_tokens=100)
    _set_version(tape, FORMAT_VERSION + 1)
    with pytest.raises(TapeVersionError, match=rf"format v{FORMAT_VERSION + 1}.*reads format v{FORMAT_VERSION}.*upgrade"):
        Tape(tape)
    with pytest.raises(TapeVersionError):
        TapeWriter(tape)  # a writer must not append v1 shards to a v2 tape either


def test_older_format_version_is_explained(make_tape) -> None:
    tape, _ = make_tape(repeats=1, calls=2, context_tokens=100)
    _set_version(tape, 0)
    with pytest.raises(TapeVersionError, match=r"format v0, older than the v2.*gymtape ingest"):
        Tape(tape)


def test_shard_from_a_newer_writer_is_refused(make_tape) -> None:
    tape, _ = make_tape(repeats=1, calls=2, context_tokens=100)
    shard = next((tape / "calls").glob("*.parquet"))
    table = pq.read_table(shard)
    pq.write_table(table.replace_schema_metadata({b"gymtape.format_version": str(FORMAT_VERSION + 1).encode()}), shard)
    with pytest.raises(TapeVersionError, match=str(shard)):
        Tape(tape).calls()


def test_v1_tape_is_read_as_it_is(make_tape) -> None:
    """The upgrade path: v2 added the write-ahead log only, so a v1 tape reads unchanged."""
    tape, _ = make_tape(repeats=1, calls=2, context_tokens=100)
    before = Tape(tape).read("calls")
    _set_version(tape, 1)
    assert Tape(tape).read("calls").equals(before)


def test_directory_without_tape_json_is_not_a_tape(tmp_path: Path) -> None:
    with pytest.raises(NotATapeError, match="no tape.json"):
        Tape(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage-footer", "flip-data"])
def test_corrupt_shard_error_names_the_file(make_tape, damage: str) -> None:
    tape, _ = make_tape(repeats=4, calls=4, context_tokens=2000)
    shard = next((tape / "calls").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage-footer":
        data[-12:-4] = b"\xff" * 8
    else:  # flip bytes inside the column data, leaving the footer intact
        for i in range(200, len(data) // 2, 97):
            data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError) as e:
        Tape(tape).read("calls")
    assert str(shard) in str(e.value) and e.value.path == str(shard)


def test_shard_with_wrong_schema_is_named(make_tape) -> None:
    tape, _ = make_tape(repeats=1, calls=2, context_tokens=100)
    shard = next((tape / "calls").glob("*.parquet"))
    t = pq.read_table(shard)
    t = t.set_column(t.schema.get_field_index("generation_ids"), "generation_ids",
                     t.column("generation_ids").cast(pa.list_(pa.int64())))
    pq.write_table(t, shard)
    with pytest.raises(CorruptShardError, match=r"generation_ids is list<\w+: int64>"):
        Tape(tape).shards("calls")


def test_tokenizer_mismatch_is_refused(tmp_path: Path) -> None:
    a = TokenizerIdentity(name="a", sha256="1" * 64)
    TapeWriter(tmp_path / "t", tokenizer=a).close()
    with pytest.raises(TokenizerMismatchError, match="new tape directory"):
        TapeWriter(tmp_path / "t", tokenizer=TokenizerIdentity(name="b", sha256="2" * 64))
    TapeWriter(tmp_path / "t", tokenizer=a).close()
    assert Tape(tmp_path / "t").meta.tokenizer == a


def _leave_temp_file(tape: Path) -> None:
    (tape / "calls" / ".crashed-000009.parquet.tmp").write_bytes(b"PAR1 half a shard")


def test_duckdb_reads_the_tape_without_gymtape(make_tape) -> None:
    tape, _ = make_tape(repeats=2, calls=3, context_tokens=300)
    _leave_temp_file(tape)
    con = duckdb.connect()
    n, tokens = con.execute(
        f"select count(*), sum(len(generation_ids)) from read_parquet('{tape}/calls/*.parquet')"
    ).fetchone()
    expected = Tape(tape).calls().select("generation_ids").collect()["generation_ids"].list.len().sum()
    assert n == 36 and tokens == expected
    joined = con.execute(
        f"select count(distinct r.rollout_id) from read_parquet('{tape}/rollouts/*.parquet') r "
        f"join read_parquet('{tape}/calls/*.parquet') c using (rollout_id)"
    ).fetchone()[0]
    assert joined == 12


def test_pyarrow_dataset_reads_the_tape_directory_directly(make_tape) -> None:
    tape, _ = make_tape(repeats=2, calls=3, context_tokens=300)
    _leave_temp_file(tape)
    ds = pads.dataset(tape / "calls", format="parquet")  # skips dot-files by default
    t = ds.to_table(columns=["generation_ids", "generation_logprobs"])
    assert t.num_rows == 36
    assert t.schema.field("generation_ids").type == pa.list_(pa.int32())
    assert t.schema.field("generation_logprobs").type == pa.list_(pa.float32())


def test_temp_files_are_ignored_and_listed(make_tape) -> None:
    tape, _ = make_tape(repeats=1, calls=2, context_tokens=100)
    _leave_temp_file(tape)
    t = Tape(tape)
    assert t.calls().collect().height == 12
    assert t.temp_files() == ["calls/.crashed-000009.parquet.tmp"]


def test_empty_tape_reads_as_empty_tables(tmp_path: Path) -> None:
    TapeWriter(tmp_path / "t").close()
    t = Tape(tmp_path / "t")
    assert t.calls().collect().height == 0 and t.rollouts().collect().height == 0
    assert t.read("calls", ["rollout_id"]).num_rows == 0 and t.prompts() == {}
