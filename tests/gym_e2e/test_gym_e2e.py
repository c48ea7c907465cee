"""End to end with the real NeMo Gym (nemo-gym 0.4.0): Gym's example_single_tool_call environment,
Gym's training model server (vllm_model_for_training.yaml) pointed at `gymtape serve` with the
embedded model, `gymtape record` driving Gym's agent /run, and `gym eval run` output ingested.

Run by `make test-gym` (which installs .venv-gym); skipped when that venv is absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from recorder import Tape, ingest_gym_jsonl
from recorder.serve._call_log import call_key
from tests.servers import ROOT, Server, start_gymtape_serve

pytestmark = pytest.mark.gym
GYM_VENV = Path(os.environ.get("GYMTAPE_GYM_VENV", ROOT / ".venv-gym"))
HARNESS = ROOT / "tests" / "gym_e2e" / "gym_env.sh"
REPEATS = 2
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def gym_stack(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str, Path, Path]]:
    if not (GYM_VENV / "bin" / "gym").exists():
        msg = f"NeMo Gym venv not found at {GYM_VENV}: run `make test-gym`"
        if os.environ.get("GYMTAPE_REQUIRE_GYM"):
            pytest.fail(msg)
        pytest.skip(msg)
    tmp = tmp_path_factory.mktemp("gym")
    tape = tmp / "tape"
    server = start_gymtape_serve(tmp, "--engine", "hf", "--model", str(model_dir), "--tape", str(tape),
                                 "--served-model-name", "policy")
    logdir = tmp / "gymlogs"
    try:
        started = subprocess.run(["bash", str(HARNESS), "start", str(GYM_VENV), f"{server.url}/v1", "policy",
                                  str(logdir)], capture_output=True, text=True, timeout=600)
        assert started.returncode == 0, f"gym env start failed:\n{started.stderr[-3000:]}"
        yield server, started.stdout.strip().splitlines()[-1], tape, logdir
    finally:
        stopped = subprocess.run(["bash", str(HARNESS), "stop", str(logdir)], capture_output=True, text=True,
                                 timeout=300)
        server.stop()
        # A stop that fails leaves Gym's servers and Ray running after the tests: say so.
        assert stopped.returncode == 0, f"gym_env.sh stop failed:\n{stopped.stderr[-3000:]}"


def gym_example_tasks() -> Path:
    out = subprocess.run([str(GYM_VENV / "bin" / "python"), "-c",
                          "import resources_servers, pathlib; print(pathlib.Path(resources_servers.__path__[0]))"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip()) / "example_single_tool_call" / "data" / "example.jsonl"


def test_record_through_real_gym_joins_server_calls_and_ingested_eval_matches(
        gym_stack: tuple[Server, str, Path, Path], tmp_path: Path) -> None:
    server, agent_url, tape, logdir = gym_stack
    tasks = gym_example_tasks()
    n_tasks = sum(1 for line in tasks.read_bytes().splitlines() if line.strip())
    exe = Path(sys.executable).with_name("gymtape")
    rec = subprocess.run([str(exe), "record", "--agent-url", agent_url, "--tasks", str(tasks), "--tape", str(tape),
                          "--repeats", str(REPEATS), "--concurrency", "4", "--max-tokens", str(MAX_TOKENS),
                          "--temperature", "1.0", "--server-url", server.url, "--timeout", "900"],
                         capture_output=True, text=True, timeout=1800)
    assert rec.returncode == 0, rec.stderr[-3000:]
    assert f"joined with server calls {n_tasks * REPEATS}" in rec.stderr, rec.stderr[-2000:]

    # gym eval run over the same tasks, through the same server (its calls land on the tape too)
    eval_out = tmp_path / "eval" / "rollouts.jsonl"
    eval_out.parent.mkdir()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "UV_PYTHON_DOWNLOADS": "never"}
    ev = subprocess.run([str(GYM_VENV / "bin" / "gym"), "eval", "run", "--no-serve", "--agent",
                         "example_single_tool_call_simple_agent", "--input", str(tasks), "--output", str(eval_out),
                         "--limit", "4", "--max-output-tokens", str(MAX_TOKENS), "--temperature", "1.0",
                         "+head_server.host=127.0.0.1", "+head_server.port=11000"],
                        cwd=tmp_path / "eval", env=env, capture_output=True, text=True, timeout=1800)
    assert ev.returncode == 0, ev.stderr[-3000:]
    server.stop()  # closes the tape writer: every call is on the tape now

    t = Tape(tape)
    rollouts = t.rollouts().collect()
    keys = rollouts.select("task_index", "rollout_index").rows()
    assert sorted(keys) == [(ti, r) for ti in range(n_tasks) for r in range(REPEATS)], "every rollout exactly once"
    assert rollouts["reward"].null_count() == 0 and set(rollouts["status"]) <= {"ok", "truncated"}

    # Calls: the server's rows, not duplicated; prompts rebuild to what the server generated from.
    calls = t.calls().collect()
    assert calls["call_id"].n_unique() == calls.height
    joined = set(rollouts["rollout_id"])
    assert joined <= set(calls["rollout_id"]), "each recorded rollout points at the server's calls"
    prompts = t.prompts()
    server_calls = {call_key(prompts[row["call_id"]], row["generation_ids"]): row
                    for row in calls.iter_rows(named=True)}

    # The exported Gym lines carry exactly the server's token fields, i.e. Gym round-tripped them.
    from recorder import iter_gym_lines

    exported = list(iter_gym_lines(t))
    assert len(exported) == n_tasks * REPEATS
    for line in exported:
        assert line["reward"] is not None

    # gym eval run output, ingested: its token data is the server's, call for call.
    ingested = ingest_gym_jsonl([eval_out], tmp_path / "ingested", strict=True)
    assert ingested.rollouts == 4 and ingested.token_status.get("ok") == 4
    n = 0
    for line in (orjson.loads(x) for x in eval_out.read_bytes().splitlines() if x.strip()):
        for item in line["response"]["output"]:
            if "generation_token_ids" not in item:
                continue
            row = server_calls.get(call_key(item["prompt_token_ids"], item["generation_token_ids"]))
            assert row is not None, "Gym's token IDs must be exactly the ones the server generated"
            assert np.array_equal(np.float32(item["generation_log_probs"]), np.float32(row["generation_logprobs"]))
            n += 1
    assert n >= 4
