"""A tape's own export, ingested again, pairs rollout for rollout with the tape under `gymtape
diff`, whatever the environment kind: an agent server recorded with `gymtape record
--agent-url` (stored under its CLI name, which the agent's line does not carry), ingested Gym
JSONL (``agent_ref.name``), lines without any env, and rows written through the Python API."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cli import app
from recorder import RolloutRecord, Tape, TapeWriter
from tests.conftest import DEMO_TASKS, ROOT, load_jsonl, wait_until, write_jsonl
from tests.servers import free_port

runner = CliRunner()


@pytest.fixture(scope="module")
def agent() -> Iterator[str]:
    """A real HTTP agent server (tests/recorder/agent_stub.py): POST /run answers a Gym rollout
    line with one model call's token fields and no ``agent_ref``."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.recorder.agent_stub", str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=30, what="the agent stub to answer /health")
        yield url
    finally:
        proc.kill()
        proc.wait()


def _cli(*args: object) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.stdout


def _round_trip(tape: Path, tmp_path: Path) -> tuple[dict, Path, Path]:
    """export -> ingest -> diff (JSON report); also the re-ingested tape's own export."""
    out, back = tmp_path / "export.jsonl", tmp_path / "back"
    _cli("export", tape, "--format", "gym-jsonl", "-o", out)
    _cli("ingest", out, "--tape", back)
    report = json.loads(_cli("diff", tape, back, "--json"))
    again = tmp_path / "export-again.jsonl"
    _cli("export", back, "--format", "gym-jsonl", "-o", again)
    assert again.read_bytes() == out.read_bytes(), "export -> ingest -> export is a fixed point"
    return report, out, back


def _assert_every_rollout_paired_identically(report: dict, rollouts: int) -> None:
    s = report["summary"]
    assert (s["pairs"], s["unmatched_a"], s["unmatched_b"]) == (rollouts, 0, 0), s
    assert s["identical"] == rollouts and s["diverged"] == 0 and s["reward_changed"] == 0


@pytest.mark.parametrize("name", [None, "weather-agent"])
def test_an_agent_tape_and_its_own_export_ingested_pair_one_to_one(agent: str, tmp_path: Path,
                                                                   name: str | None) -> None:
    tape = tmp_path / "tape"
    _cli("record", "--agent-url", agent, "--tasks", DEMO_TASKS, "--tape", tape, "--repeats", "2",
         *(["--name", name] if name else []))
    env = name or "gym_agent"
    rows = Tape(tape).read("rollouts", ["env", "task_index", "rollout_index"]).to_pylist()
    assert len(rows) == 12 and {r["env"] for r in rows} == {env}
    report, out, back = _round_trip(tape, tmp_path)
    lines = load_jsonl(out)
    assert all(line["_gymtape_env"] == env and list(line)[-1] == "_gymtape_env" for line in lines), \
        "the env rides on the exported line under gymtape's own key, after Gym's fields"
    assert all("agent_ref" not in line for line in lines), "Gym's own fields are left as the agent wrote them"
    assert {r["env"] for r in Tape(back).read("rollouts", ["env"]).to_pylist()} == {env}
    _assert_every_rollout_paired_identically(report, 12)


def test_ingested_gym_jsonl_exports_byte_for_byte_and_pairs(make_tape, tmp_path: Path) -> None:
    tape, src = make_tape(repeats=2, calls=2, context_tokens=64)  # lines with agent_ref.name
    report, out, _ = _round_trip(tape, tmp_path)
    assert out.read_bytes() == src.read_bytes(), "no gymtape key where agent_ref already names the env"
    _assert_every_rollout_paired_identically(report, 12)


def test_lines_without_any_env_and_a_line_that_names_its_own(make_rollouts, tmp_path: Path) -> None:
    lines = make_rollouts(repeats=1, calls=1, context_tokens=32)
    for line in lines:
        del line["agent_ref"]
    lines[0]["agent_ref"] = {"name": "named-by-gym"}
    lines[1]["_gymtape_env"] = "named-by-gymtape"  # gymtape's key wins over agent_ref
    lines[1]["agent_ref"] = {"name": "ignored"}
    src = write_jsonl(tmp_path / "src.jsonl", lines)
    _cli("ingest", src, "--tape", tmp_path / "tape")
    envs = [r["env"] for r in Tape(tmp_path / "tape").read("rollouts", ["env"]).to_pylist()]
    assert envs == ["named-by-gym", "named-by-gymtape", None, None, None, None]
    report, out, _ = _round_trip(tmp_path / "tape", tmp_path)
    assert out.read_bytes() == src.read_bytes()
    _assert_every_rollout_paired_identically(report, 6)


def test_rows_written_through_the_api_without_a_gym_line(tmp_path: Path) -> None:
    from recorder import CallRecord

    with TapeWriter(tmp_path / "tape", flush_seconds=None, handle_signals=False) as w:
        for task in range(3):
            rid = f"r{task}"
            w.add_call(CallRecord(rollout_id=rid, call_index=0, prompt_ids=[1, 2, task], generation_ids=[5, 6],
                                  generation_logprobs=[-0.25, -0.5]))
            w.add_rollout(RolloutRecord(rollout_id=rid, env="api-env", task_index=task, rollout_index=0,
                                        reward=float(task)))
    report, out, _ = _round_trip(tmp_path / "tape", tmp_path)
    assert [line["_gymtape_env"] for line in load_jsonl(out)] == ["api-env"] * 3
    _assert_every_rollout_paired_identically(report, 3)
