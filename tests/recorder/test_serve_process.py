"""`ServeProcess`: `gymtape serve` for a ServeConfig as a child, settings passed one to one."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest

from recorder import ServeConfig, ServeProcess, ServeProcessError, Tape


def test_the_child_serves_exactly_the_config_it_was_given(model_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative tape path means the caller's directory, as for `gymtape serve`
    config = ServeConfig(port=0, tape=Path("tape"), model=str(model_dir), served_model_name="smol-test",
                         policy_version=7, api_key="k3y", max_batch_size=4, flush_seconds=0.2)
    with ServeProcess(config, log=tmp_path / "logs" / "serve.log") as server:
        server.wait_ready(timeout=180)
        assert server.config.port != 0 and server.url.endswith(f":{server.config.port}"), "port 0: a free one"
        health = httpx.get(f"{server.url}/health").json()
        assert health["policy_version"] == 7 and health["recording"]["tape"] == str(tmp_path / "tape")
        assert httpx.get(f"{server.url}/v1/models").status_code == 401, "the api_key reached the child"
        models = httpx.get(f"{server.url}/v1/models", headers={"authorization": "Bearer k3y"}).json()
        assert models["data"][0]["id"] == "smol-test"
        assert server.load_weights(model_dir) == 8, "/admin/weights loads and bumps the version"
        written = orjson.loads((tmp_path / "logs" / "serve.json").read_bytes())
        assert written["api_key"] is None, "the key travels in the environment, never in the saved config"
        assert ServeConfig.from_dict(written) == ServeConfig(**{**config.__dict__, "port": server.config.port,
                                                                "api_key": None})
        server.check_alive()
    assert server.proc.returncode is not None, "leaving the block stops the child"
    with pytest.raises(ServeProcessError, match="died"):
        server.check_alive()
    assert Tape(tmp_path / "tape").meta is not None, "the child wrote its tape where the config said"


def test_a_child_that_cannot_start_is_an_error_with_its_log(tmp_path: Path) -> None:
    server = ServeProcess(ServeConfig(port=0, engine="nope"), log=tmp_path / "serve.log")
    with pytest.raises(ServeProcessError, match=r"(?s)exited with [^0].*engine must be hf or vllm, got 'nope'") as e:
        server.wait_ready(timeout=120)
    assert str(tmp_path / "serve.log") in str(e.value)
    assert server.proc.poll() is not None


def _slice_ns(pid: int, tid: int) -> int | None:
    for line in Path(f"/proc/{pid}/task/{tid}/sched").read_text().splitlines():
        if line.startswith("se.slice"):
            return int(line.split(":")[1])
    return None


def test_the_threads_every_call_waits_on_run_with_a_short_scheduler_slice(model_dir: Path, tmp_path: Path) -> None:
    """Event loop, both prompt workers and the committer ask for a 0.1 ms slice (see _sched): on a
    busy host each wakes at once instead of waiting out another task's slice."""
    import threading

    from recorder.serve._sched import SHORT_SLICE_NS, ask_for_short_slice
    from recorder.serve._server import PROMPT_THREADS

    took: list[bool] = []
    probe = threading.Thread(target=lambda: took.append(ask_for_short_slice()))
    probe.start()
    probe.join()
    if not took[0] or not Path("/proc/self/sched").exists():
        pytest.skip("this kernel has no per-thread slice (EEVDF sched_runtime, Linux >= 6.12)")
    config = ServeConfig(port=0, tape=tmp_path / "tape", model=str(model_dir))
    with ServeProcess(config, log=tmp_path / "serve.log") as server:
        server.wait_ready(timeout=180)
        pid = server.proc.pid
        slices = {int(t.name): _slice_ns(pid, int(t.name)) for t in Path(f"/proc/{pid}/task").iterdir()}
    assert slices[pid] == SHORT_SLICE_NS, "the event loop's thread"
    short = [tid for tid, ns in slices.items() if ns == SHORT_SLICE_NS]
    assert len(short) == 1 + PROMPT_THREADS + 1, (
        f"event loop, {PROMPT_THREADS} prompt workers, committer; got {len(short)} of {len(slices)} threads")
