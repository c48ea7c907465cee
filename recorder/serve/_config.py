"""`gymtape serve`'s settings, importable without the server (FastAPI, transformers).

A program that starts a server as a child process (``gymtape train``, tests) builds one of
these and hands it to :class:`~recorder.ServeProcess`, which passes it to the child as a
file (``to_dict`` / ``from_file``), so every field reaches the server as it was set.
`gymtape serve`'s flags map onto the fields one to one (tests/test_config_flags.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
import types
import typing
from typing import Any

from .._errors import GymtapeError
from ..tape._storage import require_posix

#: What ``to_dict`` writes for a set api_key: a saved config never holds the secret.
MASKED = "***"


class ServeConfigError(GymtapeError):
    """A serve config file (``gymtape serve --config``) cannot be used."""


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
    #: Largest request body in bytes; a larger one is answered 413 before it is read (far above
    #: any real context: a 128k-token conversation with its token IDs is a few MB).
    max_request_bytes: int = 32 * 2**20
    #: Requests handled at once (``/health`` not counted); more are answered 429 with Retry-After.
    max_requests_in_flight: int = 512
    #: Browser origins (``scheme://host[:port]``, or ``*`` for any) allowed to call the server;
    #: a request whose ``Origin`` is another site is refused 403 (the server's own origin always passes).
    allow_origin: tuple[str, ...] = field(default_factory=tuple)
    #: Serve ``/docs``, ``/redoc`` and ``/openapi.json`` (behind the api_key when one is set).
    openapi: bool = False
    #: Tokenizer directory (default: the model's).
    tokenizer: str | None = None
    #: Jinja chat template file overriding the tokenizer's.
    chat_template: str | None = None
    #: End-of-turn token the splice counts (default: the tokenizer's eos token).
    eos_token: str | None = None
    #: Behave like a stock OpenAI server: ignore message-level token IDs and re-template every
    #: prompt from the messages' text (no on-policy splice). Only for measuring what the splice
    #: buys (``gymtape train --ab``); calls are still assigned to rollouts by those IDs.
    retemplate: bool = False
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
    #: Seconds before the write-ahead log's rows are sealed into a Parquet shard. Calls are
    #: durable and visible to every reader as soon as they are answered; this only sets how
    #: large shards grow (larger: fewer, bigger shards).
    flush_seconds: float = 60.0
    #: vllm: seconds to wait for the upstream's answer before a 504.
    upstream_timeout: float = 600.0
    #: vllm without --upstream: port and log of the supervised vLLM.
    vllm_port: int = 0
    vllm_log: str | None = None
    vllm_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Live capture needs rename and fsync: a POSIX folder, never a URL (StorageError says so).
        if self.tape is not None:
            self.tape = require_posix(self.tape, "gymtape serve --tape")
        for name in ("max_request_bytes", "max_requests_in_flight"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ServeConfigError(f"{name} must be a positive integer, got {value!r} "
                                       f"(--{name.replace('_', '-')})")
        for origin in self.allow_origin:
            if origin != "*" and normalize_origin(origin) is None:
                raise ServeConfigError(f"allow_origin {origin!r} is not an origin: give scheme://host[:port] "
                                       "(e.g. http://localhost:3000), or '*' for any")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; a set api_key is masked (pass the key in ``GYMTAPE_API_KEY``)."""
        d = asdict(self)
        d["api_key"] = MASKED if self.api_key else None
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "serve config") -> ServeConfig:
        """The inverse of ``to_dict``; unknown keys and a masked api_key are errors."""
        if not isinstance(data, dict):
            raise ServeConfigError(f"{source}: expected a mapping of ServeConfig fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ServeConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; "
                                   f"known: {', '.join(sorted(known))}")
        if data.get("api_key") == MASKED:
            raise ServeConfigError(f"{source}: api_key is masked ({MASKED!r}); give the key in "
                                   "GYMTAPE_API_KEY or --api-key, or leave api_key out")
        hints = typing.get_type_hints(cls)
        d = dict(data)
        for name, value in data.items():
            if value is None:
                continue
            hint = hints[name]
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            allowed = [t for t in (typing.get_args(hint) if union else (hint,)) if t is not type(None)]
            if Path in allowed and isinstance(value, str):
                d[name] = Path(value)
            elif any(typing.get_origin(t) is tuple for t in allowed):
                if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
                    raise ServeConfigError(f"{source}: {name} must be a list of strings, got {value!r}")
                d[name] = tuple(value)
            elif not any(_fits(value, t) for t in allowed):
                want = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
                raise ServeConfigError(f"{source}: {name} must be {want}, got {value!r}")
            elif float in allowed:
                d[name] = float(value)
        return cls(**d)

    @classmethod
    def from_file(cls, path: Path) -> ServeConfig:
        """A JSON (or YAML) file of ServeConfig fields, e.g. one written by :class:`~recorder.ServeProcess`."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ServeConfigError(f"serve config {path} cannot be read: {e}") from e
        except yaml.YAMLError as e:
            raise ServeConfigError(f"serve config {path} is not valid JSON or YAML: {e}") from e
        return cls.from_dict(data or {}, source=str(path))


def _fits(value: Any, t: Any) -> bool:
    """Whether a JSON value fits a scalar field type (an int fits a float field; a bool fits only bool)."""
    if isinstance(value, bool):
        return t is bool
    if t is float:
        return isinstance(value, (int, float))
    return isinstance(t, type) and isinstance(value, t)


def normalize_origin(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an http(s) origin such as a browser's ``Origin`` header, the
    default port filled in and the host lower-cased; None for anything else (``null`` included)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:  # a port that is not a number, or an unbalanced [ipv6
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        return None
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)
