"""`gymtape serve`: an OpenAI-compatible, on-policy generation server that records every call.

Request path: the front door (recorder._guard: origin, in-flight bound, body size) → validate
(recorder._openai) → template + splice (recorder._prompting) → engine.generate(prompt IDs) →
parse reasoning / tool calls from the text → answer with the token fields NeMo Gym reads →
queue the call for the tape (recorder._call_log). The engine only ever sees token IDs, so no
engine re-tokenizes what the model produced.

Parsing, templating and tokenizing cost time that grows with the request, so they run in a
small thread pool, never on the event loop: `/health` and every other request keep answering
while a large one is prepared. A prompt that cannot fit the context is refused from its length
alone before any of that work (PromptBuilder.check_fits).

Every answer that is not a 200 is an OpenAI-style error, `{"error": {"message", "type",
"param", "code"}}`: the routes' own, the framework's (404, 405), the front door's (403, 413,
429) and, as a last resort, a bug's (500, logged).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ._call_log import CallLog, RecordingError
from ._config import ServeConfig, ServeConfigError
from .engines._protocol import Engine, EngineError, Generation
from ..tape._storage import write_bytes_atomic
from ..tape._layout import RUNS_DIR
from ..tape._meta import tokenizer_identity
from ._guard import InFlight, RequestGuard
from ._openai import (CHAT_BODY, INT64_MAX, LOOKUP_BODY, TOKENIZE_BODY, WEIGHTS_BODY, APIError, ChatRequest,
                      openapi_body, parse_chat, parse_json, parse_lookup, strict_bool)
from ._parsers import TOOL_PARSERS, split_reasoning
from ._prompting import Prompt, PromptBuilder
from ._sched import ask_for_short_slice
from ..tape._records import CallRecord


log = logging.getLogger(__name__)

#: Threads that parse, template and tokenize requests (off the event loop). Templating is
#: Python (it holds the GIL), so more threads would not go faster; two keep one large request
#: from delaying every other one.
PROMPT_THREADS = 2


class PromptPool:
    """The threads that parse, template and tokenize requests, off the event loop.

    Why not ``loop.run_in_executor`` on a ThreadPoolExecutor: that chains a concurrent future
    to an asyncio one through several callbacks and state copies on every call, a measurable
    part of a request's CPU on the loop at concurrency 1. Here the caller queues the work with
    its loop future, and the worker settles that future with one ``call_soon_threadsafe``.
    A worker catches everything (the exception goes to the caller): it cannot die.
    """

    def __init__(self, threads: int, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker thread; its result, or its exception raised here."""
        if self._closed:
            raise RuntimeError("the prompt pool is shut down")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._queue.put((fn, args, done, loop))
        return await done

    def _work(self) -> None:
        ask_for_short_slice()  # every call at concurrency 1 waits for this thread to wake
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, done, loop = item
            if self._closed:  # shut down: what is still queued is cancelled, not run
                _settle_threadsafe(loop, _cancel, done)
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
                _settle_threadsafe(loop, _set_exception, done, e)
            else:
                _settle_threadsafe(loop, _set_result, done, result)

    def shutdown(self) -> None:
        """Stop the workers once they finish what they run now; queued work is cancelled."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)


def _settle_threadsafe(loop: asyncio.AbstractEventLoop, settle: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(settle, *args)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def _set_result(done: asyncio.Future[Any], result: Any) -> None:
    if not done.done():
        done.set_result(result)


def _set_exception(done: asyncio.Future[Any], error: BaseException) -> None:
    if not done.done():
        done.set_exception(error)


def _cancel(done: asyncio.Future[Any]) -> None:
    done.cancel()


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(content=orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


@functools.lru_cache(maxsize=64)  # clients send the same one or two spellings on every request
def _is_json(content_type: str | None) -> bool:
    """``application/json``, with at most a UTF-8 charset (JSON is UTF-8: RFC 8259)."""
    if not content_type:
        return False
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    if media != "application/json":
        return False
    return all(p.replace(" ", "") in ("charset=utf-8", 'charset="utf-8"') for p in params if p.startswith("charset"))


def check_key(config: ServeConfig, request: Request) -> None:
    """401 unless the request carries the api_key (when one is set)."""
    if config.api_key:
        check_authorization(config, request.headers.get("authorization", ""))


def check_authorization(config: ServeConfig, got: str) -> None:
    """401 unless ``got`` (the Authorization header) carries the api_key (when one is set)."""
    key = config.api_key
    if not key:
        return
    if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
        raise APIError("invalid or missing API key: send 'Authorization: Bearer <key>'", status=401,
                       type="authentication_error", code="invalid_api_key")


class GymtapeServer:
    """State shared by the endpoints: engine, prompt builder, call log, policy version."""

    def __init__(self, config: ServeConfig, engine: Engine, builder: PromptBuilder, log: CallLog,
                 pool: PromptPool, load: InFlight | None = None) -> None:
        self.config = config
        self.engine = engine
        self.builder = builder
        self.log = log
        self.pool = pool
        self.load = load
        self.tokenizer = builder.tokenizer
        self.policy_version = config.policy_version
        self.tool_parser = TOOL_PARSERS[config.tool_parser]()
        self.model_name = config.served_model_name or engine.model_name
        self.stop_ids = tuple(dict.fromkeys(
            [builder.eos_token_id] + ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])
        ))

    def check_auth(self, request: Request) -> None:
        check_key(self.config, request)

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU work that grows with the request (parse, template, tokenize) in the prompt pool."""
        return await self.pool.run(fn, *args)

    async def json_body(self, request: Request) -> bytes:
        """The raw body of a JSON request: auth first, then its Content-Type (415), then the bytes.

        Only ``application/json`` is read: a browser can send ``text/plain`` cross-site without a
        CORS preflight, so a body of any other type is refused unread."""
        headers = request.headers
        self.check_json_post(headers.get("authorization", ""), headers.get("content-type"))
        return await request.body()

    def check_json_post(self, authorization: str, content_type: str | None) -> None:
        """Auth (401), then the Content-Type (415) of a JSON POST: see :meth:`json_body`."""
        check_authorization(self.config, authorization)
        if not _is_json(content_type):
            raise APIError(f"Content-Type must be application/json, got {content_type!r}", status=415,
                           code="unsupported_media_type")

    def max_tokens_for(self, req: ChatRequest, prompt_len: int) -> int:
        limit = self.engine.max_model_len
        wanted = req.max_tokens if req.max_tokens is not None else limit - prompt_len
        if prompt_len + max(wanted, 1) > limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max(wanted, 1)} tokens ({prompt_len} in the messages, {max(wanted, 1)} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages", code="context_length_exceeded")
        return wanted

    def prepare_chat(self, body: bytes) -> tuple[ChatRequest, Prompt, int]:
        """Parse, check the length, template and splice (in the prompt pool)."""
        req = parse_chat(parse_json(body), vocab_size=self.builder.vocab_size)
        self.builder.check_fits(req.messages, self.engine.max_model_len, req.max_tokens or 1)
        prompt = self.builder.build(req.messages, req.tools, req.chat_template_kwargs)
        return req, prompt, self.max_tokens_for(req, len(prompt.ids))

    async def chat(self, request: Request) -> Response:
        content = await self.answer_chat(await self.json_body(request))
        return Response(content=content, media_type="application/json")

    async def answer_chat(self, raw: bytes) -> bytes:
        """The answer (JSON bytes) to a chat request's raw JSON body, once the call is on the tape."""
        started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        req, prompt, max_tokens = await self.off_loop(self.prepare_chat, raw)
        if prompt.anchor is None:  # a new rollout: nothing to look up or claim
            gen = await self.engine.generate(prompt.ids, req.sampling(max_tokens, self.stop_ids))
            rollout_id, call_index = self.log.assign(None)
        else:  # the continuation's claim (tape index, a claim file) runs while the engine generates
            claim = asyncio.ensure_future(asyncio.to_thread(self.log.assign, prompt.anchor))
            try:
                gen = await self.engine.generate(prompt.ids, req.sampling(max_tokens, self.stop_ids))
            except BaseException:
                rollout_id, call_index = await claim
                self.log.unassign(prompt.anchor, rollout_id, call_index)
                raise
            rollout_id, call_index = await claim
        message, finish = self._message(gen.token_ids, gen.finish_reason)
        call_id = f"chatcmpl-{uuid.uuid4().hex}"
        version = self.policy_version
        # The row goes to the committer first; the answer is built and serialized while it commits
        # (its fdatasync releases the GIL), and leaves only once the row is durable.
        committed = self.log.submit(CallRecord(
            rollout_id=rollout_id, call_index=call_index, call_id=call_id, prompt_ids=prompt.ids,
            generation_ids=gen.token_ids, generation_logprobs=gen.logprobs, finish_reason=finish,
            policy_version=version, temperature=req.temperature, top_p=req.top_p,
            top_k=req.top_k if req.top_k > 0 else None, max_tokens=max_tokens, seed=req.seed,
            logprobs_kind=self.engine.logprobs_kind, engine=self.engine.name, model=self.model_name,
            started_at=started, latency_s=time.perf_counter() - t0, messages=prompt.messages, tools=req.tools,
            output=message,
        ))
        # The answer is built while the row commits. Answered only once recorded: an answered call
        # is on the tape. The commit is settled even when building fails (that call stays recorded,
        # as one whose client hangs up does); a failed commit is a 503 either way.
        try:
            content = self._answer(req, prompt, gen, message, finish, call_id, started, rollout_id, call_index, version)
        finally:
            try:
                await committed
            except RecordingError as e:
                self.log.unassign(prompt.anchor, rollout_id, call_index)
                raise APIError(f"{e}. Nothing was recorded; retry when the tape's disk is writable again "
                               "(GET /health shows the recorder's state).", status=503, type="service_unavailable",
                               code="recording_failed") from None
        self.log.remember(prompt.ids, gen.token_ids, rollout_id, call_index, version)
        return content

    def _answer(self, req: ChatRequest, prompt: Prompt, gen: Generation, message: dict[str, Any], finish: str,
                call_id: str, started: datetime, rollout_id: str, call_index: int, version: int) -> bytes:
        """The chat completion's JSON bytes (built while the call's row commits)."""
        choice: dict[str, Any] = {
            "index": 0,
            "message": {**message, "prompt_token_ids": prompt.ids, "generation_token_ids": gen.token_ids,
                        "generation_log_probs": gen.logprobs},
            "logprobs": None,
            "finish_reason": finish,
            "token_ids": gen.token_ids,
        }
        if req.logprobs:
            choice["logprobs"] = {"content": [
                {"token": self._token_text(t, req.return_tokens_as_token_ids), "logprob": lp, "bytes": None,
                 "top_logprobs": []}
                for t, lp in zip(gen.token_ids, gen.logprobs)
            ]}
        return orjson.dumps({
            "id": call_id,
            "object": "chat.completion",
            "created": int(started.timestamp()),
            "model": self.model_name,
            "prompt_token_ids": prompt.ids,
            "choices": [choice],
            "usage": {"prompt_tokens": len(prompt.ids), "completion_tokens": len(gen.token_ids),
                      "total_tokens": len(prompt.ids) + len(gen.token_ids)},
            "gymtape": {"rollout_id": rollout_id, "call_index": call_index, "policy_version": version},
        })

    def _token_text(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self.builder.decode([token_id])

    def _message(self, token_ids: list[int], finish: str) -> tuple[dict[str, Any], str]:
        ids = token_ids[:-1] if finish == "stop" and token_ids and token_ids[-1] in self.stop_ids else token_ids
        text = self.builder.decode(ids)
        message: dict[str, Any] = {"role": "assistant"}
        if self.config.reasoning:
            reasoning, text = split_reasoning(text)
            if reasoning is not None:
                message["reasoning_content"] = reasoning
        content, calls = self.tool_parser.parse(text)
        message["content"] = content
        if calls:
            message["tool_calls"] = calls
            if finish == "stop":
                finish = "tool_calls"
        return message, finish

    def tokenize_body(self, body: bytes) -> list[int]:
        """The token IDs of a /tokenize body (in the prompt pool). A text that cannot fit the
        context is refused from its length, before tokenizing (whose cost grows with it)."""
        data = parse_json(body)
        limit = self.engine.max_model_len
        if "messages" in data:
            req = parse_chat(data, vocab_size=self.builder.vocab_size, for_tokenize=True)
            self.builder.check_fits(req.messages, limit, 0)
            return self.builder.build(req.messages, req.tools, req.chat_template_kwargs,
                                      add_generation_prompt=req.add_generation_prompt).ids
        prompt = data.get("prompt")
        if not isinstance(prompt, str):
            raise APIError("send either messages (chat) or prompt (a string)", param="messages")
        special = strict_bool(data, "add_special_tokens", True)
        if self.builder.min_text_tokens(len(prompt)) > limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. This prompt cannot fit it: "
                           f"{len(prompt)} characters are at least {self.builder.min_text_tokens(len(prompt))} tokens "
                           f"(one token stands for at most {self.builder.max_token_chars}).", param="prompt",
                           code="context_length_exceeded")
        return self.tokenizer.encode(prompt, add_special_tokens=special)

    async def tokenize(self, request: Request) -> Response:
        ids = await self.off_loop(self.tokenize_body, await self.json_body(request))
        return _json({"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_model_len})

    async def models(self, request: Request) -> Response:
        self.check_auth(request)
        return _json({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "gymtape",
            "max_model_len": self.engine.max_model_len}]})

    async def health(self) -> Response:
        log = self.log
        w = log.writer
        return _json({"status": "ok" if log.ok else "degraded", "engine": self.engine.name, "model": self.model_name,
                      "policy_version": self.policy_version,
                      # requests being handled now (/health not counted), and the most allowed at once
                      "in_flight": self.load.count if self.load is not None else None,
                      "max_requests_in_flight": self.config.max_requests_in_flight, "recording": {
                          "tape": str(Path(self.config.tape).resolve()) if self.config.tape else None,
                          # ok: the last write succeeded (false: calls are answered 503 until one does)
                          "ok": log.ok, "recorded": log.recorded, "pending": log.pending, "errors": log.errors,
                          "last_error": log.last_error,
                          # the tape writer's own failures, sealing the log into shards included (a failed
                          # seal loses nothing: the rows stay in the log and the seal is retried)
                          "writer_errors": w.write_errors if w is not None else 0,
                          "writer_last_error": w.last_error if w is not None else None}})

    async def lookup(self, request: Request) -> Response:
        """Which rollout recorded calls belong to, by their token IDs. With a tape the answer
        comes from the tape's call-key index (any replica's calls; one recorded rollout in order
        when there is one); it claims nothing: `gymtape record` joins on the tape itself."""
        pairs = await self.off_loop(lambda body: parse_lookup(parse_json(body)), await self.json_body(request))
        hits = await self.off_loop(self.log.lookup_calls, pairs)  # reads the tape's key index
        out = [None if hit is None else {"rollout_id": hit[0], "call_index": hit[1], "policy_version": hit[2]}
               for hit in hits]
        return _json({"calls": out, "recording": self.config.tape is not None})

    async def admin_weights(self, request: Request) -> Response:
        data = await self.off_loop(parse_json, await self.json_body(request))
        path, version = data.get("path"), data.get("version")
        if path is not None and (not isinstance(path, str) or not path):
            raise APIError("path must be a non-empty string (a save_pretrained directory)", param="path")
        # policy_version is int64 on the tape: a version that does not fit is refused here, not at the write
        if version is not None and (type(version) is not int or not 0 <= version <= INT64_MAX):
            raise APIError(f"version must be an integer in [0, {INT64_MAX}], got {version!r}", param="version")
        if path is None and version is None:
            raise APIError("send path (weights to load) and/or version", param="path")
        if version is None and self.policy_version >= INT64_MAX:
            raise APIError(f"policy version {self.policy_version} cannot be bumped past {INT64_MAX}; send an explicit "
                           "version", param="version")
        if path is not None:
            try:
                is_dir = await asyncio.to_thread(Path(path).is_dir)
            except (OSError, ValueError) as e:  # a name too long, a NUL byte
                raise APIError(f"path {path!r} cannot be used: {e}", param="path") from None
            if not is_dir:
                raise APIError(f"path {path!r} is not a directory", param="path")
            await self.engine.load_weights(path)
        self.policy_version = version if version is not None else self.policy_version + 1
        return _json({"policy_version": self.policy_version, "loaded": path})


#: The hot route, answered by :class:`ChatRoute` without the framework's per-request work.
CHAT_PATH = "/v1/chat/completions"


async def read_body(receive: Any) -> bytes:
    """The whole request body from ASGI ``receive``, as Starlette's ``Request.body()`` reads it
    (:class:`ClientDisconnect` when the client goes away first)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


class ChatRoute:
    """``POST /v1/chat/completions`` answered straight from ASGI: the app's innermost middleware.

    Why: at concurrency 1 every bit of CPU on the event loop is added latency, and FastAPI's
    per-request work for a route (request object, dependency solving, a Response object,
    telemetry hooks, routing) cost about as much CPU as the whole chat handler. This answers the
    hot route itself, with the same checks (key, then Content-Type), the same body reading and
    the same JSON answer; its errors go to the app's own exception handlers, exactly as the
    framework would pick them (a bug's is re-raised to the framework's last-resort 500). Every
    other request, and the chat route before the lifespan has started the server, goes to the
    app. The FastAPI route stays registered: it documents the endpoint in ``/openapi.json``.
    """

    def __init__(self, app: Any, *, state: dict[str, GymtapeServer], handlers: dict[Any, Any]) -> None:
        self.app = app
        self.state = state
        #: The app's exception handlers (the dict itself: handlers registered later are seen).
        self.handlers = handlers

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        server = self.state.get("s")
        if (server is None or scope["type"] != "http" or scope["path"] != CHAT_PATH or scope["method"] != "POST"
                or scope.get("root_path")):
            await self.app(scope, receive, send)
            return
        try:
            authorization, content_type = None, None
            for name, value in scope["headers"]:  # the first of each, as Starlette's Headers.get
                if name == b"authorization" and authorization is None:
                    authorization = value.decode("latin-1")
                elif name == b"content-type" and content_type is None:
                    content_type = value.decode("latin-1")
            server.check_json_post(authorization or "", content_type)
            content = await server.answer_chat(await read_body(receive))
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            response = await handler(Request(scope, receive), exc)
            await response(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-length", str(len(content)).encode()), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": content})

    def _handler(self, exc: Exception) -> Any:
        """The handler Starlette's ExceptionMiddleware would pick (the nearest class in the
        exception's MRO); None for the last-resort one (``Exception``), which sits outermost."""
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            handler = self.handlers.get(cls)
            if handler is not None:
                return handler
        return None


def build_engine(config: ServeConfig) -> tuple[Engine, str, Any]:
    """The engine, the tokenizer directory, and a supervised vLLM process (or None)."""
    from .engines._models import default_model_dir

    if config.engine == "hf":
        from .engines._hf import HFEngine

        model_dir = str(config.model or default_model_dir())
        engine = HFEngine(model_dir, model_name=config.served_model_name, device=config.device, dtype=config.dtype,
                          max_batch_size=config.max_batch_size, max_model_len=config.max_model_len)
        return engine, config.tokenizer or model_dir, None
    if config.engine == "vllm":
        from .engines._vllm import VLLMEngine, VLLMProcess

        proc = None
        upstream = config.upstream
        model = config.model
        if upstream is None:
            model = str(model or default_model_dir())
            port = config.vllm_port or _free_port()
            log = Path(config.vllm_log or (Path(config.tape or ".") / "vllm.log"))
            proc = VLLMProcess(model, port=port, log_path=log, max_model_len=config.max_model_len or 4096,
                               dtype=config.dtype, extra_args=config.vllm_args)
            upstream = proc.url
            model = proc.served_name
        engine = VLLMEngine(upstream, model=model, timeout=config.upstream_timeout)
        tok = config.tokenizer or (config.model if config.model and Path(config.model).is_dir() else None)
        if tok is None and config.model is None:
            tok = str(default_model_dir())
        if tok is None:
            raise ServeConfigError("--engine vllm --upstream needs --tokenizer DIR (the served model's tokenizer)")
        return engine, tok, proc
    raise ServeConfigError(f"engine must be hf or vllm, got {config.engine!r}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _telemetry_off() -> dict[str, Any]:
    """FastAPI's native OpenTelemetry (FastAPI >= 0.16x) asks the global providers whether it is
    on, on every request: off, unless the environment configures OpenTelemetry (``OTEL_*``) or
    asks FastAPI to (``FASTAPI_OTEL_AUTO_CONFIGURE``)."""
    import inspect

    if any(k.startswith("OTEL_") for k in os.environ) or os.environ.get("FASTAPI_OTEL_AUTO_CONFIGURE"):
        return {}
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI app; engine, tokenizer and tape writer start in its lifespan."""
    state: dict[str, GymtapeServer] = {}
    load = InFlight()

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        from transformers import AutoTokenizer

        engine, tok_dir, proc = build_engine(config)
        log = None
        pool = PromptPool(PROMPT_THREADS, "gymtape-prompt")
        try:
            if proc is not None:
                proc.start()
                await proc.wait_ready()
            await engine.start()
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            builder = PromptBuilder(tokenizer, chat_template=config.chat_template, eos_token=config.eos_token,
                                    retemplate=config.retemplate)
            ident = tokenizer_identity(tok_dir) if Path(tok_dir).is_dir() else None
            log = CallLog(config.tape, tokenizer=ident, flush_seconds=config.flush_seconds)
            if log.writer is not None:
                runs = Path(log.writer.path) / RUNS_DIR
                runs.mkdir(exist_ok=True)
                write_bytes_atomic(runs / f"{log.writer.writer_id}.json", orjson.dumps(
                    {"command": "gymtape serve", "config": config.to_dict(), "engine": engine.name,
                     "model": engine.model_name, "max_model_len": engine.max_model_len}, option=orjson.OPT_INDENT_2))
            state["s"] = GymtapeServer(config, engine, builder, log, pool, load)
            ask_for_short_slice()  # the event loop's thread: it wakes for every hand-off back
            yield
        finally:
            pool.shutdown()
            if log is not None:
                log.close()
            await engine.aclose()
            if proc is not None:
                proc.stop()

    # The framework's own /docs, /redoc and /openapi.json answer without the key: off, and
    # served below (behind the key) only with --openapi.
    app = FastAPI(title="gymtape serve", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None,
                  **_telemetry_off())
    app.add_middleware(ChatRoute, state=state, handlers=app.exception_handlers)  # innermost: added first
    if config.allow_origin:  # answer allowed browser origins' preflights, let them read the answers
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.allow_origin), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.add_middleware(RequestGuard, max_request_bytes=config.max_request_bytes,  # outermost: runs first
                       max_requests_in_flight=config.max_requests_in_flight, allow_origin=config.allow_origin,
                       bound_host=config.host, load=load)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return _json(exc.body(), exc.status)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> Response:
        return _json(APIError(str(exc), status=exc.status, type=exc.type).body(), exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: ("not_found_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed")}
        type_, code = kind.get(exc.status_code, ("invalid_request_error", None))
        if exc.status_code == 404:
            message = f"{request.url.path} is not an endpoint of gymtape serve"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {(exc.headers or {}).get('Allow')})"
        else:
            message = str(exc.detail)
        return _json(APIError(message, status=exc.status_code, type=type_, code=code).body(), exc.status_code,
                     headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _json(APIError(f"invalid request: {exc.errors()}", status=422).body(), 422)

    @app.exception_handler(ClientDisconnect)
    async def _disconnected(request: Request, exc: ClientDisconnect) -> Response:  # nobody reads this answer
        return _json(APIError("the client disconnected before the request body was complete").body(), 400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        """Last resort: a bug. Logged with its traceback; the client still gets JSON."""
        # one line here; the HTTP server logs the traceback (Starlette re-raises after this answer)
        log.error("gymtape serve: unexpected %s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
        return _json(APIError(f"internal error ({type(exc).__name__}); this is a gymtape bug: the server log has "
                              "the traceback", status=500, type="server_error", code="internal_error").body(), 500)

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(CHAT_BODY))
    async def chat(request: Request) -> Response:
        return await state["s"].chat(request)

    @app.post("/tokenize", openapi_extra=openapi_body(TOKENIZE_BODY))
    @app.post("/v1/tokenize", openapi_extra=openapi_body(TOKENIZE_BODY))
    async def tokenize(request: Request) -> Response:
        return await state["s"].tokenize(request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await state["s"].models(request)

    @app.get("/health")
    async def health() -> Response:
        return await state["s"].health()

    @app.post("/gymtape/lookup", openapi_extra=openapi_body(LOOKUP_BODY))
    async def lookup(request: Request) -> Response:
        return await state["s"].lookup(request)

    @app.post("/admin/weights", openapi_extra=openapi_body(WEIGHTS_BODY))
    async def admin_weights(request: Request) -> Response:
        return await state["s"].admin_weights(request)

    if config.openapi:
        from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

        @app.get("/openapi.json", include_in_schema=False)
        async def openapi(request: Request) -> Response:
            check_key(config, request)
            return _json(app.openapi())

        @app.get("/docs", include_in_schema=False)
        async def docs(request: Request) -> HTMLResponse:
            check_key(config, request)
            return get_swagger_ui_html(openapi_url="/openapi.json", title="gymtape serve")

        @app.get("/redoc", include_in_schema=False)
        async def redoc(request: Request) -> HTMLResponse:
            check_key(config, request)
            return get_redoc_html(openapi_url="/openapi.json", title="gymtape serve")

    return app
