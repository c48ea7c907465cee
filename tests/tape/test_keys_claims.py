"""The tape's call-key index and claims: what several replicas and recorders agree on without talking."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from recorder import WriterIdConflictError
from recorder.tape._claims import CallClaims
from recorder.tape._keys import ENTRY, HEADER, KEYS_DIR, KeyEntry, KeyIndex, KeyLog, call_key

ROOT = Path(__file__).resolve().parents[2]
K0 = call_key([1, 2, 3], [4])
K1 = call_key([1, 2, 3, 4, 5], [6])


def _e(rid: str, k: int, t: int, version: int = 0) -> KeyEntry:
    return KeyEntry(t, rid, k, version)


def test_a_writer_s_entries_are_read_by_every_other_process_incrementally(tmp_path: Path) -> None:
    a, b = KeyLog(tmp_path, "replica-a"), KeyLog(tmp_path, "replica-b")
    index = KeyIndex(tmp_path)
    a.append([(K0, _e("ra", 0, 10, 3))])
    b.append([(K0, _e("rb", 0, 5))])
    assert index.refresh() == 2
    assert [e.rollout_id for e in index.candidates(K0)] == ["rb", "ra"], "oldest first, whichever writer"
    assert index.candidates(K0)[1].policy_version == 3
    assert index.refresh() == 0, "nothing new: nothing read again"
    a.append([(K1, _e("ra", 1, 11))])
    assert index.refresh() == 1 and index.has_call("ra", 1)
    own = KeyIndex(tmp_path, own="replica-a")
    own.refresh()
    assert not own.has_call("ra", 0), "a writer's own file comes in through add_local, never read back"
    a.close()
    b.close()


def test_a_torn_tail_waits_until_whole_and_a_reopened_writer_pads_past_it(tmp_path: Path) -> None:
    log = KeyLog(tmp_path, "w")
    log.append([(K0, _e("r1", 0, 1))])
    log.close()
    path = tmp_path / KEYS_DIR / "w.keys"
    with open(path, "ab") as f:  # a crash in the middle of an append
        f.write(b"\x07" * 30)
    index = KeyIndex(tmp_path)
    assert index.refresh() == 1
    log = KeyLog(tmp_path, "w")  # the same writer id again: pads the torn entry to a whole one
    assert (path.stat().st_size - len(HEADER)) % ENTRY.itemsize == 0
    log.append([(K1, _e("r1", 1, 2))])
    assert index.refresh() == 1 and index.has_call("r1", 1)
    assert index.skipped == 1, "the padded torn entry fails its check and is skipped, once a good one follows"
    log.close()


def test_a_retracted_entry_is_no_longer_a_candidate(tmp_path: Path) -> None:
    log = KeyLog(tmp_path, "w")
    log.append([(K0, _e("r1", 0, 1)), (K0, _e("r2", 0, 2))])
    log.retract([(K0, _e("r2", 0, 2))])  # its call's commit failed: nobody may continue it
    index = KeyIndex(tmp_path)
    index.refresh()
    assert [e.rollout_id for e in index.candidates(K0)] == ["r1"] and not index.has_call("r2", 0)
    assert list(index.scan([K0])[K0]) == [_e("r1", 0, 1)]
    log.close()


def test_two_live_writers_with_one_id_are_refused(tmp_path: Path) -> None:
    log = KeyLog(tmp_path, "same")
    with pytest.raises(WriterIdConflictError, match="writer id"):
        KeyLog(tmp_path, "same")
    log.close()


def test_keys_evicted_from_memory_are_still_found_and_joined(tmp_path: Path) -> None:
    log = KeyLog(tmp_path, "w")
    log.append([(K0, _e("old", 0, 1)), (K1, _e("old", 1, 2))])
    log.append([(call_key([i], [i]), _e(f"n{i}", 0, 10 + i)) for i in range(50)])
    index = KeyIndex(tmp_path, max_keys=8)
    index.refresh()
    assert index.candidates(K0) == [] and index.evicted >= 2
    assert CallClaims(tmp_path, index).join([K0, K1]) is None, "a server's hot path does not scan"
    chain = CallClaims(tmp_path, index, scan_evicted=True).join([K0, K1])
    assert chain is not None and chain.rollout_id == "old" and [e.call_index for e in chain.calls] == [0, 1]
    log.close()


def test_continuations_of_identical_calls_take_each_once_then_the_latest_again(tmp_path: Path) -> None:
    log = KeyLog(tmp_path, "w")
    log.append([(K0, _e("r1", 0, 1)), (K0, _e("r2", 0, 2))])
    claims = CallClaims(tmp_path, KeyIndex(tmp_path))
    first, second, third = (claims.continue_call(K0) for _ in range(3))
    assert (first.rollout_id, second.rollout_id) == ("r1", "r2") and first.path and second.path
    assert third is not None and third.path is None and third.rollout_id == "r2", "a retry continues the latest"
    claims.release(first)  # its call was not recorded: the client's retry takes it again
    again = claims.continue_call(K0)
    assert again is not None and again.rollout_id == "r1" and again.path is not None
    assert claims.continue_call(call_key([9], [9])) is None, "an unknown call starts a new rollout"
    log.close()


def test_a_settled_claim_is_not_taken_again_by_a_process_that_has_not_seen_the_continuation(tmp_path: Path) -> None:
    server, other = KeyLog(tmp_path, "a"), KeyLog(tmp_path, "b")
    server.append([(K0, _e("r1", 0, 1))])
    stale = CallClaims(tmp_path, KeyIndex(tmp_path))
    stale.index.refresh()  # sees r1 call 0, not yet its continuation
    busy = CallClaims(tmp_path, KeyIndex(tmp_path))
    busy.index.refresh()
    claim = busy.continue_call(K0)
    assert claim is not None and claim.path is not None
    other.append([(K1, _e("r1", 1, 2))])  # the continuation is recorded and indexed ...
    busy.settle([claim])  # ... so its claim file goes
    assert not claim.path.exists()
    again = stale.continue_call(K0)
    assert again is not None and again.path is None, "the index says r1 call 0 is continued: no second claim"
    server.close()
    other.close()


def test_a_joined_chain_is_closed_and_a_longer_chain_is_not_joined_short(tmp_path: Path) -> None:
    log = KeyLog(tmp_path, "w")
    # two greedy repeats made the same first call; one of them went on (x), one stopped (y)
    log.append([(K0, _e("x", 0, 1)), (K0, _e("y", 0, 2)), (K1, _e("x", 1, 3))])
    claims = CallClaims(tmp_path, KeyIndex(tmp_path))
    short = claims.join([K0])
    assert short is not None and short.rollout_id == "y", "the one-call agent rollout is y, not x's first call"
    long = claims.join([K0, K1])
    assert long is not None and long.rollout_id == "x"
    assert claims.join([K0]) is None and claims.join([K0, K1]) is None, "each recorded rollout joins once"
    later = claims.continue_call(K0)
    assert later is not None and later.path is None, "a joined rollout's last call is not continued as new"
    log.close()


def test_a_chain_being_continued_is_not_joined_as_if_it_had_ended(tmp_path: Path) -> None:
    log = KeyLog(tmp_path, "w")
    log.append([(K0, _e("x", 0, 1)), (K0, _e("y", 0, 2))])
    claims = CallClaims(tmp_path, KeyIndex(tmp_path))
    going_on = claims.continue_call(K0)  # x's next call is being generated
    assert going_on is not None and going_on.rollout_id == "x"
    joined = claims.join([K0])
    assert joined is not None and joined.rollout_id == "y"
    log.close()


def _run_children(tmp_path: Path, mode: str, processes: int, threads: int, keys: list[bytes]) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "tests.tape.claims_child", str(tmp_path), mode, str(threads), *(k.hex() for k in keys)]
    children = [subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for _ in range(processes)]
    try:
        for c in children:  # every child has read the index before any starts claiming
            assert c.stdout is not None and c.stdout.readline().strip() == "READY"
        for c in children:
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        lines = []
        for c in children:
            out, _ = c.communicate(timeout=120)
            assert c.returncode == 0
            lines += out.split()
        return [" ".join(x) for x in _group(lines)]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()


def _group(words: list[str]) -> list[list[str]]:
    """Re-split the children's output words into lines (each starts with its verb)."""
    out: list[list[str]] = []
    for w in words:
        if w in ("CLAIM", "AGAIN", "JOIN", "NONE"):
            out.append([w])
        else:
            out[-1].append(w)
    return out


