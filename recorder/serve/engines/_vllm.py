"""The `vllm` engine: a stock vLLM server, called with token-ID prompts on /v1/completions.

Sending token IDs (not text) is what makes any stock vLLM on-policy: the server-side splice
already fixed the prompt, and vLLM must not re-tokenize it. vLLM returns the sampled token
IDs (`return_token_ids`) and, with `logprobs: 0`, the sampled token's logprob, which by
vLLM's default (`logprobs_mode=raw_logprobs`) is the raw model distribution.

The upstream call is on every request's path, so a plain-HTTP upstream (the usual local vLLM)
is called through the lean keep-alive client in `_http.py` (about 7x less CPU per call than
httpx); https and proxied upstreams keep going through httpx.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from ._http import HTTPClient, HTTPConnectionError, HTTPTimeout
from ._protocol import EngineError, Generation, SamplingParams
from .._process import stop_process_group


_JSON_HEADERS = {"content-type": "application/json"}


def _dumps(body: dict[str, Any]) -> bytes:
    """orjson (~10x faster than the stdlib json behind httpx's ``json=``); stdlib for what orjson
    refuses (an integer beyond 64 bits, e.g. a huge seed), so vLLM still gets to answer that 400 itself."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class VLLMEngine:
    name = "vllm"
    logprobs_kind = "raw"

    def __init__(self, upstream: str, *, model: str | None = None, timeout: float = 600.0,
                 max_connections: int = 256, api_key: str | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        if self.upstream.endswith("/v1"):
            self.upstream = self.upstream[: -len("/v1")]
        self.model_name = model or ""
        self.max_model_len = 0
        self._timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        url = urlsplit(self.upstream)
        #: The lean client, for a plain-HTTP upstream reached without a proxy; otherwise httpx.
        self._lean: HTTPClient | None = None
        self._client: httpx.AsyncClient | None = None
        #: The upstream URL's path (a server behind a path prefix), put before every request path.
        self._prefix = url.path.rstrip("/")
        if url.scheme == "http" and url.hostname and not _proxied(url.hostname):
            self._lean = HTTPClient(url.hostname, url.port or 80, headers=headers, timeout=timeout,
                                    connect_timeout=10.0, max_connections=max_connections)
        else:
            self._client = httpx.AsyncClient(
                base_url=self.upstream,
                headers=headers,
                timeout=httpx.Timeout(timeout, connect=10.0),
                limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            )
        # Absolute URLs built once: httpx re-parses and re-joins a relative path against base_url on every
        # request (~75 us of pure Python per call); an httpx.URL that is already absolute is used as is.
        self._urls: dict[str, httpx.URL] = {}

    async def start(self) -> None:
        data = await self._call("GET", "/v1/models")
        models = data.get("data") or []
        if not models:
            raise EngineError(f"vLLM at {self.upstream} serves no model", 502, "upstream_error")
        chosen = next((m for m in models if m.get("id") == self.model_name), None) if self.model_name else models[0]
        if chosen is None:
            names = ", ".join(m.get("id", "?") for m in models)
            raise EngineError(f"vLLM at {self.upstream} does not serve {self.model_name!r} (it serves {names})", 502,
                              "upstream_error")
        self.model_name = chosen["id"]
        self.max_model_len = int(chosen.get("max_model_len") or 0)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        body: dict[str, Any] = {
            "model": self.model_name,
            "prompt": prompt_ids,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else -1,
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": False,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        data = await self._call("POST", "/v1/completions", body)
        try:
            choice = data["choices"][0]
            ids = choice["token_ids"]
            logprobs = choice["logprobs"]["token_logprobs"]
            # orjson already made ints and floats (as vLLM sends them): keep its lists, checked at C speed,
            # and convert element by element only when something else came back
            if type(ids) is not list or not set(map(type, ids)) <= {int}:
                ids = [int(t) for t in ids]
            if type(logprobs) is not list or not set(map(type, logprobs)) <= {float}:
                logprobs = [float(x) for x in logprobs]
            finish = "length" if choice.get("finish_reason") == "length" else "stop"
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise EngineError(f"vLLM at {self.upstream} answered without token IDs/logprobs ({e!r}); "
                              "it must support return_token_ids (vLLM >= 0.10)", 502, "upstream_error") from e
        if len(ids) != len(logprobs):
            raise EngineError(f"vLLM returned {len(ids)} token IDs but {len(logprobs)} logprobs", 502, "upstream_error")
        return Generation(ids, logprobs, finish)

    async def load_weights(self, path: str) -> None:
        raise EngineError("the vllm engine cannot load weights itself: update the vLLM server's weights, then "
                          "POST /admin/weights with only {\"version\": N} so the tape records the new version", 400,
                          "invalid_request_error")

    async def aclose(self) -> None:
        if self._lean is not None:
            await self._lean.aclose()
        if self._client is not None:
            await self._client.aclose()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if self._lean is not None:
            status, content, text = await self._call_lean(method, path, body)
        else:
            status, content, text = await self._call_httpx(method, path, body)
        if status >= 400:
            try:
                msg = orjson.loads(content).get("error", {}).get("message") or text()
            except (ValueError, AttributeError):
                msg = text()
            mapped = status if status < 500 else 502
            raise EngineError(f"vLLM answered {status}: {msg[:500]}", mapped,
                              "invalid_request_error" if mapped < 500 else "upstream_error")
        try:
            return orjson.loads(content)
        except ValueError as e:  # orjson.JSONDecodeError is a ValueError
            raise EngineError(f"vLLM at {self.upstream} answered non-JSON: {text()[:200]!r}", 502, "upstream_error") from e

    def _timed_out(self, path: str) -> EngineError:
        return EngineError(f"vLLM at {self.upstream} did not answer {path} within {self._timeout:g} s", 504,
                           "upstream_timeout")

    def _unreachable(self, e: Exception) -> EngineError:
        return EngineError(f"vLLM at {self.upstream} is unreachable ({type(e).__name__}: {e})", 502,
                           "upstream_unavailable")

    async def _call_lean(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, bytes, Any]:
        assert self._lean is not None
        try:
            r = await self._lean.request(method, self._prefix + path, None if body is None else _dumps(body))
        except HTTPTimeout as e:
            raise self._timed_out(path) from e
        except HTTPConnectionError as e:
            raise self._unreachable(e) from e
        return r.status, r.content, lambda: r.text

    async def _call_httpx(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, bytes, Any]:
        assert self._client is not None
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.upstream + path)
        try:
            if body is None:
                r = await self._client.request(method, url)
            else:
                r = await self._client.request(method, url, content=_dumps(body), headers=_JSON_HEADERS)
        except httpx.TimeoutException as e:
            raise self._timed_out(path) from e
        except httpx.HTTPError as e:
            raise self._unreachable(e) from e
        return r.status_code, r.content, lambda: r.text


def _proxied(host: str) -> bool:
    """Whether httpx (trust_env) would send requests to ``host`` through a proxy from the environment."""
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get("http") or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass_environment(host, proxies)


def vllm_python() -> str:
    """The Python that has vLLM: $GYMTAPE_VLLM_PYTHON, ./.venv-vllm, or this interpreter."""
    env = os.environ.get("GYMTAPE_VLLM_PYTHON")
    if env:
        return env
    local = Path(".venv-vllm/bin/python")
    return str(local.resolve()) if local.exists() else sys.executable


class VLLMProcess:
    """Starts and supervises a local vLLM OpenAI server; its log is kept in ``log_path``."""

    def __init__(self, model: str, *, port: int, log_path: Path, served_name: str | None = None,
                 max_model_len: int = 4096, dtype: str = "auto", extra_args: tuple[str, ...] = (),
                 python: str | None = None) -> None:
        self.model = model
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"
        self.served_name = served_name or Path(model).name
        self._args = [
            python or vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(max_model_len), "--dtype", dtype, *extra_args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if shutil.which(self._args[0]) is None and not Path(self._args[0]).exists():
            raise EngineError(f"no Python at {self._args[0]} to run vLLM; set GYMTAPE_VLLM_PYTHON", 500)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    async def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=5.0) as c:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise EngineError(f"vLLM exited with code {self.proc.returncode} while starting; see {self.log_path}", 502,
                                      "upstream_unavailable")
                try:
                    if (await c.get(f"{self.url}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(1.0)
        raise EngineError(f"vLLM did not become healthy within {timeout:g} s; see {self.log_path}", 504, "upstream_timeout")

    def stop(self, grace: float = 20.0) -> None:
        stop_process_group(self.proc, grace)
