"""The call-key index: which recorded calls have a given (prompt, generation) token sequence.

Several `gymtape serve` replicas capture into one tape, and a continuation may arrive at any
of them; `gymtape record` joins a finished rollout to whichever replica recorded its calls.
Both look a call up by its token IDs (:func:`call_key`), so that lookup must see every
writer's calls, not one process's memory. Reading the calls themselves for it would mean
decoding delta-encoded prompts on every request; instead each capturing writer appends one
small fixed-size entry per call to its own file:

    keys/<writer>.keys

a 16-byte header, then 80-byte entries: call key (16 bytes), rollout id (32 bytes, ASCII,
NUL-padded), call index (int32), kind (0: a call, 1: a retraction of an entry whose call was
not recorded after all), policy version (int64), time (ns since the epoch: "oldest first"
across writers), and a 64-bit check word over the rest.

When an entry is visible and durable. A call is acknowledged only after its entry is written,
and only after its row is durable in the write-ahead log (``recorder.tape._wal``), whose batch
carries the same entries (Arrow IPC custom metadata, ``gymtape:keys``). So one fsync per group
commit covers both:

* On a local filesystem every process of the host shares one page cache, so a written entry is
  visible to every reader at once; the index file is ``fdatasync``ed before a log segment is
  sealed into its shard (and on close). If the machine loses power, entries of rows still in
  the log may be lost from the index file, never from the log: the writer that recovers the
  dead segment writes them again (``keys/<segment>.recovered.keys``, :func:`restore_from_log`)
  before it seals it.
* On any other filesystem (NFS, Lustre, CIFS, FUSE, ...), where another host sees only what
  was flushed, every append is also ``fdatasync``ed before the call is acknowledged.

Why not Arrow IPC like the write-ahead log: an entry is tiny and read by every replica on a
lookup miss, so readers tail each file from the byte offset where they stopped and decode new
entries with one numpy view, no per-message parsing; a torn tail is a partial entry (ignored
until whole) or a failed check word (skipped once a good entry follows it).

The index holds nothing the tape does not: every entry is a call row's key, so a lost index
can be rebuilt from the calls (``call_key(prompt, generation)`` of each call row).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .._errors import TapeValueError, WriterIdConflictError
from ._layout import temp_name
from ._storage import fsync_dir, publish

#: Folder of the call-key index: ``keys/<writer>.keys``.
KEYS_DIR = "keys"
KEYS_SUFFIX = ".keys"
#: Custom-metadata key of a write-ahead-log batch holding its calls' index entries (encoded).
LOG_METADATA_KEY = b"gymtape:keys"
#: Name part of an index file that recovery wrote from a dead writer's log segment.
RECOVERED = ".recovered"
HEADER = b"gymtape-keys v1\n"
ENTRY = np.dtype([
    ("key", "V16"), ("rollout", "S32"), ("call_index", "<i4"), ("kind", "u1"), ("pad", "V3"),
    ("policy_version", "<i8"), ("time_ns", "<i8"), ("check", "<u8"),
])
assert ENTRY.itemsize == 80
CALL, RETRACT = 0, 1
_WORDS = 9  # the entry before its check word, as little-endian uint64 words
_MIX = np.array([0x9E3779B97F4A7C15 + 2 * i for i in range(_WORDS)], dtype=np.uint64) | np.uint64(1)
_SALT = np.uint64(0x6779_6D74_6170_6531)  # "gymtape1": an all-zero entry never checks
MAX_ROLLOUT_ID = 32


def call_key(prompt_ids: Sequence[int], generation_ids: Sequence[int]) -> bytes:
    """The 16-byte key of a call: a hash of its prompt and generation token IDs."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(prompt_ids, dtype=np.int32).tobytes())
    h.update(b"|")
    h.update(np.asarray(generation_ids, dtype=np.int32).tobytes())
    return h.digest()


class KeyEntry(NamedTuple):
    """One recorded call under a key; tuples order oldest first. (A tuple: the index holds
    hundreds of thousands.)"""

    time_ns: int
    rollout_id: str
    call_index: int
    policy_version: int = 0


