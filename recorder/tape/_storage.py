"""Where a tape's bytes live: the one storage layer every tape reader and writer goes through.

A tape is a folder on a local disk, on a shared POSIX mount, or on object storage
(``s3://``, ``gs://``, ``az://``, ``file://``, ...). :class:`TapeStorage` hides which: listing,
reading, publishing and deleting go through a ``pyarrow.fs.FileSystem``. A URL resolves with
``pyarrow.fs.FileSystem.from_uri``, else with fsspec (``fsspec.core.url_to_fs`` wrapped in
``pyarrow.fs.FSSpecHandler``); a ``pyarrow`` or fsspec filesystem object may also be given.
Local tapes keep their fast paths (``os.scandir``, memory-mapped footers, ``pl.scan_parquet``).

Publication is atomic for readers on both kinds of storage, by different means:

* POSIX: the file is written under a hidden temporary name, fsynced, then linked (no-clobber)
  or renamed to its final name and the directory fsynced. A crash leaves at most a hidden
  temporary file, which readers skip.
* Object storage has no rename. A shard is serialised completely in memory, then PUT once to
  its final name; names are never reused and nothing is ever overwritten. An object becomes
  visible only when its upload completes, so an exception (or a crash) before that publishes
  nothing. No-clobber creation (``tape.json``) is an exists-check followed by a put: best
  effort, since two creators racing within one round trip may both write it. The writer reads
  ``tape.json`` back after creating it, so the loser of such a race still checks its tokenizer
  against the winner's.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .._errors import StorageError
from ._layout import temp_name

# -- local files: temporary name, fsync, rename --------------------------------------------------


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; nothing more to do there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_for(final: Path) -> Path:
    return final.with_name(temp_name(final.name))


def publish(tmp: Path, final: Path, *, overwrite: bool) -> bool:
    """Make ``tmp`` visible as ``final`` in one atomic step.

    With ``overwrite=False`` an existing ``final`` is kept and ``False`` is returned (the
    temporary file is removed); this is how concurrent writers agree on one ``tape.json``.
    """
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if overwrite:
        os.replace(tmp, final)
    else:
        try:
            os.link(tmp, final)
        except FileExistsError:
            os.unlink(tmp)
            return False
        os.unlink(tmp)
    fsync_dir(final.parent)
    return True


def write_bytes_atomic(final: Path, data: bytes, *, overwrite: bool = True) -> bool:
    tmp = temp_path_for(final)
    tmp.write_bytes(data)
    return publish(tmp, final, overwrite=overwrite)


def build_dir_atomic(target: Path, build: Callable[[Path], None], marker: str) -> Path:
    """Build a directory under a temporary name, then rename it into place.

    Used for caches several processes may fill at once: the first rename wins and the others
    (which built the same content) drop theirs. ``marker`` is a file whose presence means done.
    """
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir(parents=True)
        build(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / marker).exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def atomic_file(final: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Write a local file that appears whole or not at all: nothing is published if the block raises."""
    final = Path(final)
    tmp = temp_path_for(final)
    try:
        with open(tmp, "wb") as f:
            yield f
        publish(tmp, final, overwrite=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- any filesystem --------------------------------------------------------------------------------

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")
#: ``s3://b/x`` after pathlib or typer's Path has collapsed the double slash.
_COLLAPSED_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/(?!/)")


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names object storage or another filesystem by URL (``s3://...``)."""
    return bool(_URL.match(os.fspath(location)))


def require_posix(location: str | os.PathLike[str], command: str) -> Path:
    """The local directory of a live-capture tape, or a clear error for a URL.

    Live capture (`gymtape serve --tape`, `gymtape record --tape`) appends a shard every few
    seconds and relies on rename and fsync; object storage has neither, so a tape recorded
    there would pay a PUT per flush and lose the crash-safety guarantees.
    """
    text = os.fspath(location)
    if is_url(text) or _COLLAPSED_URL.match(text):
        raise StorageError(
            f"{command}: {text} is a URL, but live capture writes to a POSIX filesystem (a local disk "
            "or a shared mount). Record to a local directory, then publish it with "
            f"`gymtape compact DIR --to {text if is_url(text) else 'URL'}`."
        )
    return Path(text)


@dataclass(frozen=True)
class Entry:
    """One file of a listing: its name in the folder, its path on the filesystem, size, mtime."""

    name: str
    path: str
    size: int
    mtime_ns: int | None


class TapeStorage:
    """A tape's root folder on one filesystem.

    Args:
        location: a local path, or a URL (``s3://bucket/run1``, ``gs://...``, ``file:///...``).
        filesystem: a ``pyarrow.fs.FileSystem`` or an fsspec filesystem holding ``location``
            (then ``location`` is a path on it, e.g. ``bucket/run1``).

    Paths handed out (:attr:`root`, :meth:`path`, :class:`Entry.path`) are paths on
    :attr:`fs`; :meth:`url` turns one into what a user would type.
    """

    def __init__(self, location: str | os.PathLike[str], filesystem: Any = None) -> None:
        text = os.fspath(location)
        self._scheme = ""
        if filesystem is not None:
            self.fs = _as_pyarrow(filesystem)
            root = text
        elif is_url(text):
            self.fs, root = _from_url(text)
            self._scheme = _URL.match(text).group(1)  # type: ignore[union-attr]
        else:
            if _COLLAPSED_URL.match(text) and not os.path.exists(text):
                raise StorageError(
                    f"{text} looks like a URL whose '//' was lost (pathlib and some shells turn s3://b/x into "
                    "s3:/b/x); pass the URL as a string with both slashes"
                )
            self.fs, root = pafs.LocalFileSystem(), os.path.abspath(text)
        self.location = text if not is_url(text) else text.rstrip("/")
        self.root = root.rstrip("/") or "/"
        #: The tape folder as a local path when the filesystem is the local one (fast paths), else None.
        self.local: Path | None = Path(self.root) if isinstance(self.fs, pafs.LocalFileSystem) else None

    @classmethod
    def of(cls, location: str | os.PathLike[str] | TapeStorage, filesystem: Any = None) -> TapeStorage:
        return location if isinstance(location, TapeStorage) else cls(location, filesystem)

    def __repr__(self) -> str:
        return f"TapeStorage({self.location!r})"

    @property
    def object_store(self) -> bool:
        """True when there is no rename: publication is by write-once PUT."""
        return self.local is None

    def path(self, *parts: str) -> str:
        """The path on :attr:`fs` of a file of the tape (``parts`` relative to its root)."""
        return "/".join([self.root, *parts]) if parts else self.root

    def url(self, path: str) -> str:
        """How a user names ``path`` (a path on :attr:`fs`): the URL for remote storage."""
        return f"{self._scheme}://{path}" if self._scheme and self._scheme != "file" else path

    def describe(self, *parts: str) -> str:
        return self.url(self.path(*parts))

    # -- reading -------------------------------------------------------------------------------

    def list(self, folder: str) -> list[Entry]:
        """Files directly in ``folder`` (relative to the root), by name; none if it does not exist."""
        base = self.path(folder)
        out: list[Entry] = []
        if self.local is not None:
            try:
                with os.scandir(base) as it:
                    for e in it:
                        try:
                            if e.is_file():
                                st = e.stat()
                                out.append(Entry(e.name, f"{base}/{e.name}", st.st_size, st.st_mtime_ns))
                        except FileNotFoundError:  # removed while listing
                            continue
            except (FileNotFoundError, NotADirectoryError):
                return []
        else:
            infos = self._call(lambda: self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)), base)
            for i in infos:
                if i.type == pafs.FileType.File:
                    mtime = i.mtime_ns if i.mtime is not None else None
                    out.append(Entry(i.base_name, i.path, i.size or 0, mtime))
        out.sort(key=lambda e: e.name)
        return out

    def exists(self, *parts: str) -> bool:
        return self.exists_path(self.path(*parts))

    def exists_path(self, path: str) -> bool:
        """Whether a file exists, by its path on :attr:`fs`."""
        if self.local is not None:
            return os.path.exists(path)
        return self._call(lambda: self.fs.get_file_info(path), path).type != pafs.FileType.NotFound

    def read_bytes(self, *parts: str) -> bytes:
        """A whole file; ``FileNotFoundError`` when it does not exist."""
        path = self.path(*parts)
        if self.local is not None:
            return Path(path).read_bytes()
        return self._call(lambda: _read_all(self.fs, path), path)

    def size(self, *parts: str) -> int:
        path = self.path(*parts)
        if self.local is not None:
            return os.stat(path).st_size
        info = self._call(lambda: self.fs.get_file_info(path), path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(self.url(path))
        return info.size or 0

    def parquet_file(self, path: str, **options: Any) -> pq.ParquetFile:
        """Open a Parquet file by its path on :attr:`fs` (``FileNotFoundError`` if it is gone);
        ``options`` go to ``pyarrow.parquet.ParquetFile`` (e.g. ``page_checksum_verification``)."""
        if self.local is not None:
            return pq.ParquetFile(path, memory_map=True, **options)
        return pq.ParquetFile(self.fs.open_input_file(path), **options)

    # -- writing -------------------------------------------------------------------------------

    def makedirs(self, *folders: str) -> None:
        """Create folders on local storage; object storage has no folders to create."""
        if self.local is not None:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            for f in folders:
                Path(self.path(f)).mkdir(exist_ok=True)

    def write_bytes(self, rel: str, data: bytes, *, overwrite: bool) -> bool:
        """Publish a small file whole. ``overwrite=False``: keep an existing one and return False
        (atomic on POSIX, an exists-check then a put on object storage: see the module doc)."""
        if self.local is not None:
            final = Path(self.path(rel))
            final.parent.mkdir(parents=True, exist_ok=True)
            return write_bytes_atomic(final, data, overwrite=overwrite)
        path = self.path(rel)
        if not overwrite and self.exists(rel):
            return False
        self._call(lambda: _put(self.fs, path, data), path)
        return True

    def write_parquet(self, rel: str, table: pa.Table, **options: Any) -> int:
        """Publish ``table`` as a new Parquet file at ``rel``; returns its size in bytes.

        Never overwrites: ``FileExistsError`` when the name is taken. Nothing is published if
        writing fails (POSIX: a hidden temporary file, removed; object storage: the object is
        serialised in memory first and PUT once)."""
        if self.local is not None:
            final = Path(self.path(rel))
            tmp = temp_path_for(final)
            try:
                pq.write_table(table, tmp, **options)
                if not publish(tmp, final, overwrite=False):
                    raise FileExistsError(str(final))
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return final.stat().st_size
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **options)
        data = sink.getvalue()
        path = self.path(rel)
        if self.exists(rel):
            raise FileExistsError(self.url(path))
        self._call(lambda: _put(self.fs, path, data), path)
        return data.size

    def delete(self, path: str) -> bool:
        """Remove a file by its path on :attr:`fs`; False if it was already gone."""
        try:
            if self.local is not None:
                os.unlink(path)
            else:
                self.fs.delete_file(path)
        except FileNotFoundError:
            return False
        return True

    def _call(self, fn: Callable[[], Any], path: str) -> Any:
        """Run a remote operation; filesystem errors other than a missing file name the tape."""
        try:
            return fn()
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"{self.url(path)}: {e}") from e


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _put(fs: pafs.FileSystem, path: str, data: bytes | pa.Buffer) -> None:
    # One write of the whole object, then close: the upload completes (the object appears) only
    # at close, and close is reached only if every part was sent.
    out = fs.open_output_stream(path)
    out.write(data)
    out.close()


def _from_url(url: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(url)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as arrow_error:
        try:
            import fsspec.core
        except ImportError:  # pragma: no cover - fsspec is a dependency
            raise StorageError(f"{url}: pyarrow has no filesystem for this URL ({arrow_error}) and fsspec is not installed") from arrow_error
        try:
            fs, path = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise StorageError(
                f"{url}: neither pyarrow ({arrow_error}) nor fsspec ({e}) knows this kind of URL; install the "
                "fsspec package for it (gcsfs for gs://, adlfs for az://, s3fs for s3://)"
            ) from e
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _as_pyarrow(filesystem: Any) -> pafs.FileSystem:
    if isinstance(filesystem, pafs.FileSystem):
        return filesystem
    try:
        from fsspec import AbstractFileSystem
    except ImportError:  # pragma: no cover - fsspec is a dependency
        AbstractFileSystem = ()  # type: ignore[assignment,misc]
    if AbstractFileSystem and isinstance(filesystem, AbstractFileSystem):
        return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))
    raise StorageError(
        f"filesystem must be a pyarrow.fs.FileSystem or an fsspec filesystem, got {type(filesystem).__name__}"
    )
