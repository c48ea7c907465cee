"""`gymtape train --ab`, smoke-sized: both arms from one seed on the multi-turn `followup` env
with Qwen3's non-thinking template (the generation prompt pre-fills an empty think block that
the history rendering drops). The re-templating arm splits its two-call rollouts and its
trainer drifts from the sampler; the splice arm has neither. (The full-size report is
docs/on-policy-ab.md.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app

pytestmark = pytest.mark.slow


def test_ab_smoke_retemplating_splits_and_drifts_while_the_splice_does_neither(tmp_path: Path,
                                                                                model_dir: Path) -> None:
    report = tmp_path / "ab.md"
    result = CliRunner().invoke(app, [
        "train", "--ab", "--ab-report", str(report), "--out", str(tmp_path / "runs"), "--env", "followup",
        "--model", str(model_dir), "--chat-template", "qwen3_nothink.jinja", "--steps", "1",
        "--groups-per-step", "2", "--group-size", "4", "--val-every", "0", "--val-tasks", "1",
        "--concurrency", "16", "--threads", "1", "--seed", "0", "--lr", "1e-5", "--no-plot"])
    assert result.exit_code == 0, result.output
    text = report.read_text()
    assert report.with_suffix(".png").stat().st_size > 1000
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
             for line in text.splitlines() if line.startswith("| ") and line.count("|") == 4}
    splits = table["sequences split off by a history rewrite (tape)"]
    history = table["`check`: history problems (prompt does not extend the previous context)"]
    k3 = table["k3, worst step"]
    assert splits[0] == "0" and int(splits[1]) > 0, table
    assert history[0] == "0" and int(history[1]) > 0, table
    assert float(k3[0]) < 1e-8 < 1e-4 < float(k3[1]), table  # the floor against a real drift
    assert (tmp_path / "runs" / "splice" / "metrics.jsonl").is_file()
    assert (tmp_path / "runs" / "retemplate" / "metrics.jsonl").is_file()