def _check_words(raw: np.ndarray) -> np.ndarray:
    words = raw.view("<u8").reshape(-1, 10)[:, :_WORDS]
    with np.errstate(over="ignore"):
        return (words * _MIX).sum(axis=1, dtype=np.uint64) ^ _SALT


def encode(entries: Sequence[tuple[bytes, KeyEntry]], kind: int = CALL) -> bytes:
    arr = np.zeros(len(entries), dtype=ENTRY)
    for i, (key, e) in enumerate(entries):
        check_rollout_id(e.rollout_id)  # also what makes claims/<rollout>.<index> a safe file name
        rid = e.rollout_id.encode("ascii")
        arr[i] = (key, rid, e.call_index, kind, b"\0\0\0", e.policy_version, e.time_ns, 0)
    arr["check"] = _check_words(arr)
    return arr.tobytes()


def check_rollout_id(rollout_id: str) -> None:
    """The index stores rollout ids of up to 32 ASCII letters, digits, '-' and '_' (what
    `gymtape serve` makes: uuid4 hex); refuse others by name rather than store them cut."""
    if not (0 < len(rollout_id) <= MAX_ROLLOUT_ID and rollout_id.isascii()
            and rollout_id.replace("-", "").replace("_", "").isalnum()):
        raise TapeValueError(f"rollout id {rollout_id!r} cannot go into the call-key index: it holds 1 to "
                             f"{MAX_ROLLOUT_ID} ASCII letters, digits, '-' and '_'")


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Whole entries of ``data`` (a multiple of 80 bytes is not required) and how many bytes
    were consumed: everything up to the last entry that checks; entries that fail their check
    before a good one are skipped (a torn write a later append went past), after the last good
    one they are left for the next read (a write in progress)."""
    n = len(data) // ENTRY.itemsize
    if n == 0:
        return np.zeros(0, ENTRY), 0
    arr = np.frombuffer(data, dtype=ENTRY, count=n)
    good = _check_words(arr) == arr["check"]
    if good.all():
        return arr, n * ENTRY.itemsize
    last = np.flatnonzero(good)
    if last.size == 0:
        return np.zeros(0, ENTRY), 0
    upto = int(last[-1]) + 1
    return arr[:upto][good[:upto]], upto * ENTRY.itemsize


class KeyLog:
    """One writer's append-only index file.

    :meth:`append` returns once the entries are visible to every reader of the tape: written,
    and on a filesystem other hosts share (no common page cache) also ``fdatasync``ed. Where
    the write alone suffices, :meth:`sync` makes them durable; the capturing writer calls it
    before a log segment (which holds the same entries) is sealed, and :meth:`close` does.
    ``sync_each`` forces either behaviour (default: by the filesystem, :func:`shares_page_cache`).

    Holds an exclusive ``flock`` while open (two live writers with one id are refused, as for
    the write-ahead log). Reopening an id whose file ends in a torn entry pads it to a whole
    entry first, which readers then skip.
    """

    def __init__(self, tape: Path, writer_id: str, *, sync_each: bool | None = None) -> None:
        folder = Path(tape) / KEYS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{writer_id}{KEYS_SUFFIX}"
        #: Whether every append is fdatasynced (else: :meth:`sync`, before sealing and on close).
        self.sync_each = (not shares_page_cache(folder)) if sync_each is None else sync_each
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WriterIdConflictError(f"{self.path} is held by another live writer: two writers share the "
                                            "writer id, give each its own") from None
            size = os.fstat(fd).st_size
            if size < len(HEADER):
                os.ftruncate(fd, 0)
                _write_all(fd, HEADER, 0)
                size = len(HEADER)
            torn = (size - len(HEADER)) % ENTRY.itemsize
            if torn:
                _write_all(fd, bytes(ENTRY.itemsize - torn), size)
                size += ENTRY.itemsize - torn
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.size = size
        self._dirty = False
        self._lock = threading.Lock()
        #: Retractions that could not be written yet: written first by the next append.
        self._retract: list[tuple[bytes, KeyEntry]] = []

    def append(self, entries: Sequence[tuple[bytes, KeyEntry]] | bytes) -> None:
        """Write the entries (or :func:`encode`'s bytes of them): visible to every reader when
        this returns. On failure the file is cut back to its last whole entry."""
        data = entries if isinstance(entries, bytes) else encode(entries)
        with self._lock:
            if self._retract:
                data = encode(self._retract, RETRACT) + data
            self._write(data, sync=self.sync_each)
            self._retract = []

    def sync(self) -> None:
        """Make every entry written so far durable (``fdatasync``; nothing to do when none is new)."""
        with self._lock:
            if self._dirty and self.fd >= 0:
                os.fdatasync(self.fd)
                self._dirty = False

    def retract(self, entries: Sequence[tuple[bytes, KeyEntry]]) -> None:
        """Mark entries whose calls were not recorded after all (their commit failed), so no
        reader continues them; kept and written with the next append when this fails too."""
        with self._lock:
            pending = self._retract + list(entries)
            try:
                self._write(encode(pending, RETRACT), sync=True)
                self._retract = []
            except OSError:
                self._retract = pending

    def _write(self, data: bytes, *, sync: bool) -> None:
        if self.fd < 0:
            raise OSError(f"{self.path} is closed")
        try:
            _write_all(self.fd, data, self.size)
            if sync:
                os.fdatasync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            raise
        self.size += len(data)
        self._dirty = self._dirty or not sync

    def close(self) -> None:
        """Write what is pending, make it durable, release the file (and its lock)."""
        with self._lock:
            if self.fd < 0:
                return
            try:
                if self._retract:
                    self._write(encode(self._retract, RETRACT), sync=True)
                if self._dirty:
                    os.fdatasync(self.fd)
            except OSError:
                pass  # entries of rows in the log are written again from the log if they are lost
            os.close(self.fd)
            self.fd = -1


#: Filesystems whose files every process of a host reads through one page cache (and that no
#: other host reads except through this host): a write is visible to every reader at once.
LOCAL_FILESYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "f2fs", "zfs", "bcachefs", "jfs", "reiserfs",
    "overlay", "nilfs2", "hfsplus", "vfat", "exfat",
})


def shares_page_cache(path: Path) -> bool:
    """Whether ``path`` is on a local filesystem (:data:`LOCAL_FILESYSTEMS`), per the
    mount table; False where that cannot be told (no ``/proc``): then every append is synced."""
    try:
        target = os.path.realpath(path)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    best, fstype = -1, None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        mount = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= best:  # the last of equal mount points is the one on top
            best, fstype = len(mount), right.split()[0]
    return fstype in LOCAL_FILESYSTEMS


def restore_from_log(tape: Path, segment_stem: str, data: bytes) -> int:
    """Entries a dead writer's log segment holds (``data``: its batches' ``gymtape:keys``)
    that its index file lacks (the machine lost power before they were synced) are written,
    durably, to ``keys/<segment_stem>.recovered.keys``; returns how many. Called before the
    segment is sealed, so every sealed call's entry is in a durable index file. Idempotent."""
    wanted, _ = decode(data)
    if not len(wanted):
        return 0
    folder = Path(tape) / KEYS_DIR
    final = folder / f"{segment_stem}{RECOVERED}{KEYS_SUFFIX}"
    if final.exists():
        return 0
    writer = segment_stem.rsplit("-", 1)[0]
    have = _read_from(folder / f"{writer}{KEYS_SUFFIX}", 0) or b""
    known = set()
    if have[: len(HEADER)] == HEADER:
        arr, _ = decode(have[len(HEADER):])
        known = {bytes(r) for r in arr.view(f"V{ENTRY.itemsize}")}
    missing = [bytes(r) for r in wanted.view(f"V{ENTRY.itemsize}") if bytes(r) not in known]
    if not missing:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / temp_name(final.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, HEADER + b"".join(missing), 0)
    finally:
        os.close(fd)
    if publish(tmp, final, overwrite=False):
        fsync_dir(folder)
    return len(missing)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class KeyIndex:
    """Every writer's index entries, read incrementally, with the most recent keys in memory.

    :meth:`refresh` reads only the bytes appended since the last call (one ``scandir`` plus an
    open/``fstat`` per writer file: close-to-open consistency on NFS). Entries this process
    writes itself come in through :meth:`add_local`, so its own file is never read back.
    Memory holds the ``max_keys`` most recent keys; :meth:`scan` looks older ones up in the files.

    Thread-safe.
    """

    def __init__(self, tape: Path, *, own: str | None = None, max_keys: int = 262_144) -> None:
        self.folder = Path(tape) / KEYS_DIR
        self.own = f"{own}{KEYS_SUFFIX}" if own else None
        self.max_keys = max_keys
        self._offsets: dict[str, int] = {}
        # key -> its entry, or a list of them oldest first (greedy repeats); insertion order is
        # recency (a key seen again moves to the end), so the first key is the one to evict.
        self._keys: dict[bytes, KeyEntry | list[KeyEntry]] = {}
        #: (rollout id, call index) -> how many entries are there (a retried call may have two).
        self._calls: dict[tuple[str, int], int] = {}
        self._ids: dict[str, str] = {}  # one string per rollout id, shared by its entries
        self._lock = threading.Lock()
        #: Keys dropped from memory (then :meth:`scan` can still find them).
        self.evicted = 0
        #: Entries skipped because their check word failed (torn writes).
        self.skipped = 0

    # -- reading ------------------------------------------------------------------------

    def refresh(self) -> int:
        """Read what every other writer appended since the last refresh; returns the entries read."""
        try:
            names = [e.name for e in os.scandir(self.folder) if e.name.endswith(KEYS_SUFFIX) and e.name != self.own
                     and not e.name.startswith(".")]
        except FileNotFoundError:
            return 0
        got = 0
        for name in names:
            with self._lock:
                start = self._offsets.get(name, 0)
            data = _read_from(self.folder / name, start)
            if data is None:
                continue
            base = start
            if start == 0:
                if data[: len(HEADER)] != HEADER:
                    if len(data) >= len(HEADER):
                        with self._lock:  # not an index file: never read it again
                            self._offsets[name] = len(data)
                    continue
                data, base = data[len(HEADER):], len(HEADER)
            arr, used = decode(data)
            with self._lock:
                if self._offsets.get(name, 0) != start:
                    continue  # another thread read these bytes meanwhile
                self._offsets[name] = base + used
                self.skipped += used // ENTRY.itemsize - len(arr)
                self._add_array(arr)
            got += len(arr)
        return got

    def scan(self, keys: Iterable[bytes]) -> dict[bytes, list[KeyEntry]]:
        """Every entry of these keys in every file (own included): for keys evicted from memory."""
        wanted = set(keys)
        out: dict[bytes, list[KeyEntry]] = {}
        retracted: set[tuple[bytes, str, int]] = set()
        try:
            names = [e.name for e in os.scandir(self.folder) if e.name.endswith(KEYS_SUFFIX)]
        except FileNotFoundError:
            return out
        lo = np.array([int.from_bytes(k[:8], "little") for k in wanted], dtype=np.uint64)
        for name in names:
            data = _read_from(self.folder / name, 0)
            if not data or data[: len(HEADER)] != HEADER:
                continue
            arr, _ = decode(data[len(HEADER):])
            if not len(arr):
                continue
            first = arr.view("<u8").reshape(-1, 10)[:, 0]
            for key, e, kind in _rows(arr[np.isin(first, lo)]):
                if key not in wanted:
                    continue
                if kind == RETRACT:
                    retracted.add((key, e.rollout_id, e.call_index))
                else:
                    out.setdefault(key, []).append(e)
        for key, es in out.items():
            # a set: an entry recovery wrote again from the log may also be in its writer's file
            out[key] = sorted({e for e in es if (key, e.rollout_id, e.call_index) not in retracted})
        return out

    def candidates(self, key: bytes) -> list[KeyEntry]:
        """Recorded calls with this key, oldest first (a copy)."""
        with self._lock:
            got = self._keys.get(key)
        return [] if got is None else [got] if isinstance(got, KeyEntry) else list(got)

    def has_call(self, rollout_id: str, call_index: int) -> bool:
        with self._lock:
            return (rollout_id, call_index) in self._calls

    def __len__(self) -> int:
        return len(self._keys)

    # -- this process's own entries -------------------------------------------------------

    def add_local(self, entries: Iterable[tuple[bytes, KeyEntry]]) -> None:
        with self._lock:
            for key, e in entries:
                self._add(key, e)

    # -- internals ----------------------------------------------------------------------

    def _add_array(self, arr: np.ndarray) -> None:
        if len(arr) > self.max_keys:  # a first read of a long index: only the newest can stay in memory
            self.evicted += len(arr) - self.max_keys
            arr = arr[-self.max_keys:]
        for key, e, kind in _rows(arr):
            if kind == RETRACT:
                self._remove(key, e)
            else:
                self._add(key, e)

    def _add(self, key: bytes, e: KeyEntry) -> None:
        if len(self._ids) > 2 * self.max_keys:  # bounded: entries keep their strings, new ones share anew
            self._ids.clear()
        rid = self._ids.setdefault(e.rollout_id, e.rollout_id)
        if rid is not e.rollout_id:
            e = e._replace(rollout_id=rid)
        got = self._keys.pop(key, None)
        if got is None:
            self._keys[key] = e
            if len(self._keys) > self.max_keys:
                old = next(iter(self._keys))
                gone = self._keys.pop(old)
                self.evicted += 1
                for g in [gone] if isinstance(gone, KeyEntry) else gone:
                    self._drop_call(g)
        else:
            entries = [got] if isinstance(got, KeyEntry) else got
            if e in entries:
                self._keys[key] = got
                return
            entries.append(e)
            if entries[-1] < entries[-2]:
                entries.sort()
            self._keys[key] = entries  # now the most recent key
        at = (rid, e.call_index)
        self._calls[at] = self._calls.get(at, 0) + 1

    def _remove(self, key: bytes, e: KeyEntry) -> None:
        got = self._keys.get(key)
        if got is None:
            return
        entries = [got] if isinstance(got, KeyEntry) else got
        keep = [x for x in entries if (x.rollout_id, x.call_index) != (e.rollout_id, e.call_index)]
        if len(keep) == len(entries):
            return
        if keep:
            self._keys[key] = keep[0] if len(keep) == 1 else keep
        else:
            del self._keys[key]
        for x in entries:
            if x not in keep:
                self._drop_call(x)

    def _drop_call(self, e: KeyEntry) -> None:
        at = (e.rollout_id, e.call_index)
        n = self._calls.get(at, 0) - 1
        if n > 0:
            self._calls[at] = n
        else:
            self._calls.pop(at, None)


def _rows(arr: np.ndarray) -> Iterator[tuple[bytes, KeyEntry, int]]:
    """(key, entry, kind) of each decoded entry; columns are converted whole (fast)."""
    keys = arr["key"].tobytes()
    rollouts = [r.decode("ascii", "replace") for r in arr["rollout"].tolist()]
    for i, (rid, idx, kind, version, t) in enumerate(zip(
            rollouts, arr["call_index"].tolist(), arr["kind"].tolist(), arr["policy_version"].tolist(),
            arr["time_ns"].tolist())):
        yield keys[16 * i: 16 * i + 16], KeyEntry(t, rid, idx, version), kind


def _read_from(path: Path, offset: int) -> bytes | None:
    """The file's bytes from ``offset`` (None: gone or nothing new)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size <= offset:
            return None
        chunks = []
        while offset < size:
            chunk = os.pread(fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def now_ns() -> int:
    return time.time_ns()
