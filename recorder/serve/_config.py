"""`gymtape serve`'s settings, importable without the server (FastAPI, transformers).

A program that starts a server as a child process (``gymtape train``, tests) builds one of
these and hands it to :class:`~recorder.ServeProcess`; `gymtape serve`'s flags map onto the
fields one to one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(kw_only=True)
class ServeConfig:
    """Everything `gymtape serve` needs; CLI flags map onto these fields one to one."""

    #: Address to bind; loopback by default (the server executes no code, but it is not hardened).
    host: str = "127.0.0.1"
    port: int = 8000
    #: Tape directory to record every call to; None records nothing.
    tape: Path | None = None
    #: ``hf`` (in-process transformers) or ``vllm`` (a vLLM server over HTTP).
    engine: str = "hf"
    #: hf: checkpoint directory (default: the embedded SmolLM2). vllm: model to start, or to pick at --upstream.
    model: str | None = None
    #: vllm: URL of a running vLLM server; without it a local vLLM is started and supervised.
    upstream: str | None = None
    #: If set, every endpoint but /health requires ``Authorization: Bearer <api_key>``.
    api_key: str | None = None
    #: Tokenizer directory (default: the model's).
    tokenizer: str | None = None
    #: Jinja chat template file overriding the tokenizer's.
    chat_template: str | None = None
    #: End-of-turn token the splice counts (default: the tokenizer's eos token).
    eos_token: str | None = None
    #: How tool calls are parsed from generated text.
    tool_parser: str = "hermes"
    #: Split ``<think>…</think>`` into ``reasoning_content``.
    reasoning: bool = True
    #: hf engine: torch device and dtype.
    device: str = "cpu"
    dtype: str = "float32"
    #: hf: concurrent requests per batch.
    max_batch_size: int = 16
    max_model_len: int | None = None
    #: Name served in responses and /v1/models (default: the engine's).
    served_model_name: str | None = None
    #: Policy version stamped on calls until /admin/weights changes it.
    policy_version: int = 0
    #: Seconds a recorded call may wait in memory before it is written (what a live tape
    #: follower, e.g. `gymtape train`, waits for at most).
    flush_seconds: float = 5.0
    #: vllm: seconds to wait for the upstream's answer before a 504.
    upstream_timeout: float = 600.0
    #: vllm without --upstream: port and log of the supervised vLLM.
    vllm_port: int = 0
    vllm_log: str | None = None
    vllm_args: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["api_key"] = "***" if self.api_key else None
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
