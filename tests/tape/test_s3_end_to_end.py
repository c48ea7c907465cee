"""Record on one machine, publish to object storage, replay from another: a tape recorded by
`gymtape serve` + `gymtape record` is compacted to a real S3 API server and read back from s3://
by inspect, check, replay, diff, export and a TapeDataset epoch, each against the local copy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from recorder import Tape
from tests.servers import ROOT, start_gymtape_serve
from trainer_bridge import TapeDataset, TapeFilters

GYMTAPE = str(Path(sys.executable).with_name("gymtape"))
ROLLOUTS = 4


def _gymtape(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GYMTAPE, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _json(*args: str, ok: tuple[int, ...] = (0,)) -> dict[str, Any]:
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code in ok, f"gymtape {' '.join(args)} exited {r.exit_code}: {r.stderr}"
    return json.loads(r.stdout)


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


@pytest.fixture(scope="module")
def recorded(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tape recorded by gymtape serve (hf engine, the embedded model) and gymtape record --env addition."""
    tmp = tmp_path_factory.mktemp("e2e")
    tape = tmp / "tape"
    server = start_gymtape_serve(tmp, "--engine", "hf", "--model", str(model_dir), "--tape", str(tape),
                                 "--flush-seconds", "0.5")
    try:
        r = _gymtape("record", "--tape", str(tape), "--env", "addition", "--model-url", f"{server.url}/v1",
                     "--limit", str(ROLLOUTS), "--max-tokens", "8", "--concurrency", "2")
        assert r.returncode == 0, r.stderr
    finally:
        server.stop()
    assert Tape(tape).writers(), f"serve did not close its tape writer:\n{server.log_tail()}"
    return tape


@pytest.mark.usefixtures("s3_server")
def test_a_served_and_recorded_tape_compacted_to_s3_reads_back_like_the_local_copy(recorded: Path,
                                                                                   s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/run1"
    local = Tape(recorded)
    assert len(local.shards("calls")) > 1, "live capture writes many small shards"
    r = _gymtape("compact", str(recorded), "--to", url)  # a separate process: only the environment names the endpoint
    assert r.returncode == 0 and f"-> {url}" in r.stderr, r.stderr

    remote, here = _json("inspect", url), _json("inspect", str(recorded))
    assert remote["tape"] == url and remote["rollouts"] == ROLLOUTS
    assert _without(remote, "tape", "shards", "tape_bytes", "compression_ratio") == \
        _without(here, "tape", "shards", "tape_bytes", "compression_ratio")
    assert {t: v["count"] for t, v in remote["shards"].items()} == {"calls": 1, "rollouts": 1}
    assert remote["tape_bytes"] < here["tape_bytes"], "one compacted shard per table is smaller than many"

    checked = [_json("check", where, ok=(0, 1)) for where in (url, str(recorded))]
    assert _without(checked[0], "tape", "elapsed_s") == _without(checked[1], "tape", "elapsed_s"), \
        "check finds the same on both copies"

    replayed = [_json("replay", where) for where in (url, str(recorded))]
    assert replayed[0]["tape"] == url
    assert replayed[0]["overall"] == replayed[1]["overall"], "re-scoring the S3 copy gives the same metrics"

    diff = _json("diff", url, str(recorded))
    s = diff["summary"]
    assert (s["pairs"], s["identical"], s["diverged"], s["unmatched_a"], s["unmatched_b"]) == (ROLLOUTS, ROLLOUTS, 0, 0, 0)
    assert s["shared_changed_tokens"] == 0 and s["reward_changed"] == 0, s

    exported = []
    for where, name in ((url, "s3.jsonl"), (str(recorded), "local.jsonl")):
        r = CliRunner().invoke(app, ["export", where, "--format", "gym-jsonl", "-o", str(recorded.parent / name)])
        assert r.exit_code == 0, r.stderr
        exported.append((recorded.parent / name).read_bytes())
    assert exported[0] == exported[1] and exported[0].count(b"\n") == ROLLOUTS

    every = TapeFilters(status=None)  # 8 max tokens: the episodes are truncated, still sequences to pack
    batches = [list(TapeDataset(where, token_budget=256, seed=3, filters=every)) for where in (url, str(recorded))]
    assert len(batches[0]) == len(batches[1]) > 0
    for a, b in zip(*batches):
        assert a.sequence_ids == b.sequence_ids
        torch.testing.assert_close(a.input_ids, b.input_ids, msg="an epoch from S3 packs the same tokens")
        for key in a.extras:
            torch.testing.assert_close(a.extras[key], b.extras[key], msg=f"{key} differs between the copies")
