"""Flip bits of a real calls shard, byte after byte: every read (``Tape.read``, ``summarize`` as
`gymtape inspect` runs it, ``check_tape``) gives either a ``CorruptShardError`` naming the shard or
exactly the rows of the undamaged shard. Never a foreign exception, never silently other rows.

What makes that hold: the footer is checked in one place (``recorder.tape._shards``) with every
decoding error mapped to ``CorruptShardError``; each page carries a CRC-32 that readers verify
(``write_page_checksum`` / ``page_checksum_verification``); and the rows read must match the
footer's row count and the table's schema. Without the checksums about one flip in seven of this
shard changed rows silently (measured while building this test)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from recorder import CorruptShardError, Tape, summarize
from replay import check_tape

#: Every how many flips the slower readers run too: summarize, and check (which decodes and
#: re-encodes every call with the tokenizer).
SUMMARIZE_EVERY = 40
CHECK_EVERY = 120


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _regions(shard: Path) -> tuple[range, list[range]]:
    """The footer (Thrift metadata, its length and the magic) and each column chunk's page header
    (its first 32 bytes: sizes, encodings, the CRC itself)."""
    size = shard.stat().st_size
    md = pq.ParquetFile(shard).metadata
    footer = range(size - 8 - md.serialized_size, size)
    headers = []
    for rg in range(md.num_row_groups):
        for c in range(md.num_columns):
            col = md.row_group(rg).column(c)
            for start in (col.dictionary_page_offset, col.data_page_offset):
                if start is not None:
                    headers.append(range(start, min(start + 32, size)))
    return footer, headers


def _flips(size: int, footer: range, headers: list[range]) -> list[tuple[int, int]]:
    """(position, xor mask), a dense sample that runs in seconds: where structure is parsed, a
    single-bit flip at every page-header byte and every other footer byte (the bit cycling, so each
    bit of each field kind is hit) plus a whole-byte flip at every fourth header and every sixth
    footer byte; in the page data, a single-bit flip at every fourth byte."""
    header = set().union(*headers)
    out = []
    for i in range(size):
        if i in footer:
            if i % 2 == 0:
                out.append((i, 1 << (i // 2 % 8)))
            if i % 6 == 1:
                out.append((i, 0xFF))
        elif i in header:
            out.append((i, 1 << (i % 8)))
            if i % 4 == 1:
                out.append((i, 0xFF))
        elif i % 4 == 0:
            out.append((i, 1 << (i // 4 % 8)))
    return out


def test_every_flip_of_a_calls_shard_is_a_named_error_or_the_same_rows(
        make_tape: Callable[..., tuple[Path, Path]], tok: Any) -> None:
    tape, _ = make_tape(repeats=1, calls=2, context_tokens=64, vocab_size=49152)
    shard = next((tape / "calls").glob("*.parquet"))
    original = shard.read_bytes()
    assert b"PAR1" == original[:4] and pq.ParquetFile(shard).metadata.row_group(0).column(0).statistics is not None
    want_rows = Tape(tape).read("calls")
    want_summary = summarize(Tape(tape), jsonl_size=None)
    want_check = {k: v for k, v in check_tape(Tape(tape), tok).to_dict().items() if k != "elapsed_s"}
    footer, headers = _regions(shard)
    flips = _flips(len(original), footer, headers)

    outcomes: collections.Counter[str] = collections.Counter()
    bad: list[str] = []  # what must never happen: foreign exceptions, other rows, a wrong shard named
    try:
        for n, (pos, mask) in enumerate(flips):
            data = bytearray(original)
            data[pos] ^= mask
            shard.write_bytes(bytes(data))
            readers: list[tuple[str, Callable[[], Any], Any]] = [("read", lambda: Tape(tape).read("calls"), want_rows)]
            if n % SUMMARIZE_EVERY == 0:
                readers += [("summarize", lambda: summarize(Tape(tape), jsonl_size=None), want_summary)]
            for name, read, want in readers:
                try:
                    got = read()
                except CorruptShardError as e:
                    outcomes[f"{name}: named error"] += 1
                    if e.path != str(shard) or str(shard) not in str(e):
                        bad.append(f"byte {pos} ^ {mask:#x}, {name}: the error names {e.path}, not the shard: {e}")
                    continue
                except Exception as e:  # noqa: BLE001 - the property under test: nothing else escapes
                    bad.append(f"byte {pos} ^ {mask:#x}, {name}: {type(e).__name__}: {e}")
                    continue
                same = got.equals(want) if name == "read" else got == want
                outcomes[f"{name}: {'same rows' if same else 'CHANGED'}"] += 1
                if not same:
                    bad.append(f"byte {pos} ^ {mask:#x}, {name}: different rows read without an error")
            if n % CHECK_EVERY == 0:
                try:
                    report = {k: v for k, v in check_tape(Tape(tape), tok).to_dict().items() if k != "elapsed_s"}
                except Exception as e:  # noqa: BLE001
                    bad.append(f"byte {pos} ^ {mask:#x}, check: {type(e).__name__}: {e}")
                    continue
                if report["unreadable_shards"]:
                    outcomes["check: unreadable_shard problem"] += 1
                    if report["unreadable_shards"] != [str(shard)] or report["ok"]:
                        bad.append(f"byte {pos} ^ {mask:#x}, check: {report['unreadable_shards']}, ok={report['ok']}")
                elif report == want_check:
                    outcomes["check: same report"] += 1
                else:
                    bad.append(f"byte {pos} ^ {mask:#x}, check: a different report without naming the shard")
    finally:
        shard.write_bytes(original)
    print(f"{len(flips)} flips of a {len(original)}-byte shard (footer {len(footer)} bytes): {dict(outcomes)}")
    assert not bad, f"{len(bad)} flips misbehaved, e.g. {bad[:5]}"
    assert outcomes["read: named error"] > len(flips) // 2 and outcomes["read: same rows"] > 0, outcomes
    assert outcomes["check: unreadable_shard problem"] > 0 and outcomes["summarize: named error"] > 0
