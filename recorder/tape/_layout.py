"""Every on-disk name of a tape, in one place.

The templates are also written into ``tape.json`` (``layout``), so tools that read a tape
without gymtape never have to hard-code them.
"""

from __future__ import annotations

import os
import uuid

FORMAT_NAME = "gymtape"
#: v2 added the write-ahead log (``wal/``): v1 readers would not see its rows. v1 tapes are
#: read as they are; the first durable writer on a v1 tape marks it v2 (nothing else changes).
FORMAT_VERSION = 2
#: Every tape format version this gymtape reads.
READABLE_VERSIONS = (1, 2)

META_FILE = "tape.json"
CALLS_DIR = "calls"
ROLLOUTS_DIR = "rollouts"
WRITERS_DIR = "writers"
#: Resolved configuration of each command that wrote to the tape (``<writer>.json``).
RUNS_DIR = "runs"
#: Write-ahead log segments of durable writers: ``wal/<table>/<writer>-<seq>.arrows``.
WAL_DIR = "wal"
WAL_SUFFIX = ".arrows"
TABLES = (CALLS_DIR, ROLLOUTS_DIR)

SHARD_SUFFIX = ".parquet"
#: ``{writer}`` is the writer id, ``{seq}`` its shard counter; both make names unique
#: across writers that share a tape without talking to each other.
SHARD_TEMPLATE = "{writer}-{seq:06d}" + SHARD_SUFFIX
#: Temporary files start with a dot: pyarrow.dataset, DuckDB globs and our reader skip them.
TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"
WRITER_MANIFEST_TEMPLATE = "{writer}.json"

#: Key of the format version in every shard's Parquet key-value metadata.
SHARD_VERSION_KEY = b"gymtape.format_version"
SHARD_TABLE_KEY = b"gymtape.table"
#: Compacted shards only: JSON list of the shard names (same folder) whose rows this shard holds,
#: including still-present shards that those replaced. Readers drop every listed shard named here.
SHARD_REPLACES_KEY = b"gymtape.replaces"
#: Compacted shards only: JSON list of the writer ids whose rows the shard holds.
SHARD_WRITERS_KEY = b"gymtape.writers"
#: Compacted shards only: ISO-8601 UTC time of publication (the retention period counts from it).
SHARD_COMPACTED_AT_KEY = b"gymtape.compacted_at"

#: Held by the one compactor working on a tape (``flock`` on POSIX, an object elsewhere).
COMPACT_LOCK = "_compact.lock"
#: Writer-id prefix of the shards a compactor publishes.
COMPACTOR_PREFIX = "compact"


def shard_name(writer_id: str, seq: int) -> str:
    return SHARD_TEMPLATE.format(writer=writer_id, seq=seq)


def temp_name(final_name: str) -> str:
    # Unique per process and call: concurrent writers racing to create the same file (tape.json)
    # must never share, and so unlink, each other's temporary file.
    return f"{TEMP_PREFIX}{final_name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"


def is_published_shard(name: str) -> bool:
    return name.endswith(SHARD_SUFFIX) and not name.startswith((TEMP_PREFIX, "_"))


def is_temp_file(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def layout_dict() -> dict[str, str]:
    return {
        "calls": f"{CALLS_DIR}/{SHARD_TEMPLATE}",
        "rollouts": f"{ROLLOUTS_DIR}/{SHARD_TEMPLATE}",
        "writers": f"{WRITERS_DIR}/{WRITER_MANIFEST_TEMPLATE}",
        "runs": f"{RUNS_DIR}/{WRITER_MANIFEST_TEMPLATE}",
        "wal": f"{WAL_DIR}/<table>/<writer>-<seq>{WAL_SUFFIX} (Arrow IPC stream; becomes <table>/<writer>-<seq>{SHARD_SUFFIX})",
        "keys": "keys/<writer>.keys (call-key index: which rollout and call a token key is; any replica)",
        "claims": "claims/<rollout>.<call index> (who continued or joined a call; O_EXCL files)",
        "capture": "capture/<rollout>.events (NeMo Gym token-capture intents, incomplete marks, retirement)",
        "temporary": f"<dir>/{TEMP_PREFIX}<name>.<pid>-<random>{TEMP_SUFFIX} (never read)",
        "compacted": f"<table>/{COMPACTOR_PREFIX}-<utc time>-<random>-<seq>{SHARD_SUFFIX} (replaces the shards "
                     f"its {SHARD_REPLACES_KEY.decode()} metadata names)",
    }
