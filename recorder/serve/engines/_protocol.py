"""The one small interface every generation engine implements.

An engine turns prompt token IDs + sampling parameters into generated token IDs + the
logprob of each. Everything about chat, templates and tokens-as-text lives above it, in the
server, so engines stay interchangeable (in-process transformers, a vLLM server over HTTP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-request sampling, in vLLM's conventions."""

    max_tokens: int
    temperature: float = 1.0
    #: 1.0 disables nucleus sampling.
    top_p: float = 1.0
    #: 0 or -1 disables top-k.
    top_k: int = -1
    #: None: unseeded (non-reproducible) sampling.
    seed: int | None = None
    #: Generation stops after any of these tokens (the token is included in the output).
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    #: Logprob of each generated token, of the kind the engine's ``logprobs_kind`` names.
    logprobs: list[float]
    #: ``stop`` (a stop token was generated; it is the last of ``token_ids``) or ``length``.
    finish_reason: str


class EngineError(Exception):
    """The engine could not generate; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 500, type: str = "engine_error") -> None:
        super().__init__(message)
        self.status = status
        self.type = type


@runtime_checkable
class Engine(Protocol):
    #: ``hf`` or ``vllm``; recorded in every call row.
    name: str
    #: The model name recorded in call rows and listed by /v1/models.
    model_name: str
    #: ``raw`` (model distribution) or ``processed`` (after temperature/top-p/top-k).
    logprobs_kind: str
    #: Longest prompt + generation the engine accepts.
    max_model_len: int

    async def start(self) -> None: ...

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation: ...

    async def load_weights(self, path: str) -> None:
        """Load new policy weights (a save_pretrained directory); raise EngineError if unsupported."""
        ...

    async def aclose(self) -> None: ...
