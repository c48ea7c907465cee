"""`gymtape replay --ray`: re-scoring on a real local Ray cluster (2 CPU workers) equals the single-process run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from replay._replay import replay_tape

ray = pytest.importorskip("ray", reason="Ray Data is not installed (pip install 'gymtape[ray]')")

runner = CliRunner()


def _deltas(d: dict[str, Any]) -> dict[tuple[str, int], list[Any]]:
    return {(r["rollout_id"], c["call_index"]): [c["tokens"], c["mean_abs_dlogprob"], c["max_abs_dlogprob"]]
            for r in d["rollouts"] for c in r["calls"]}


@pytest.mark.slow
def test_ray_two_workers_equal_the_single_process_replay(make_tape: Any, model_dir: Path, tmp_path: Path) -> None:
    tape, _ = make_tape(repeats=2, calls=3, context_tokens=40, vocab_size=49152, rewrite_every=3, empty_every=5)
    single = replay_tape(tape, model=model_dir, detail_rollouts=0).to_dict()
    html = tmp_path / "ray.html"
    r = runner.invoke(app, ["replay", str(tape), "--model", str(model_dir), "--ray", "2", "--json",
                            "--html", str(html), "--details", "0"])
    assert r.exit_code == 0, r.output
    spread = json.loads(r.stdout)
    assert spread["overall"]["tokens"] == single["overall"]["tokens"] > 0
    assert [ro["rollout_id"] for ro in spread["rollouts"]] == [ro["rollout_id"] for ro in single["rollouts"]]
    a, b = _deltas(single), _deltas(spread)
    assert a.keys() == b.keys()
    np.testing.assert_allclose(np.array(list(b.values()), float), np.array(list(a.values()), float), atol=1e-6)
    for key, value in single["overall"].items():
        assert spread["overall"][key] == pytest.approx(value, abs=1e-6), key
    assert [w["token_id"] for w in spread["worst_tokens"]] == [w["token_id"] for w in single["worst_tokens"]]
    assert html.read_text().startswith("<!DOCTYPE html>")
    assert not ray.is_initialized(), "the local cluster started for the run is shut down after it"


def test_ray_needs_a_model_directory_and_workers(make_tape: Any, model_dir: Path) -> None:
    tape, _ = make_tape(repeats=1, calls=1)
    r = runner.invoke(app, ["replay", str(tape), "--engine-url", "http://127.0.0.1:9", "--ray", "2"])
    assert r.exit_code == 2 and "--ray" in r.output
    r = runner.invoke(app, ["replay", str(tape), "--model", str(model_dir), "--ray", "0"])
    assert r.exit_code == 2 and "at least 1 worker" in r.output
