"""`gymtape record`: built-in environments through gymtape serve, joins, resume after SIGKILL, failures."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from recorder import Tape
from recorder.collect._collector import EnvConfig, RecordConfig, RecordConfigError, load_config, record, work_items
from tests.conftest import wait_until
from tests.servers import ROOT, Server, start_gymtape_serve


@pytest.fixture(scope="module")
def served(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """gymtape serve with the embedded model, recording into a shared tape."""
    tmp = tmp_path_factory.mktemp("record")
    tape = tmp / "tape"
    server = start_gymtape_serve(tmp, "--engine", "hf", "--model", str(model_dir), "--tape", str(tape))
    yield server, tape
    server.stop()


def _env(server: Server, name: str = "calculator", **kw: object) -> EnvConfig:
    return EnvConfig(name=name, builtin=name, model_url=f"{server.url}/v1", sampling={"max_tokens": 6}, **kw)  # type: ignore[arg-type]


def test_builtin_envs_through_gymtape_serve_join_its_calls(served: tuple[Server, Path]) -> None:
    server, tape = served
    report = record(RecordConfig(tape=tape, envs=[_env(server, "calculator"), _env(server, "addition")],
                                 concurrency=4, limit=6))
    assert report.done == 6 and report.failed == 0 and report.joined == 6
    assert httpx.get(f"{server.url}/health").json()["recording"]["errors"] == 0
    t = Tape(tape)
    rollouts = t.rollouts().collect()
    assert rollouts.height == 6 and set(rollouts["env"]) == {"calculator", "addition"}
    assert rollouts["reward"].null_count() == 0


def test_recorder_writes_calls_itself_when_the_server_records_elsewhere(served: tuple[Server, Path],
                                                                       tmp_path: Path) -> None:
    server, tape = served
    sub = tmp_path / "own"
    # Same run against the same server but a different tape: calls must be written by the recorder itself.
    report = record(RecordConfig(tape=sub, envs=[_env(server, "addition")], concurrency=2, limit=3))
    assert report.joined == 0 and report.done == 3
    t = Tape(sub)
    assert t.calls().collect().height == 3, "not joined: the recorder writes the calls"
    from recorder import iter_gym_lines

    lines = list(iter_gym_lines(t))
    assert all(it.get("generation_token_ids") for ln in lines for it in ln["response"]["output"][-1:])


def test_work_items_interleave_by_weight_deterministically(tmp_path: Path) -> None:
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join('{"responses_create_params": {"input": []}, "i": %d}\n' % i for i in range(6)))
    a = EnvConfig(name="a", agent_url="http://x", tasks=tasks, weight=2.0)
    b = EnvConfig(name="b", agent_url="http://x", tasks=tasks, weight=1.0, repeats=2)
    items = work_items([a, b])
    assert len(items) == 6 + 12
    assert [i.env.name for i in items[:9]].count("a") == 6, "a has twice b's weight: 2 of every 3 items early on"
    assert items == work_items([a, b])
    assert {(i.env.name, i.task_index, i.repeat) for i in items} == \
        {("a", t, 0) for t in range(6)} | {("b", t, r) for t in range(6) for r in range(2)}


def test_config_yaml_lists_envs_and_select_picks(tmp_path: Path, served: tuple[Server, Path]) -> None:
    server, _ = served
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "tape": "out/tape", "concurrency": 3, "model_url": f"{server.url}/v1",
        "environments": [
            {"name": "calc", "builtin": "calculator", "repeats": 2, "sampling": {"temperature": 0.7}},
            {"name": "add", "builtin": "addition", "weight": 3},
            {"name": "gym", "agent_url": "http://127.0.0.1:9", "tasks": str(ROOT / "datasets" / "demo_tasks.jsonl")},
        ]}))
    c = load_config(cfg, select=["calc", "gym"])
    assert [e.name for e in c.envs] == ["calc", "gym"] and c.tape == tmp_path / "out" / "tape" and c.concurrency == 3
    assert c.envs[0].sampling == {"temperature": 0.7} and c.envs[0].model_url == f"{server.url}/v1"
    with pytest.raises(RecordConfigError, match="nope"):
        load_config(cfg, select=["nope"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"environments": [{"name": "x", "builtin": "nonexistent", "model_url": "u"}]}))
    with pytest.raises(RecordConfigError, match="no built-in environment"):
        record(load_config(bad, tape=tmp_path / "t"))


def test_unreachable_agent_is_recorded_as_failed_not_dropped(tmp_path: Path) -> None:
    tasks = ROOT / "datasets" / "demo_tasks.jsonl"
    env = EnvConfig(name="down", agent_url="http://127.0.0.1:9", tasks=tasks)
    report = record(RecordConfig(tape=tmp_path / "t", envs=[env], retries=1, timeout=10))
    rows = Tape(tmp_path / "t").rollouts().collect()
    assert report.failed == rows.height == 6 and set(rows["status"]) == {"failed"}
    assert all("127.0.0.1:9" in r for r in rows["status_reason"])


# Long enough (about 20 s on 2 cores) that the kill lands after the first 5-second flush and well
# before the end, on a quiet machine or a busy one.
LIMIT = 160


def test_sigkilled_record_resumes_to_every_pair_exactly_once(served: tuple[Server, Path], tmp_path: Path) -> None:
    server, _ = served
    tape = tmp_path / "tape"
    exe = Path(sys.executable).with_name("gymtape")
    args = [str(exe), "record", "--env", "addition", "--model-url", f"{server.url}/v1", "--tape", str(tape),
            "--max-tokens", "4", "--concurrency", "2", "--limit", str(LIMIT)]
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def visible() -> int:
        try:
            return Tape(tape).rollouts().collect().height
        except Exception:
            return 0

    wait_until(lambda: visible() >= 6 or child.poll() is not None, timeout=300, what="6 recorded rollouts")
    child.kill()
    child.wait()
    before = Tape(tape).rollouts().select("rollout_id", "task_index").collect()
    assert 0 < before.height < LIMIT, "the kill must land mid-run for this test to mean anything"
    subprocess.run(args + ["--resume"], check=True, capture_output=True, timeout=600)
    after = Tape(tape).rollouts().collect()
    keys = after.select("env", "task_index", "rollout_index").rows()
    assert len(keys) == len(set(keys)) == LIMIT, "every (env, task, repeat) exactly once"
    assert set(before["rollout_id"]) <= set(after["rollout_id"]), "rollouts recorded before the kill are kept"
