"""`gymtape serve` answers a call only once it is on the tape: SIGKILL under load, a full disk."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import httpx

from recorder import Tape
from tests.conftest import fill_disk
from tests.servers import Server, start_gymtape_serve


def _chat(url: str, i: int, max_tokens: int = 3) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "x", "messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": max_tokens,
        "temperature": 1.0, "seed": i})


def _call_ids(tape: Path) -> list[str]:
    return Tape(tape).read("calls", ["call_id"])["call_id"].to_pylist()


def test_sigkill_under_load_keeps_every_answered_call_and_a_new_server_appends(model_dir: Path, tmp_path: Path) -> None:
    tape = tmp_path / "tape"
    server = start_gymtape_serve(tmp_path, "--engine", "hf", "--model", str(model_dir), "--tape", str(tape),
                                 "--max-batch-size", "8")
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(c: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                r = _chat(server.url, c * 1000 + i)
            except httpx.HTTPError:  # the server is gone
                return
            if r.status_code == 200:
                with lock:
                    answered.append(r.json()["id"])
            i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    try:
        # Kill once enough calls were answered for several group commits to have happened.
        deadline = threading.Event()
        while len(answered) < 40 and not deadline.wait(0.05):
            assert server.proc.poll() is None, server.log_tail()
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
    finally:
        stop.set()
        for t in threads:
            t.join()
    with lock:
        acked = set(answered)
    on_tape = _call_ids(tape)
    assert len(on_tape) == len(set(on_tape)), "a call was read twice"
    missing = acked - set(on_tape)
    assert not missing, f"{len(missing)} of {len(acked)} answered calls are not on the tape"
    Tape(tape).prompts()  # readable: every delta chain rebuilds
    # A new server on the same tape seals what the dead one left and appends.
    again = start_gymtape_serve(tmp_path, "--engine", "hf", "--model", str(model_dir), "--tape", str(tape), name="again")
    try:
        r = _chat(again.url, 1)
        assert r.status_code == 200
        assert r.json()["id"] in _call_ids(tape)
    finally:
        again.stop()
    assert set(_call_ids(tape)) == set(on_tape) | {r.json()["id"]}


def test_full_disk_answers_503_health_says_so_and_recording_resumes(model_dir: Path, tmp_path: Path,
                                                                   small_disk: Path) -> None:
    tape = small_disk / "tape"
    server: Server = start_gymtape_serve(tmp_path, "--engine", "hf", "--model", str(model_dir), "--tape", str(tape))
    try:
        first = _chat(server.url, 1)
        assert first.status_code == 200
        filler = fill_disk(small_disk)
        failed = _chat(server.url, 2)
        assert failed.status_code == 503, failed.text
        err = failed.json()["error"]
        assert err["code"] == "recording_failed" and "No space left" in err["message"]
        health = httpx.get(f"{server.url}/health").json()
        assert health["status"] == "degraded"
        assert health["recording"]["ok"] is False and health["recording"]["errors"] >= 1
        assert "No space left" in health["recording"]["last_error"]
        filler.unlink()  # space returns
        later = _chat(server.url, 3)
        assert later.status_code == 200, later.text
        health = httpx.get(f"{server.url}/health").json()
        assert health["status"] == "ok" and health["recording"]["ok"] is True
        ids = set(_call_ids(tape))
        assert {first.json()["id"], later.json()["id"]} <= ids, "every answered call is on the tape"
        assert failed.json().get("id") not in ids
    finally:
        server.stop()
    assert {first.json()["id"], later.json()["id"]} <= set(_call_ids(tape))
