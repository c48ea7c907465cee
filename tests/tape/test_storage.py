"""One storage layer: local folders, URLs (pyarrow and fsspec filesystems), object storage rules,
and live capture kept on POSIX."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli import app
from recorder import (
    CorruptShardError,
    NotATapeError,
    RecordConfig,
    ServeConfig,
    StorageError,
    Tape,
    TapeStorage,
    TapeWriter,
    TokenizerIdentity,
    TokenizerMismatchError,
    compact_tape,
    ingest_gym_jsonl,
    summarize,
)
from tests.tape.factories import rows, write_rollouts

pytestmark = pytest.mark.usefixtures("s3_server")


def test_a_tape_written_to_s3_reads_back_through_every_way_of_naming_it(s3_server: str, s3_bucket: str,
                                                                        make_tape) -> None:
    local, src = make_tape(repeats=2, calls=3, context_tokens=200)
    url = f"s3://{s3_bucket}/ingested"
    report = ingest_gym_jsonl([src], url, strict=True)
    assert report.rollouts == 12
    assert ingest_gym_jsonl([src], url).skipped_existing == 12, "re-ingest into s3 skips what is there"
    import s3fs

    for tape in (Tape(url), Tape(f"{s3_bucket}/ingested", filesystem=s3fs.S3FileSystem()),
                 Tape(f"{s3_bucket}/ingested", filesystem=pafs.S3FileSystem(endpoint_override=s3_server))):
        for table in ("calls", "rollouts"):  # two ingests of one file: the same rows but their write time
            got, want = (rows(x, table).drop_columns(["created_at"] if table == "rollouts" else []) for x in (tape, local))
            assert got.equals(want), f"{tape!r}: {table} differ from the local tape"
    t = Tape(url)
    assert t.location == url and t.calls().collect().height == 36, "the lazy scan reads object storage too"
    got, want = t.prompts(), Tape(local).prompts()
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
    s = summarize(t)
    assert s["tape"] == url and s["rollouts"] == 12 and s["temp_files"] == []


def test_nothing_on_object_storage_is_published_when_an_exception_is_in_flight(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/aborted"
    with pytest.raises(RuntimeError), TapeWriter(url, writer_id="w", flush_seconds=None) as w:
        write_rollouts_into(w)
        raise RuntimeError("the run failed")
    t = Tape(url)
    assert t.read("calls").num_rows == 0 and t.writers() == {}, "an aborted run must not look complete"
    storage = TapeStorage(url)
    with pytest.raises(pa.ArrowException):  # the serialisation fails: nothing is PUT
        storage.write_parquet("calls/w-000000.parquet", pa.table({"x": [1]}), compression="no-such-codec")
    assert not storage.exists("calls/w-000000.parquet")
    storage.write_parquet("calls/w-000000.parquet", pa.table({"x": [1]}))
    with pytest.raises(FileExistsError):
        storage.write_parquet("calls/w-000000.parquet", pa.table({"x": [2]}))  # write-once names
    assert pq.read_table(storage.fs.open_input_file(storage.path("calls/w-000000.parquet")))["x"].to_pylist() == [1]


def write_rollouts_into(w: TapeWriter) -> None:
    from recorder import CallRecord, RolloutRecord

    w.add_call(CallRecord(rollout_id="r", call_index=0, prompt_ids=[1, 2], generation_ids=[3],
                          generation_logprobs=[-0.5]))
    w.add_rollout(RolloutRecord(rollout_id="r", reward=1.0))


def test_tape_json_on_object_storage_refuses_a_second_tokenizer(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/tok"
    a, b = TokenizerIdentity(name="a", sha256="1" * 64), TokenizerIdentity(name="b", sha256="2" * 64)
    TapeWriter(url, tokenizer=a).close()
    with pytest.raises(TokenizerMismatchError, match="recorded with tokenizer a"):
        TapeWriter(url, tokenizer=b)
    assert Tape(url).meta.tokenizer == a


def test_shard_checks_name_the_object_on_s3(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/bad"
    TapeWriter(url).close()
    storage = TapeStorage(url)
    storage.write_parquet("calls/foreign-000000.parquet", pa.table({"x": [1]}))
    with pytest.raises(CorruptShardError, match=f"{url}/calls/foreign-000000.parquet.*not a gymtape shard"):
        Tape(url).read("calls")
    with pytest.raises(NotATapeError, match="has no tape.json"):
        Tape(f"s3://{s3_bucket}/nothing-here")


def test_fsspec_filesystems_that_pyarrow_lacks_are_reached_through_fsspec(tmp_path: Path) -> None:
    url = f"memory://gymtape-{uuid.uuid4().hex[:8]}/tape"  # pyarrow has no memory:// filesystem; fsspec does
    local = tmp_path / "local"
    write_rollouts(local, "w", range(4))
    compact_tape(local, to=url)
    assert TapeStorage(url).object_store
    for table in ("calls", "rollouts"):
        assert rows(url, table).equals(rows(local, table))
    with pytest.raises(StorageError, match="neither pyarrow .* nor fsspec"):
        TapeStorage("nosuchscheme://x/y")


def test_live_capture_refuses_urls_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="live capture writes to a POSIX filesystem.*gymtape compact"):
        ServeConfig(tape="s3://bucket/run1")  # type: ignore[arg-type]
    with pytest.raises(StorageError, match="live capture"):
        RecordConfig(tape=Path("s3://bucket/run1"), envs=[])  # pathlib collapsed it to s3:/bucket/run1
    assert ServeConfig(tape=tmp_path / "t").tape == tmp_path / "t", "a local folder is fine"
    r = CliRunner().invoke(app, ["record", "--tape", "s3://bucket/run1", "--env", "addition",
                                 "--model-url", "http://127.0.0.1:9/v1"])
    assert r.exit_code == 2 and "live capture writes to a POSIX filesystem" in r.stderr
    with pytest.raises(StorageError, match="lost"):
        Tape("s3:/bucket/run1")
