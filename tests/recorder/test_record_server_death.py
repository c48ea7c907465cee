"""`gymtape record` against a `gymtape serve` (hf engine, embedded model) that is SIGKILLed mid-run.

Real processes throughout: the server, the recorder (the `gymtape` CLI) and `gymtape check`.
* The server comes back within ``--server-wait``: the recorder waits for it (a clear message),
  and the run ends with every (task, repeat) exactly once and no failed row.
* The server stays away past ``--server-wait``: the remaining work is recorded as failed with the
  reason; once the server is back, ``--resume --retry-failed`` runs it again, the new rows
  supersede the failed ones, and no rollout points at missing calls (`gymtape check` agrees).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from recorder import Tape, read_integrity
from tests.conftest import wait_until
from tests.servers import Server, free_port, start

GYMTAPE = str(Path(sys.executable).with_name("gymtape"))


def _serve(model_dir: Path, tmp: Path, tape: Path, port: int, name: str) -> Server:
    return start([GYMTAPE, "serve", "--port", str(port), "--engine", "hf", "--model", str(model_dir), "--tape",
                  str(tape)], tmp / f"{name}.log", port, timeout=300)


def _kill(server: Server) -> None:
    os.killpg(server.proc.pid, signal.SIGKILL)  # the server and anything it started: no clean shutdown
    server.proc.wait()


def _calls_on(tape: Path) -> int:
    try:
        return Tape(tape).read("calls", ["rollout_id"]).num_rows
    except Exception:  # noqa: BLE001 - the tape may not exist yet
        return 0


def _record(tape: Path, port: int, limit: int, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    args = [GYMTAPE, "record", "--env", "addition", "--model-url", f"http://127.0.0.1:{port}/v1", "--tape", str(tape),
            "--max-tokens", "4", "--concurrency", "2", "--limit", str(limit), *extra]
    with open(log, "wb") as f:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=f)


def _current_keys(tape: Path) -> tuple[list[tuple[object, ...]], list[str], int]:
    """(env, task, repeat) of the rows that count, their statuses, and how many rows are broken."""
    rows, integrity = read_integrity(Tape(tape))
    keep = integrity.current
    keys = list(zip(*(rows.column(c).to_pylist() for c in ("env", "task_index", "rollout_index"))))
    statuses = rows.column("status").to_pylist()
    return ([k for k, c in zip(keys, keep) if c], [s for s, c in zip(statuses, keep) if c],
            int(integrity.broken.sum()))


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def test_a_server_killed_and_restarted_mid_record_costs_no_failed_rows(model_dir: Path, tmp: Path) -> None:
    tape, port, limit = tmp / "tape", free_port(), 30
    server = _serve(model_dir, tmp, tape, port, "serve1")
    log = tmp / "record.log"
    child = _record(tape, port, limit, log)
    try:
        wait_until(lambda: _calls_on(tape) >= 4 or child.poll() is not None, timeout=600, what="4 recorded calls")
        assert child.poll() is None, "the recorder must still be running when the server dies"
        _kill(server)
        wait_until(lambda: b"unreachable" in log.read_bytes() or child.poll() is not None, timeout=120,
                   what="the recorder to notice the server is gone")
        assert child.poll() is None, f"the recorder gave up instead of waiting:\n{log.read_text()}"
        server = _serve(model_dir, tmp, tape, port, "serve2")  # same port, same tape
        assert child.wait(timeout=1200) == 0, log.read_text()
    finally:
        if child.poll() is None:
            child.kill()
        server.stop()
    text = log.read_text()
    assert f"model server http://127.0.0.1:{port}/v1 unreachable" in text and "waiting up to 300 s" in text, text
    assert "is back after" in text, text
    keys, statuses, broken = _current_keys(tape)
    assert len(keys) == len(set(keys)) == limit, "every (env, task, repeat) exactly once"
    assert "failed" not in statuses, f"a server restart must not leave failed rows:\n{text}"
    assert broken == 0, "no rollout row may point at calls that are not on the tape"


def test_a_server_gone_past_server_wait_then_retry_failed_completes_every_pair(model_dir: Path, tmp: Path) -> None:
    tape, port, limit = tmp / "tape", free_port(), 20
    server = _serve(model_dir, tmp, tape, port, "serve1")
    log = tmp / "record.log"
    child = _record(tape, port, limit, log, "--server-wait", "1")
    try:
        wait_until(lambda: _calls_on(tape) >= 4 or child.poll() is not None, timeout=600, what="4 recorded calls")
        assert child.poll() is None, "the recorder must still be running when the server dies"
        _kill(server)
        assert child.wait(timeout=120) == 0, log.read_text()
    finally:
        if child.poll() is None:
            child.kill()
    text = log.read_text()
    assert "did not come back within 1 s" in text, text
    rows = Tape(tape).read("rollouts", ["status", "status_reason"]).to_pylist()
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and len(rows) == limit, "the remaining work is recorded as failed, not dropped"
    assert all(f"http://127.0.0.1:{port}/v1 unreachable for 1 s" in r["status_reason"] for r in failed)

    server = _serve(model_dir, tmp, tape, port, "serve2")
    try:
        retry_log = tmp / "retry.log"
        child = _record(tape, port, limit, retry_log, "--resume", "--retry-failed")
        assert child.wait(timeout=1200) == 0, retry_log.read_text()
    finally:
        if child.poll() is None:
            child.kill()
        server.stop()
    assert f"{len(failed)} rollout(s) that failed or lost calls run again" in retry_log.read_text()
    keys, statuses, broken = _current_keys(tape)
    assert len(keys) == len(set(keys)) == limit, "every (env, task, repeat) exactly once among the rows that count"
    assert "failed" not in statuses and broken == 0
    rows, integrity = read_integrity(Tape(tape))
    assert int(integrity.superseded.sum()) == len(failed), "each failed row is superseded by its retry"
    check = subprocess.run([GYMTAPE, "check", str(tape), "--json"], capture_output=True, timeout=600)
    report = orjson.loads(check.stdout)
    assert report["rollouts_missing_calls"] == 0 and report["rollouts_incomplete"] == 0, report["broken_rollouts"]
    assert report["rollouts_superseded"] == len(failed)
    # Retokenization findings are left out: they depend on what the model sampled (a sampled "\n", "\n"
    # re-encodes as one "\n\n"), not on the server's death; everything about the tape's integrity is in.
    integrity_problems = {k: n for k, n in report["totals"].items() if k != "retokenization"}
    assert set(integrity_problems.values()) == {0}, report["totals"]
    assert check.returncode == (0 if report["totals"]["retokenization"] == 0 else 1), report["totals"]


def test_record_waits_for_an_agent_server_that_comes_up_late(tmp: Path) -> None:
    """Down at the start, up seconds later: the recorder waits (bounded backoff, a message) and
    records every rollout; nothing is written as failed."""
    from tests.conftest import DEMO_TASKS, ROOT

    port = free_port()
    log = tmp / "record.log"
    with open(log, "wb") as f:
        child = subprocess.Popen([GYMTAPE, "record", "--agent-url", f"http://127.0.0.1:{port}", "--tasks",
                                  str(DEMO_TASKS), "--tape", str(tmp / "tape"), "--retries", "0"],
                                 stdout=subprocess.DEVNULL, stderr=f)
    agent = None
    try:
        wait_until(lambda: b"waiting up to 300 s" in log.read_bytes() or child.poll() is not None, timeout=120,
                   what="the recorder to wait for the agent")
        assert child.poll() is None, log.read_text()
        agent = subprocess.Popen([sys.executable, "-m", "tests.recorder.agent_stub", str(port)], cwd=ROOT)
        assert child.wait(timeout=300) == 0, log.read_text()
    finally:
        for p in (child, agent):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    text = log.read_text()
    assert f"agent server http://127.0.0.1:{port} unreachable" in text and "is back after" in text, text
    rows = Tape(tmp / "tape").read("rollouts", ["status"]).column("status").to_pylist()
    assert len(rows) == 6 and set(rows) == {"ok"}, "every rollout recorded once, none failed, with --retries 0"


def test_retry_failed_needs_resume_and_server_wait_cannot_be_negative(tmp: Path) -> None:
    from typer.testing import CliRunner

    from cli import app
    from recorder import EnvConfig, RecordConfig, RecordConfigError, record
    from tests.conftest import DEMO_TASKS

    env = EnvConfig(name="a", agent_url="http://127.0.0.1:9", tasks=DEMO_TASKS)
    with pytest.raises(RecordConfigError, match="--retry-failed .* give --resume too"):
        record(RecordConfig(tape=tmp / "t", envs=[env], retry_failed=True))
    with pytest.raises(RecordConfigError, match="server_wait must be >= 0 seconds, got -1"):
        record(RecordConfig(tape=tmp / "t", envs=[env], server_wait=-1))
    r = CliRunner().invoke(app, ["record", "--agent-url", "http://127.0.0.1:9", "--tasks", str(DEMO_TASKS), "--tape",
                                 str(tmp / "t"), "--retry-failed"])
    assert r.exit_code == 2 and "give --resume too" in r.stderr, r.output
    assert not (tmp / "t").exists(), "nothing is recorded from a refused config"
