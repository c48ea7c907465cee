"""``tape.json``: the tape's identity, read and written through one typed dataclass."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from .._errors import CorruptShardError, NotATapeError, TapeError, TapeVersionError, TokenizerMismatchError
from ._storage import TapeStorage
from ._layout import FORMAT_NAME, FORMAT_VERSION, META_FILE, READABLE_VERSIONS, SHARD_VERSION_KEY, layout_dict

#: Files whose bytes define a tokenizer's behaviour, chat template included.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


@dataclass(frozen=True, kw_only=True)
class TokenizerIdentity:
    """Which tokenizer produced a tape's token IDs, so replay can refuse a different one."""

    #: Human-readable name (a hub id or a directory name).
    name: str
    #: sha256 over the tokenizer files and chat template, in a fixed order.
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = META_FILE) -> TokenizerIdentity:
        if not isinstance(d, dict) or not {"name", "sha256"} <= d.keys():
            raise NotATapeError(f"{source}: tokenizer is {d!r}, expected an object with name and sha256")
        return cls(name=str(d["name"]), sha256=str(d["sha256"]))


def tokenizer_identity(path: str | Path, name: str | None = None) -> TokenizerIdentity:
    """Hash a local tokenizer directory (or single ``tokenizer.json``) into an identity."""
    p = Path(path)
    files = [p] if p.is_file() else [p / f for f in _TOKENIZER_FILES if (p / f).is_file()]
    if not files:
        raise TapeError(
            f"{p} holds no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)}); "
            "pass the directory a tokenizer was saved to with save_pretrained()"
        )
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return TokenizerIdentity(name=name or p.name, sha256=h.hexdigest())


@dataclass(frozen=True, kw_only=True)
class TapeMeta:
    """Contents of ``tape.json``.

    Written once, when the first writer opens the tape; later writers check that they agree
    with it (same format, same tokenizer) instead of rewriting it.
    """

    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    #: ISO-8601 UTC time the tape was created.
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    #: None when the writer did not know its tokenizer (e.g. an ingested file).
    tokenizer: TokenizerIdentity | None = None
    #: Where shards live, as path templates relative to the tape directory.
    layout: dict[str, str] = field(default_factory=layout_dict)
    #: Free-form notes from whoever created the tape (e.g. the command line).
    created_by: str = ""

    def validate(self, source: str = META_FILE) -> None:
        if self.format != FORMAT_NAME:
            raise NotATapeError(f"{source}: format is {self.format!r}, expected {FORMAT_NAME!r}")
        check_version(self.format_version, source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "tokenizer": self.tokenizer.to_dict() if self.tokenizer else None,
            "layout": dict(self.layout),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = META_FILE) -> TapeMeta:
        if not isinstance(d, dict) or "format_version" not in d:
            raise NotATapeError(f"{source} is not a gymtape metadata file (no format_version)")
        version = d["format_version"]
        if not isinstance(version, int) or isinstance(version, bool):
            raise NotATapeError(f"{source}: format_version is {version!r}, expected an integer")
        check_version(version, source)
        tok = d.get("tokenizer")
        layout = d.get("layout") or layout_dict()
        if not isinstance(layout, dict) or not all(isinstance(v, str) for v in layout.values()):
            raise NotATapeError(f"{source}: layout is {layout!r}, expected an object of path templates")
        meta = cls(
            format=d.get("format", ""),
            format_version=version,
            created_at=str(d.get("created_at", "")),
            created_by=str(d.get("created_by", "")),
            tokenizer=TokenizerIdentity.from_dict(tok, source) if tok else None,
            layout={str(k): v for k, v in layout.items()},
        )
        meta.validate(source)
        return meta


def check_version(version: int, source: str) -> None:
    """Refuse newer tapes and explain older ones; both name the two versions."""
    if version in READABLE_VERSIONS:
        return
    if version > FORMAT_VERSION:
        raise TapeVersionError(
            f"{source} is tape format v{version}, but this gymtape reads format v{FORMAT_VERSION}. "
            "It was written by a newer gymtape: upgrade with `pip install -U gymtape`."
        )
    if version < FORMAT_VERSION:
        raise TapeVersionError(
            f"{source} is tape format v{version}, older than the v{FORMAT_VERSION} this gymtape "
            f"reads, and v{version} tapes cannot be converted in place. Read it with the gymtape "
            "release that wrote it, or re-create the tape from its source "
            "(`gymtape ingest` for Gym JSONL)."
        )


def check_file_schema(got: pa.Schema, expected: pa.Schema, where: str, kind: str) -> None:
    """The check every shard and log segment passes: a gymtape file of a version this gymtape
    reads, holding every column of its table at its type (``CorruptShardError`` naming it)."""
    version = (got.metadata or {}).get(SHARD_VERSION_KEY)
    if version is None:
        raise CorruptShardError(where, f"it is not a gymtape {kind} (no gymtape.format_version metadata)")
    try:
        check_version(int(version), where)
    except ValueError as e:
        raise CorruptShardError(where, f"bad format version {version!r}") from e
    for f in expected:
        idx = got.get_field_index(f.name)
        if idx < 0 or not got.field(idx).type.equals(f.type):
            found = "missing" if idx < 0 else str(got.field(idx).type)
            raise CorruptShardError(where, f"column {f.name} is {found}, expected {f.type}")


def read_meta(storage: TapeStorage) -> TapeMeta:
    where = storage.describe(META_FILE)
    try:
        raw = storage.read_bytes(META_FILE)
    except FileNotFoundError:
        raise NotATapeError(
            f"{storage.location} is not a tape: it has no {META_FILE}. Create one with `gymtape ingest` "
            "or a TapeWriter."
        ) from None
    except IsADirectoryError:
        raise NotATapeError(f"{where} is a directory, not the tape's metadata file; move it away, or give the "
                            "folder of a tape") from None
    except NotADirectoryError:
        raise NotATapeError(f"{storage.location} is not a tape: it is a file, not a folder") from None
    except OSError as e:
        raise TapeError(f"{where} cannot be read: {e.strerror or e}; check the path and its permissions") from e
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise NotATapeError(f"{where} is not valid JSON: {e}") from e
    return TapeMeta.from_dict(data, where)


def open_or_create_meta(storage: TapeStorage, wanted: TapeMeta) -> TapeMeta:
    """Create ``tape.json`` if absent, else check it agrees.

    Race-free across writers on POSIX (no-clobber link). On object storage the creation is an
    exists-check then a put, so the file is read back: a writer that lost a race within that
    window still checks its tokenizer against the winner's."""
    storage.makedirs()
    if not storage.exists(META_FILE):
        data = orjson.dumps(wanted.to_dict(), option=orjson.OPT_INDENT_2)
        if storage.write_bytes(META_FILE, data, overwrite=False) and not storage.object_store:
            return wanted
    existing = read_meta(storage)
    if wanted.tokenizer and existing.tokenizer and wanted.tokenizer != existing.tokenizer:
        raise TokenizerMismatchError(
            f"{storage.location} was recorded with tokenizer {existing.tokenizer.name} "
            f"(sha256 {existing.tokenizer.sha256[:12]}), this writer uses {wanted.tokenizer.name} "
            f"(sha256 {wanted.tokenizer.sha256[:12]}). Write to a new tape directory."
        )
    return existing
