"""`gymtape serve`: an OpenAI-compatible, on-policy generation server that records every call.

Request path: validate (recorder._openai) → template + splice (recorder._prompting) →
engine.generate(prompt IDs) → parse reasoning / tool calls from the text → answer with the
token fields NeMo Gym reads → queue the call for the tape (recorder._call_log). The engine
only ever sees token IDs, so no engine re-tokenizes what the model produced.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from ._call_log import CallLog, RecordingError
from ._config import ServeConfig, ServeConfigError
from .engines._protocol import Engine, EngineError
from ..tape._storage import write_bytes_atomic
from ..tape._layout import RUNS_DIR
from ..tape._meta import tokenizer_identity
from ._openai import INT64_MAX, APIError, ChatRequest, parse_chat, parse_json
from ._parsers import TOOL_PARSERS, split_reasoning
from ._prompting import PromptBuilder
from ..tape._records import CallRecord


def _json(body: Any, status: int = 200) -> Response:
    return Response(content=orjson.dumps(body), status_code=status, media_type="application/json")


class GymtapeServer:
    """State shared by the endpoints: engine, prompt builder, call log, policy version."""

    def __init__(self, config: ServeConfig, engine: Engine, builder: PromptBuilder, log: CallLog) -> None:
        self.config = config
        self.engine = engine
        self.builder = builder
        self.log = log
        self.tokenizer = builder.tokenizer
        self.policy_version = config.policy_version
        self.tool_parser = TOOL_PARSERS[config.tool_parser]()
        self.model_name = config.served_model_name or engine.model_name
        self.stop_ids = tuple(dict.fromkeys(
            [builder.eos_token_id] + ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])
        ))

    def check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
            raise APIError("invalid or missing API key: send 'Authorization: Bearer <key>'", status=401,
                           type="authentication_error", code="invalid_api_key")

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

    async def chat(self, request: Request) -> Response:
        started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        self.check_auth(request)
        req = parse_chat(parse_json(await request.body()), vocab_size=self.builder.vocab_size)
        prompt = self.builder.build(req.messages, req.tools, req.chat_template_kwargs)
        max_tokens = self.max_tokens_for(req, len(prompt.ids))
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
        body = {
            "id": call_id,
            "object": "chat.completion",
            "created": int(started.timestamp()),
            "model": self.model_name,
            "prompt_token_ids": prompt.ids,
            "choices": [choice],
            "usage": {"prompt_tokens": len(prompt.ids), "completion_tokens": len(gen.token_ids),
                      "total_tokens": len(prompt.ids) + len(gen.token_ids)},
            "gymtape": {"rollout_id": rollout_id, "call_index": call_index, "policy_version": version},
        }
        try:  # answered only once recorded: an answered call is on the tape
            await self.log.record(CallRecord(
                rollout_id=rollout_id, call_index=call_index, call_id=call_id, prompt_ids=prompt.ids,
                generation_ids=gen.token_ids, generation_logprobs=gen.logprobs, finish_reason=finish,
                policy_version=version, temperature=req.temperature, top_p=req.top_p,
                top_k=req.top_k if req.top_k > 0 else None, max_tokens=max_tokens, seed=req.seed,
                logprobs_kind=self.engine.logprobs_kind, engine=self.engine.name, model=self.model_name,
                started_at=started, latency_s=time.perf_counter() - t0, messages=prompt.messages, tools=req.tools,
                output=message,
            ))
        except RecordingError as e:
            self.log.unassign(prompt.anchor, rollout_id, call_index)
            raise APIError(f"{e}. Nothing was recorded; retry when the tape's disk is writable again "
                           "(GET /health shows the recorder's state).", status=503, type="service_unavailable",
                           code="recording_failed") from None
        self.log.remember(prompt.ids, gen.token_ids, rollout_id, call_index, version)
        return _json(body)

    def _token_text(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self.tokenizer.decode([token_id])

    def _message(self, token_ids: list[int], finish: str) -> tuple[dict[str, Any], str]:
        ids = token_ids[:-1] if finish == "stop" and token_ids and token_ids[-1] in self.stop_ids else token_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
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

    async def tokenize(self, request: Request) -> Response:
        self.check_auth(request)
        data = parse_json(await request.body())
        if "messages" in data:
            req = parse_chat(data, vocab_size=self.builder.vocab_size, for_tokenize=True)
            ids = self.builder.build(req.messages, req.tools, req.chat_template_kwargs,
                                     add_generation_prompt=req.add_generation_prompt).ids
        elif isinstance(data.get("prompt"), str):
            ids = self.tokenizer.encode(data["prompt"], add_special_tokens=bool(data.get("add_special_tokens", True)))
        else:
            raise APIError("send either messages (chat) or prompt (a string)", param="messages")
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
                      "policy_version": self.policy_version, "recording": {
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
        self.check_auth(request)
        data = parse_json(await request.body())
        calls = data.get("calls")
        if not isinstance(calls, list):
            raise APIError("calls must be a list of {prompt_token_ids, generation_token_ids}", param="calls")
        pairs = [(c.get("prompt_token_ids") or [], c.get("generation_token_ids") or []) if isinstance(c, dict)
                 else ([], []) for c in calls]
        try:
            hits = self.log.lookup_calls(pairs)
        except (TypeError, ValueError, OverflowError) as e:
            raise APIError(f"calls: token IDs must be lists of integers ({e})", param="calls") from None
        out = [None if hit is None else {"rollout_id": hit[0], "call_index": hit[1], "policy_version": hit[2]}
               for hit in hits]
        return _json({"calls": out, "recording": self.config.tape is not None})

    async def admin_weights(self, request: Request) -> Response:
        self.check_auth(request)
        data = parse_json(await request.body())
        path, version = data.get("path"), data.get("version")
        if path is not None and not isinstance(path, str):
            raise APIError("path must be a string (a save_pretrained directory)", param="path")
        # policy_version is int64 on the tape: a version that does not fit is refused here, not at the write
        if version is not None and (type(version) is not int or not 0 <= version <= INT64_MAX):
            raise APIError(f"version must be an integer in [0, {INT64_MAX}], got {version!r}", param="version")
        if path is None and version is None:
            raise APIError("send path (weights to load) and/or version", param="path")
        if version is None and self.policy_version >= INT64_MAX:
            raise APIError(f"policy version {self.policy_version} cannot be bumped past {INT64_MAX}; send an explicit "
                           "version", param="version")
        if path is not None:
            if not Path(path).is_dir():
                raise APIError(f"path {path} is not a directory", param="path")
            await self.engine.load_weights(path)
        self.policy_version = version if version is not None else self.policy_version + 1
        return _json({"policy_version": self.policy_version, "loaded": path})


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


def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI app; engine, tokenizer and tape writer start in its lifespan."""
    state: dict[str, GymtapeServer] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        from transformers import AutoTokenizer

        engine, tok_dir, proc = build_engine(config)
        log = None
        try:
            if proc is not None:
                proc.start()
                await proc.wait_ready()
            await engine.start()
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            builder = PromptBuilder(tokenizer, chat_template=config.chat_template, eos_token=config.eos_token)
            ident = tokenizer_identity(tok_dir) if Path(tok_dir).is_dir() else None
            log = CallLog(config.tape, tokenizer=ident, flush_seconds=config.flush_seconds)
            if log.writer is not None:
                runs = Path(log.writer.path) / RUNS_DIR
                runs.mkdir(exist_ok=True)
                write_bytes_atomic(runs / f"{log.writer.writer_id}.json", orjson.dumps(
                    {"command": "gymtape serve", "config": config.to_dict(), "engine": engine.name,
                     "model": engine.model_name, "max_model_len": engine.max_model_len}, option=orjson.OPT_INDENT_2))
            state["s"] = GymtapeServer(config, engine, builder, log)
            yield
        finally:
            if log is not None:
                log.close()
            await engine.aclose()
            if proc is not None:
                proc.stop()

    app = FastAPI(title="gymtape serve", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return _json(exc.body(), exc.status)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> Response:
        return _json(APIError(str(exc), status=exc.status, type=exc.type).body(), exc.status)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await state["s"].chat(request)

    @app.post("/tokenize")
    @app.post("/v1/tokenize")
    async def tokenize(request: Request) -> Response:
        return await state["s"].tokenize(request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await state["s"].models(request)

    @app.get("/health")
    async def health() -> Response:
        return await state["s"].health()

    @app.post("/gymtape/lookup")
    async def lookup(request: Request) -> Response:
        return await state["s"].lookup(request)

    @app.post("/admin/weights")
    async def admin_weights(request: Request) -> Response:
        return await state["s"].admin_weights(request)

    return app
