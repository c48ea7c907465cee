"""Claims: who continues, and which agent rollout joins, a recorded call; decided once across processes.

Greedy repeats of a task make identical calls, so a call key (``recorder.tape._keys``) can
name several recorded calls. Each continuation must take a different one, and each recorded
call chain must join at most one agent rollout, whichever process (a `gymtape serve` replica,
a `gymtape record`) asks first. The decision is a no-clobber file creation, atomic on a local
disk and on NFS alike:

    claims/<rollout>.<call index>

exists while a continuation of that call is being recorded, and for good once an agent
rollout was joined to the chain ending at that call (the join *closes* the chain). One name for
both makes them exclude each other: a chain that is being continued is not joined as if it had
ended, and a joined chain is not continued by a greedy repeat that merely made the same calls.

A continuation's claim is deleted once the continuing call is in the call-key index, which
then says the same thing for good (``(rollout, index + 1)`` exists). A process that creates a
claim therefore re-reads the index before trusting it (the file it created may be the second
one, after the first was settled). Claims are not fsynced: after an OS crash (not a process
crash) the last few may be gone; the index entries they stood for are durable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ._keys import KeyEntry, KeyIndex

#: Folder of claims: ``claims/<rollout>.<call index>``.
CLAIMS_DIR = "claims"


@dataclass(frozen=True)
class Claim:
    """The recorded call a continuation continues; ``path`` is None when every call with the key
    was taken already and the latest is continued again (a client's retry, or a branch)."""

    rollout_id: str
    call_index: int
    policy_version: int
    path: Path | None


@dataclass(frozen=True)
class Chain:
    """A recorded rollout's calls 0..n-1, matching an agent rollout's calls one to one."""

    rollout_id: str
    calls: tuple[KeyEntry, ...]


class CallClaims:
    """Continuations (`gymtape serve`) and joins (`gymtape record`) resolved on the tape.

    Args:
        tape: the tape folder (a local or shared POSIX mount).
        index: the call-key index to resolve keys with (refreshed here when it falls short).
        scan_evicted: look keys that fell out of the index's memory up in its files (the
            recorder: a long rollout's first call may be old; a server's hot path does not).
    """

    def __init__(self, tape: Path, index: KeyIndex, *, scan_evicted: bool = False) -> None:
        self.folder = Path(tape) / CLAIMS_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.scan_evicted = scan_evicted

    # -- serve: which recorded call a request continues -----------------------------------

    def continue_call(self, key: bytes) -> Claim | None:
        """Claim the oldest recorded call with this key that nobody continues yet; None when no
        call has the key (the request starts a new rollout)."""
        seen = self.index.candidates(key)
        claim = self._claim_first(seen)
        if claim is not None:
            return claim
        self.index.refresh()  # another writer's calls, or continuations settled since
        fresh = self.index.candidates(key)
        if fresh != seen:
            claim = self._claim_first(fresh)
            if claim is not None:
                return claim
        if not fresh:
            return None
        latest = fresh[-1]
        return Claim(latest.rollout_id, latest.call_index, latest.policy_version, None)

    def release(self, claim: Claim) -> None:
        """The continuation was not recorded: let the next request claim the call again."""
        if claim.path is not None:
            _unlink(claim.path)

    def settle(self, claims: Sequence[Claim]) -> None:
        """The continuations are in the index (durable): their claim files say nothing more."""
        for c in claims:
            if c.path is not None:
                _unlink(c.path)

    def _claim_first(self, candidates: list[KeyEntry]) -> Claim | None:
        for e in candidates:
            if self.index.has_call(e.rollout_id, e.call_index + 1):
                continue  # continued already
            path = self._create(e.rollout_id, e.call_index)
            if path is None:
                continue  # being continued, or the end of a joined rollout
            self.index.refresh()
            if self.index.has_call(e.rollout_id, e.call_index + 1):  # a settled claim came before ours
                _unlink(path)
                continue
            return Claim(e.rollout_id, e.call_index, e.policy_version, path)
        return None

    # -- record: which recorded rollout an agent rollout is --------------------------------

    def join(self, keys: Sequence[bytes], prefer: str | None = None) -> Chain | None:
        """Claim a recorded rollout whose calls are exactly these keys, in order, and that no
        other agent rollout has joined; ``prefer`` is tried first (the rollout id the server
        answered with). None when there is none: the caller writes the calls itself."""
        if not keys:
            return None
        for attempt in range(3):
            if attempt:
                self.index.refresh()
            for chain in self._order(self._chains(keys, deep=attempt == 2), prefer):
                if self._close(chain):
                    return chain
            if attempt == 1 and not (self.scan_evicted and self.index.evicted):
                break
        return None

    def find(self, keys: Sequence[bytes]) -> Chain | None:
        """The chain :meth:`join` would claim first, without claiming it (the server's lookup)."""
        if not keys:
            return None
        self.index.refresh()
        chains = self._order(self._chains(keys, deep=False), None)
        free = [c for c in chains if not self._exists(c.rollout_id, len(c.calls) - 1)]
        return (free or chains or [None])[0]

    def _chains(self, keys: Sequence[bytes], *, deep: bool) -> list[Chain]:
        if deep:
            by_key = self.index.scan(keys)
        else:
            by_key = {k: self.index.candidates(k) for k in set(keys)}
        at: dict[tuple[str, int], dict[bytes, KeyEntry]] = {}
        for k, entries in by_key.items():
            for e in entries:
                at.setdefault((e.rollout_id, e.call_index), {})[k] = e
        chains = []
        for first in by_key.get(keys[0], ()):
            if first.call_index != 0:
                continue
            calls = [at.get((first.rollout_id, j), {}).get(k) for j, k in enumerate(keys)]
            if all(c is not None for c in calls):
                chains.append(Chain(first.rollout_id, tuple(calls)))  # type: ignore[arg-type]
        return chains

    def _order(self, chains: list[Chain], prefer: str | None) -> list[Chain]:
        chains = sorted(chains, key=lambda c: c.calls[0])
        return sorted(chains, key=lambda c: c.rollout_id != prefer) if prefer else chains

    def _close(self, chain: Chain) -> bool:
        """Join the chain: claim its last call (nobody continues it any more). A chain that goes
        on past these calls is another, longer rollout's: it is left alone."""
        last = len(chain.calls) - 1
        if self.index.has_call(chain.rollout_id, last + 1):
            return False
        path = self._create(chain.rollout_id, last)
        if path is None:
            return False
        self.index.refresh()
        if self.index.has_call(chain.rollout_id, last + 1):  # continued, and its claim settled, before ours
            _unlink(path)
            return False
        return True

    # -- files --------------------------------------------------------------------------

    def _path(self, rollout_id: str, call_index: int) -> Path:
        return self.folder / f"{rollout_id}.{call_index}"

    def _create(self, rollout_id: str, call_index: int) -> Path | None:
        path = self._path(rollout_id, call_index)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return None
        os.close(fd)
        return path

    def _exists(self, rollout_id: str, call_index: int) -> bool:
        return self._path(rollout_id, call_index).exists()


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
