"""Crash-safe file publication: write to a hidden temporary name, fsync, then rename."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ._layout import temp_name


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
