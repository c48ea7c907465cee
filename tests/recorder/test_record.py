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
    # server_wait=0: an agent that does not answer is gone at once (the default waits 300 s for it)
    report = record(RecordConfig(tape=tmp_path / "t", envs=[env], retries=1, timeout=10, server_wait=0))
    rows = Tape(tmp_path / "t").rollouts().collect()
    assert report.failed == rows.height == 6 and set(rows["status"]) == {"failed"}
    assert all("agent server http://127.0.0.1:9 unreachable" in r for r in rows["status_reason"])


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


def test_a_run_seed_gives_every_rollout_its_own_reproducible_seed(tmp_path: Path) -> None:
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join('{"responses_create_params": {"input": []}, "i": %d}\n' % i for i in range(6)))
    env = EnvConfig(name="a", agent_url="http://x", tasks=tasks, task_indices=[4, 1], repeats=3, seed=5)
    items = work_items([env])
    assert [(i.task_index, i.repeat) for i in items] == [(4, 0), (1, 0), (4, 1), (1, 1), (4, 2), (1, 2)]
    assert [i.task["i"] for i in items] == [4, 1] * 3, "each item carries its own task line"
    seeds = [i.seed for i in items]
    assert len(set(seeds)) == 6 and all(isinstance(s, int) and 0 <= s < 2**31 for s in seeds)
    assert seeds == [i.seed for i in work_items([env])], "the same run seed gives the same rollout seeds"
    other = EnvConfig(name="a", agent_url="http://x", tasks=tasks, task_indices=[4, 1], repeats=3, seed=6)
    assert not set(seeds) & {i.seed for i in work_items([other])}, "another run seed gives other seeds"
    unseeded = EnvConfig(name="a", agent_url="http://x", tasks=tasks)
    assert {i.seed for i in work_items([unseeded])} == {None}


@pytest.mark.parametrize(("kw", "message"), [
    ({"task_indices": [1, 2, 1]}, r"lists \[1\] more than once"),
    ({"task_indices": [-1]}, "integers >= 0"),
    ({"task_indices": [6]}, r"\[6\] are out of range: .* has 6 tasks \(0..5\)"),
    ({"seed": 1, "sampling": {"seed": 2}}, "not both"),
    ({"seed": "1"}, "seed must be an integer"),
])
def test_bad_task_indices_and_seeds_are_refused_by_name(tmp_path: Path, kw: dict[str, object], message: str) -> None:
    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"responses_create_params": {"input": []}}\n' * 6)
    env = EnvConfig(name="a", agent_url="http://127.0.0.1:9", tasks=tasks, **kw)  # type: ignore[arg-type]
    with pytest.raises(RecordConfigError, match=message):
        record(RecordConfig(tape=tmp_path / "t", envs=[env]))
    assert not (tmp_path / "t").exists(), "nothing is recorded from a refused config"


def test_record_seed_flag_samples_the_same_rollouts_again(served: tuple[Server, Path], tmp_path: Path) -> None:
    """`gymtape record --seed` (the CLI) and EnvConfig.seed (the API) sample the same tokens for
    the same (task, repeat); the repeats of a task are sampled differently."""
    from typer.testing import CliRunner

    from cli import app

    server, _ = served
    env = EnvConfig(name="addition", builtin="addition", model_url=f"{server.url}/v1", task_indices=[3, 0], repeats=2,
                    seed=11, sampling={"max_tokens": 8, "temperature": 1.0})
    # one rollout at a time: the engine batches nothing, so the seeded samples are bit-for-bit reproducible
    record(RecordConfig(tape=tmp_path / "api", envs=[env], concurrency=1))
    r = CliRunner().invoke(app, ["record", "--env", "addition", "--model-url", f"{server.url}/v1", "--tape",
                                 str(tmp_path / "cli"), "--task-index", "3", "--task-index", "0", "--repeats", "2",
                                 "--seed", "11", "--max-tokens", "8", "--temperature", "1.0", "--concurrency", "1"])
    assert r.exit_code == 0, r.output

    def generations(tape: Path) -> dict[tuple[int, int], list[int]]:
        from recorder import iter_gym_lines

        return {(ln["_ng_task_index"], ln["_ng_rollout_index"]): ln["response"]["output"][-1]["generation_token_ids"]
                for ln in iter_gym_lines(Tape(tape))}

    api, cli = generations(tmp_path / "api"), generations(tmp_path / "cli")
    assert sorted(api) == [(0, 0), (0, 1), (3, 0), (3, 1)]
    assert api == cli, "same seed, same task and repeat: the same tokens"
    assert len({tuple(g) for g in api.values()}) > 1, "each rollout has its own seed"


def test_record_flags_override_a_config_yaml_only_when_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import recorder
    from typer.testing import CliRunner

    from cli import app

    ran: list[RecordConfig] = []
    monkeypatch.setattr(recorder, "record", lambda cfg, **_: ran.append(cfg) or recorder.RecordReport())
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"tape": "tape", "concurrency": 3, "retries": 0, "model_url": "http://127.0.0.1:9/v1",
                                   "environments": [{"name": "add", "builtin": "addition"}]}))
    r = CliRunner().invoke(app, ["record", "--config", str(cfg), "--retries", "4", "--seed", "9"])
    assert r.exit_code == 0, r.output
    (got,) = ran
    assert (got.concurrency, got.retries) == (3, 4), "the YAML's concurrency stays; --retries was given"
    assert got.envs[0].seed == 9
    r = CliRunner().invoke(app, ["record", "--config", str(cfg), "--repeats", "2", "--task-index", "1"])
    assert r.exit_code == 2 and "--repeats, --task-index:" in r.stderr, r.output
    assert "describe one environment without --config" in r.stderr
