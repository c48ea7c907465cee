"""The gymtape command, run as users run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from cli import app
from tests.conftest import DEMO_TASKS, load_jsonl

runner = CliRunner()


def _run(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def test_synth_ingest_inspect_export_pipeline(tmp_path: Path) -> None:
    src, tape, out = tmp_path / "r.jsonl", tmp_path / "tape", tmp_path / "back.jsonl"
    code, _, err = _run("synth", DEMO_TASKS, "-o", src, "--repeats", "2", "--calls", "3", "--empty-every", "4")
    assert code == 0, err
    code, _, err = _run("ingest", src, "--tape", tape)
    assert code == 0 and "ingested 12 rollouts, 36 calls from 12 lines" in err and "empty=3" in err
    code, stdout, err = _run("inspect", tape, "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["rollouts"] == 12 and summary["calls"] == 36
    assert summary["token_status"] == {"empty": 3, "ok": 9}
    assert summary["gym_jsonl_bytes"] == src.stat().st_size, "the equivalent JSONL is sized exactly"
    assert summary["num_groups"] == 6 and all(g["rollouts"] == 2 for g in summary["groups"])
    code, stdout, _ = _run("inspect", tape)
    assert code == 0 and "reward by group" in stdout and "equivalent Gym JSONL bytes" in stdout
    code, _, _ = _run("export", tape, "--format", "gym-jsonl", "-o", out)
    assert code == 0 and out.read_bytes() == src.read_bytes()


def test_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    code, _, err = _run("inspect", tmp_path)
    assert code == 2 and "is not a tape" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"response": {"output": [{"generation_token_ids": [1]}]}}\n')
    code, _, err = _run("ingest", bad, "--tape", tmp_path / "t", "--strict")
    assert code == 2 and "bad.jsonl:1:" in err and "prompt_token_ids" in err


def test_malformed_lines_are_listed_when_skipped(tmp_path: Path) -> None:
    src = tmp_path / "r.jsonl"
    src.write_text("not json\n{}\n")
    code, _, err = _run("ingest", src, "--tape", tmp_path / "t")
    assert code == 0 and "r.jsonl:1:" in err and "malformed: 1" in err


def test_console_script_is_installed(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("gymtape")
    r = subprocess.run([str(exe), "export", "--help"], capture_output=True, text=True, check=True)
    assert "gym-jsonl" in r.stdout
    assert load_jsonl(DEMO_TASKS), "bundled demo tasks are present"
