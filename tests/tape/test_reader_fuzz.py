"""Property: whatever bytes a tape's files hold, opening and reading it gives either the rows that
were written or a ``GymtapeError`` naming the file, never a foreign exception (hypothesis).

Three attack surfaces: ``tape.json`` (any bytes, any JSON, metadata-shaped objects with hostile
values), a real shard with random multi-byte damage (overwrites, truncation, garbage appended),
and files a reader lists as shards that no writer wrote."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recorder import CorruptShardError, GymtapeError, Tape, summarize
from tests.tape.factories import write_rollouts

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])

leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                 st.floats(allow_nan=True), st.text(max_size=8))
value = st.recursive(leaf, lambda kids: st.lists(kids, max_size=3)
                     | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=8)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tape of gymtape's own writer: a calls and a rollouts shard (three rollouts, two calls each)."""
    tape = tmp_path_factory.mktemp("fuzz") / "tape"
    write_rollouts(tape, "w", range(3), flush_every=3)
    return tape


@pytest.fixture
def copy(written: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def _fresh(written: Path, tmp: Path) -> Path:
    tape = tmp / "tape"
    if tape.exists():
        shutil.rmtree(tape)
    shutil.copytree(written, tape)
    return tape


@st.composite
def meta_object(draw: st.DrawFn) -> dict[str, object]:
    good = {"format": "gymtape", "format_version": 2, "created_at": "2026-01-01T00:00:00+00:00", "created_by": "x",
            "tokenizer": None, "layout": {"calls": "calls/{writer}-{seq:06d}.parquet"}}
    keys = draw(st.lists(st.sampled_from(sorted(good)), unique=True))
    out: dict[str, object] = {k: good[k] for k in good}
    for k in keys:
        out[k] = draw(st.one_of(value, st.just({"name": "t", "sha256": 5}), st.just({"name": "t"})))
    return out


@FUZZ
@given(content=st.one_of(st.binary(max_size=64), value.map(lambda v: json.dumps(v).encode()),
                         meta_object().map(lambda v: json.dumps(v).encode())))
def test_any_tape_json_opens_or_is_a_named_error(written: Path, copy: Path, content: bytes) -> None:
    tape = _fresh(written, copy)
    (tape / "tape.json").write_bytes(content)
    try:
        t = Tape(tape)
    except GymtapeError as e:
        assert "tape.json" in str(e) or str(tape) in str(e), e
        return
    assert t.read("calls").num_rows == 6 and summarize(t, jsonl_size=None)["rollouts"] == 3


#: An edit: at a relative position, XOR one byte with a mask (a bit flip, a byte flip) or
#: overwrite bytes.
edit = st.tuples(st.floats(0, 1, exclude_max=True),
                 st.one_of(st.integers(1, 255), st.binary(min_size=1, max_size=6)))


@st.composite
def damage(draw: st.DrawFn) -> tuple[str, list[tuple[float, int | bytes]], float | None, bytes]:
    table = draw(st.sampled_from(["calls", "rollouts"]))
    edits = draw(st.lists(edit, min_size=1, max_size=3))
    truncate = draw(st.one_of(st.none(), st.none(), st.floats(0, 1, exclude_max=True)))
    append = draw(st.one_of(st.just(b""), st.just(b""), st.binary(max_size=8)))
    return table, edits, truncate, append


@FUZZ
@given(damage())
def test_a_damaged_shard_is_named_or_reads_the_same_rows(written: Path, copy: Path,
                                                         case: tuple[str, list[tuple[float, int | bytes]], float | None,
                                                                     bytes]) -> None:
    table, edits, truncate, append = case
    tape = _fresh(written, copy)
    want = Tape(tape).read(table)
    want_summary = summarize(Tape(tape), jsonl_size=None)
    shard = next((tape / table).glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    for where, new in edits:
        at = int(where * len(data))
        if isinstance(new, int):
            data[at] ^= new
        else:
            data[at: at + len(new)] = new[: len(data) - at]
    if truncate is not None:
        del data[int(truncate * len(data)):]
    data += append
    shard.write_bytes(bytes(data))
    for read in (lambda: Tape(tape).read(table), lambda: summarize(Tape(tape), jsonl_size=None)):
        try:
            got = read()
        except CorruptShardError as e:
            assert e.path == str(shard) and str(shard) in str(e)
            continue
        same = got == want_summary if isinstance(got, dict) else got.equals(want)
        assert same, "a damaged shard read as other rows without an error"


@FUZZ
@given(name=st.text(alphabet="abcxyz-_.0123456789", min_size=1, max_size=12), content=st.binary(max_size=64),
       table=st.sampled_from(["calls", "rollouts"]))
def test_a_file_no_writer_wrote_is_named_or_ignored(written: Path, copy: Path, name: str, content: bytes,
                                                    table: str) -> None:
    tape = _fresh(written, copy)
    stray = tape / table / name
    if stray.exists():
        return
    stray.write_bytes(content)
    try:
        got = Tape(tape).read(table)
    except CorruptShardError as e:
        assert e.path == str(stray), e
        return
    assert got.equals(Tape(written).read(table)), f"{name} changed the rows read"