def test_concurrent_continuations_in_many_processes_claim_each_recorded_call_once(tmp_path: Path) -> None:
    a, b = KeyLog(tmp_path, "replica-a"), KeyLog(tmp_path, "replica-b")
    a.append([(K0, _e(f"a{i}", 0, 2 * i)) for i in range(6)])
    b.append([(K0, _e(f"b{i}", 0, 2 * i + 1)) for i in range(6)])
    lines = _run_children(tmp_path, "continue", processes=4, threads=6, keys=[K0])
    assert len(lines) == 24
    claimed = Counter(line for line in lines if line.startswith("CLAIM"))
    assert len(claimed) == 12 and set(claimed.values()) == {1}, f"each of the 12 calls claimed exactly once: {claimed}"
    assert all(line.startswith("AGAIN") for line in lines if not line.startswith("CLAIM"))
    a.close()
    b.close()


def test_concurrent_joins_in_many_processes_join_each_recorded_rollout_once(tmp_path: Path) -> None:
    log = KeyLog(tmp_path, "w")
    log.append([entry for i in range(5) for entry in ((K0, _e(f"r{i}", 0, 2 * i)), (K1, _e(f"r{i}", 1, 2 * i + 1)))])
    lines = _run_children(tmp_path, "join", processes=3, threads=4, keys=[K0, K1])
    joined = Counter(line for line in lines if line.startswith("JOIN"))
    assert len(joined) == 5 and set(joined.values()) == {1}, f"each recorded rollout joined exactly once: {joined}"
    assert Counter(lines)["NONE"] == 12 - 5
    log.close()
