"""Tape shards on any filesystem: local paths, pyarrow filesystems, fsspec filesystems, URLs.

The recorder's :class:`~recorder.Tape` reads local directories; a trainer often runs where the
tape lives in object storage. Listing and reading shards through ``pyarrow.fs`` makes S3, GCS,
HDFS and fsspec filesystems behave like a local directory, with the same publication rule:
only published shard names are read, hidden temporary files never are.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .._errors import CorruptShardError, TapeError
from ._layout import SHARD_VERSION_KEY, is_published_shard
from ._meta import check_version


def resolve_filesystem(path: str | os.PathLike[str], filesystem: Any = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the tape's path on it.

    ``filesystem`` may be a ``pyarrow.fs.FileSystem``, an fsspec filesystem (wrapped with
    ``FSSpecHandler``), or None: then ``path`` is a local path or a URL (``s3://...``).
    """
    path = os.fspath(path)
    if filesystem is None:
        if "://" in path:
            return pafs.FileSystem.from_uri(path)
        return pafs.LocalFileSystem(), os.path.abspath(path)
    if isinstance(filesystem, pafs.FileSystem):
        return filesystem, path
    try:
        from fsspec import AbstractFileSystem
    except ImportError:  # pragma: no cover - fsspec is optional
        AbstractFileSystem = ()  # type: ignore[assignment,misc]
    if AbstractFileSystem and isinstance(filesystem, AbstractFileSystem):
        return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path
    raise TypeError(
        f"filesystem must be a pyarrow.fs.FileSystem or an fsspec filesystem, got {type(filesystem).__name__}"
    )


def list_shards(fs: pafs.FileSystem, root: str, table: str) -> list[str]:
    """Published shard paths of ``table`` (``calls`` or ``rollouts``), in name order."""
    infos = fs.get_file_info(pafs.FileSelector(f"{root.rstrip('/')}/{table}", allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and is_published_shard(i.base_name))


def read_shard(fs: pafs.FileSystem, path: str, columns: list[str]) -> pa.Table:
    """Read ``columns`` of one shard, checking it is a gymtape shard of a readable version."""
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            version = (pf.schema_arrow.metadata or {}).get(SHARD_VERSION_KEY)
            if version is None:
                raise CorruptShardError(path, "it is not a gymtape shard (no gymtape.format_version metadata)")
            try:
                check_version(int(version), path)
            except ValueError as e:
                raise CorruptShardError(path, f"bad format version {version!r}") from e
            return pf.read(columns=columns)
    except TapeError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise CorruptShardError(path, str(e)) from e
