"""An in-process transformers engine that batches concurrent requests.

Design: ``generate`` never touches the model. It validates the request, hands it to ONE
worker thread and awaits a future. The worker takes every request that is waiting (up to
``max_batch_size``) and decodes them together: left-padded prompts, an attention mask,
explicit position IDs and a KV cache, one forward pass per step for all rows still running.
A forward over 8 rows costs far less than 8 forwards over one row, which is the whole point;
the cost is that the engine owns its decoding loop instead of using ``model.generate`` (whose
logits processors would hide the raw logprobs and whose one shared RNG would make seeded
sampling depend on which requests happened to share a batch).

Batching is static: a batch runs until its last row finishes, and requests that arrive
meanwhile wait for the next batch. Finished rows leave the batch (their cache rows are
dropped, their futures resolve at once), so a short answer does not wait for a long one.
Continuous batching (admitting requests into a running batch) would need the KV caches of
two batches merged, which transformers' cache API has no public operation for.

Only the worker thread uses the model, so no locks guard it; weight loads are queued like
requests and run between batches, never inside one.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import queue
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from ._protocol import EngineError, Generation, SamplingParams

log = logging.getLogger(__name__)

#: Temperatures below this decode greedily (vLLM's ``_SAMPLING_EPS``).
_GREEDY_BELOW = 1e-5
#: Left padding uses this token; it is masked out, so any in-vocabulary ID would do.
_PAD_ID = 0


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Generation]


@dataclass(eq=False)
class _WeightLoad:
    """Checkpoint tensors, already read and checked, for the worker to copy in."""

    tensors: dict[str, torch.Tensor]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]


class _Close:
    """Queued by ``aclose``: the worker stops once everything queued before it is done."""


_Job = _Request | _WeightLoad | _Close


@dataclass(eq=False)
class _Row:
    """One request's state inside a running batch."""

    request: _Request
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: EngineError | None = None

    @property
    def done(self) -> bool:
        # A cancelled caller (future already done) frees its row at the next step.
        return self.finish_reason is not None or self.error is not None or self.request.future.done()


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any = None,
             error: BaseException | None = None) -> None:
    """Set a future from the worker thread: futures are not thread-safe, so the loop does it."""

    def settle() -> None:
        if future.done():  # cancelled by its caller meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's loop has closed: nobody is waiting any more
        pass


#: A sharded save_pretrained checkpoint's index: which file holds each weight.
_INDEX = "model.safetensors.index.json"


def _indexed_files(folder: Path, bad: Any) -> list[Path]:
    """The weight files a sharded checkpoint's index names, each checked to be inside ``folder``.

    The index is data, so it may name anything: a name that leaves the folder (absolute, ``..``,
    or through a linked directory) is refused before any file is opened. A listed file that is
    itself a link is followed, as for the files of an unsharded folder: that is the folder's own
    layout (the Hugging Face cache links every file of a snapshot to its blob).
    """
    index = folder / _INDEX
    try:
        data = json.loads(index.read_bytes())
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8 or not JSON
        raise bad(f"{index} is not a readable JSON index ({exc}); rewrite it with save_pretrained") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise bad(f"{index}: weight_map must be an object mapping weight names to file names in {folder}, got "
                  f"{type(weight_map).__name__}; rewrite it with save_pretrained")
    root = folder.resolve()
    files = []
    for name in sorted(set(weight_map.values())):
        file = root / name
        try:
            inside = file.name not in ("", ".", "..") and file.parent.resolve().is_relative_to(root)
        except (OSError, ValueError):  # a link loop, a NUL byte
            inside = False
        if not inside:
            raise bad(f"{index}: weight_map names the file {name!r}, which is outside the checkpoint directory "
                      f"{root}; every weights file must be inside it")
        files.append(file)
    return files


def _torch_dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return name
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise EngineError(f"unknown dtype {name!r}: use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
    return dtype


class HFEngine:
    """Generates with a transformers causal LM in this process, batching concurrent requests.

    Logprobs are ``raw``: the log-softmax of the model's own fp32 logits at the chosen token,
    before temperature, top-k and top-p, like vLLM's default. Sampling follows vLLM's
    conventions per request; a request with a ``seed`` draws from its own ``torch.Generator``,
    so its tokens do not depend on the other requests in its batch.
    """

    name = "hf"
    logprobs_kind = "raw"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_name: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_size: int = 16,
        max_model_len: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise EngineError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model_dir = Path(model_dir)
        self.model_name = model_name or self.model_dir.name
        self.device = torch.device(device)
        self.dtype = _torch_dtype(dtype)
        self.max_batch_size = max_batch_size
        # The config is small and read now so that max_model_len is known before start().
        try:
            text_config = AutoConfig.from_pretrained(self.model_dir).get_text_config()
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot read a transformers model config in {self.model_dir}: {exc}") from exc
        self.vocab_size: int = int(text_config.vocab_size)
        limit = max_model_len if max_model_len is not None else getattr(text_config, "max_position_embeddings", None)
        if not isinstance(limit, int) or limit < 2:
            raise EngineError(f"max_model_len must be an integer of at least 2, got {limit!r} "
                              f"(pass max_model_len= when the config has no max_position_embeddings)")
        self.max_model_len: int = limit
        #: Size of every batch the worker has run, in order: proof (and a metric) of batching.
        self.batches_run: list[int] = []
        self._model: torch.nn.Module | None = None
        self._cache_kwarg = "cache"
        self._state: dict[str, torch.Tensor] = {}
        self._jobs: queue.SimpleQueue[list[_Job]] = queue.SimpleQueue()
        self._inbox: list[_Job] = []
        self._inbox_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the model (in a thread, so the event loop stays responsive) and start the worker.

        Only the model is loaded: tokens in, tokens out; the tokenizer belongs to the server.
        """
        if self._worker is not None:
            return
        if self._closed:
            raise EngineError("the engine is closed", status=503)
        model = await asyncio.to_thread(self._load_model)
        self._model = model
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed past_key_values to cache; accept either spelling.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._state = model.state_dict()  # detached views of the live parameters
        self._worker = threading.Thread(target=self._work, name=f"hf-engine-{self.model_name}", daemon=True)
        self._worker.start()

    def _load_model(self) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype)
        return model.to(self.device).eval()

    async def aclose(self) -> None:
        """Stop accepting requests, finish those already queued, then stop the worker."""
        if self._closed:
            return
        self._closed = True
        if self._worker is None:
            return
        self._submit(_Close())
        # Bounded: a shutdown must not wait out a long generation (the thread is a daemon).
        await asyncio.to_thread(self._worker.join, 30.0)
        self._model = None
        self._state = {}

    # ------------------------------------------------------------------ public calls

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        self._check_running()
        self._validate(prompt_ids, params)
        loop = asyncio.get_running_loop()
        request = _Request(list(prompt_ids), params, loop, loop.create_future())
        self._submit(request)
        return await request.future

    async def load_weights(self, path: str) -> None:
        """Copy a checkpoint's weights into the live model, between two batches.

        The file is read and checked against the model (names, shapes, tied weights) in a
        thread before anything is queued, so a bad checkpoint fails with 400 and leaves the
        model untouched, and the worker pauses generation only for the in-memory copy.
        Requests submitted before this call run on the old weights, later ones on the new.
        """
        self._check_running()
        tensors = await asyncio.to_thread(self._read_checkpoint, Path(path))
        loop = asyncio.get_running_loop()
        job = _WeightLoad(tensors, loop, loop.create_future())
        self._submit(job)
        await job.future

    # ------------------------------------------------------------------ event-loop side

    def _check_running(self) -> None:
        if self._closed:
            raise EngineError("the engine is closed", status=503)
        if self._worker is None:
            raise EngineError("the engine has not been started", status=503)
        if not self._worker.is_alive():
            raise EngineError("the engine's worker thread has stopped", status=503)

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        def bad(message: str) -> EngineError:
            return EngineError(message, status=400, type="invalid_request_error")

        if not prompt_ids:
            raise bad("the prompt is empty: at least one token is needed")
        if not isinstance(params.max_tokens, int) or params.max_tokens < 1:
            raise bad(f"max_tokens must be at least 1, got {params.max_tokens}")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise bad(f"the prompt has {len(prompt_ids)} tokens and max_tokens is {params.max_tokens}: "
                      f"{total} exceeds the model's context length of {self.max_model_len}")
        out_of_vocab = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool)
                        or not 0 <= t < self.vocab_size]
        if out_of_vocab:
            raise bad(f"{len(out_of_vocab)} prompt token ID(s) are outside the vocabulary [0, {self.vocab_size}): "
                      f"{out_of_vocab[:5]}")
        if not math.isfinite(params.temperature) or params.temperature < 0:
            raise bad(f"temperature must be a finite number >= 0, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {params.top_p}")
        if not isinstance(params.top_k, int):
            raise bad(f"top_k must be an integer, got {params.top_k!r}")

    def _submit(self, job: _Job) -> None:
        """Queue a job; jobs submitted in the same event-loop tick reach the worker together.

        ``asyncio.gather(generate(a), generate(b))`` submits a and b one task step apart. Put
        straight on the queue, the worker could wake on a and start a batch of one. Instead,
        jobs collect in an inbox that a ``call_soon`` callback flushes as one chunk, after the
        tasks already scheduled in this tick have run: no delay, and no race.
        """
        with self._inbox_lock:
            self._inbox.append(job)
        # One flush per job (later flushes of an emptied inbox do nothing): nothing can be
        # stranded in the inbox even if a loop closes before running its callback.
        asyncio.get_running_loop().call_soon(self._flush_inbox)

    def _flush_inbox(self) -> None:
        with self._inbox_lock:
            chunk, self._inbox = self._inbox, []
        if chunk:
            self._jobs.put(chunk)

    # ------------------------------------------------------------------ worker thread

    def _work(self) -> None:
        """The worker: take all waiting jobs, run them in order, batching consecutive requests."""
        backlog: deque[_Job] = deque()
        while True:
            if not backlog:
                backlog.extend(self._jobs.get())
            while True:  # everything else already waiting joins the backlog
                try:
                    backlog.extend(self._jobs.get_nowait())
                except queue.Empty:
                    break
            head = backlog[0]
            if isinstance(head, _Close):
                backlog.popleft()
                self._fail_all(backlog, EngineError("the engine closed before this request ran", status=503))
                return
            if isinstance(head, _WeightLoad):
                backlog.popleft()
                self._apply_weights(head)
                continue
            batch: list[_Request] = []
            while backlog and isinstance(backlog[0], _Request) and len(batch) < self.max_batch_size:
                request = backlog.popleft()
                assert isinstance(request, _Request)
                if not request.future.done():  # skip callers that gave up while queued
                    batch.append(request)
            if batch:
                self._run_batch_safely(batch)

    @staticmethod
    def _fail_all(jobs: Iterable[_Job], error: EngineError) -> None:
        for job in jobs:
            if isinstance(job, (_Request, _WeightLoad)):
                _resolve(job.loop, job.future, error=error)

    def _run_batch_safely(self, batch: list[_Request]) -> None:
        """Run a batch; an unexpected error fails that batch's unanswered requests, not the worker."""
        try:
            self._run_batch(batch)
        except Exception as exc:  # noqa: BLE001 - the worker must outlive any one batch
            log.exception("hf engine: a batch of %d failed", len(batch))
            error = EngineError(f"generation failed: {type(exc).__name__}: {exc}", status=500)
            # Rows answered before the failure keep their answers: _resolve skips done futures.
            self._fail_all(batch, error)

    @torch.inference_mode()
    def _run_batch(self, batch: list[_Request]) -> None:
        """Decode a batch to completion: one prefill, then one forward per step for live rows."""
        self.batches_run.append(len(batch))
        assert self._model is not None
        rows = [_Row(request, self._generator(request.params)) for request in batch]
        input_ids, mask = self._left_pad([request.prompt_ids for request in batch])
        # Padding shifts where each prompt starts, so positions come from the mask, not the
        # column index: every row sees positions 0..n-1, exactly as if it ran alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._model.config)
        logits = self._forward(input_ids, mask, positions, cache)
        last_position = positions[:, -1:]
        while True:
            next_ids = self._step(rows, logits)
            for row in rows:
                if row.done:
                    self._answer(row)
            keep = [i for i, row in enumerate(rows) if not row.done]
            if not keep:
                return
            if len(keep) < len(rows):  # drop finished rows: later steps cost only the live ones
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, last_position, next_ids = mask[index], last_position[index], next_ids[index]
                rows = [rows[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            last_position = last_position + 1
            logits = self._forward(next_ids[:, None], mask, last_position, cache)

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left padding keeps every row's last prompt token in the last column, where decoding appends."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), _PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        """Next-token logits (fp32, one row per live request); only the last position goes through lm_head."""
        assert self._model is not None
        out = self._model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                          use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
        return out.logits[:, -1, : self.vocab_size].float()

    def _step(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Choose each live row's next token, record it with its raw logprob, mark finished rows."""
        chosen = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
        for i, row in enumerate(rows):
            try:
                chosen[i] = self._choose(logits[i], row.request.params, row.generator)
            except Exception as exc:  # noqa: BLE001 - e.g. NaN logits: fail this row only
                row.error = EngineError(f"sampling failed: {type(exc).__name__}: {exc}", status=500)
        # Raw logprob = logit - logsumexp(logits): the model's own distribution, before any
        # temperature or truncation, computed for the live rows only and without a vocab-sized output.
        raw = logits.gather(-1, chosen[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        for row, token, logprob in zip(rows, chosen.tolist(), raw.tolist()):
            if row.done:
                continue
            row.token_ids.append(token)
            row.logprobs.append(logprob)
            if token in row.request.params.stop_token_ids:
                row.finish_reason = "stop"
            elif len(row.token_ids) >= row.request.params.max_tokens:
                row.finish_reason = "length"
        return chosen

    @staticmethod
    def _choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
        """vLLM's order: temperature, then top-k, then top-p, then one draw from this row's generator."""
        if params.temperature < _GREEDY_BELOW:
            return int(logits.argmax())
        scaled = logits / params.temperature
        if 0 < params.top_k < scaled.numel():
            kth = torch.topk(scaled, params.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, -math.inf)
        if params.top_p < 1.0:
            ordered, order = scaled.sort(descending=True)
            probs = ordered.softmax(-1)
            # Keep the smallest head of the distribution whose mass reaches top_p (always >= 1 token).
            drop = (probs.cumsum(-1) - probs) >= params.top_p
            scaled = scaled.masked_fill(drop.scatter(0, order, drop), -math.inf)
        return int(torch.multinomial(scaled.softmax(-1), 1, generator=generator))

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        """A private RNG per seeded request: its draws cannot depend on its batch neighbours."""
        if params.seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(params.seed % 2**64)

    def _answer(self, row: _Row) -> None:
        request = row.request
        if row.error is not None:
            _resolve(request.loop, request.future, error=row.error)
        elif row.finish_reason is not None:
            _resolve(request.loop, request.future, Generation(row.token_ids, row.logprobs, row.finish_reason))

    # ------------------------------------------------------------------ weights

    def _read_checkpoint(self, path: Path) -> dict[str, torch.Tensor]:
        """Read a save_pretrained directory's (or one file's) safetensors and check them against the model."""
        def bad(message: str) -> EngineError:
            return EngineError(message, status=400, type="invalid_request_error")

        try:
            if not path.exists():
                raise bad(f"weights path {path} does not exist")
            if path.is_file():
                files = [path]
            elif (path / _INDEX).is_file():
                files = _indexed_files(path, bad)
            else:
                files = sorted(path.glob("*.safetensors"))
        except (OSError, ValueError) as exc:  # unreadable folder, a name too long, a NUL byte
            raise bad(f"cannot read weights path {path}: {exc}") from exc
        if not files:
            raise bad(f"no .safetensors weights in {path} (save with save_pretrained(safe_serialization=True))")
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                tensors.update(load_file(file))
            except Exception as exc:  # noqa: BLE001 - any unreadable file is the caller's input
                raise bad(f"cannot read weights file {file}: {exc}") from exc
        self._check_checkpoint(tensors, path, bad)
        return tensors

    def _check_checkpoint(self, tensors: dict[str, torch.Tensor], path: Path, bad: Any) -> None:
        """Refuse a checkpoint unless it fills every weight with the right shape, before copying any.

        Tied weights (lm_head = embed_tokens) share storage; a checkpoint may hold either name.
        """
        state = self._state
        unexpected = sorted(set(tensors) - set(state))
        if unexpected:
            raise bad(f"{path}: {len(unexpected)} weight(s) the model does not have, e.g. {unexpected[:5]}")
        mismatched = [f"{name}: {tuple(t.shape)} in the checkpoint, {tuple(state[name].shape)} in the model"
                      for name, t in tensors.items() if t.shape != state[name].shape]
        if mismatched:
            raise bad(f"{path}: {len(mismatched)} weight shape(s) do not match the model, e.g. {mismatched[:3]}")
        groups: dict[object, list[str]] = {}
        for name, tensor in state.items():
            ptr = tensor.untyped_storage().data_ptr()
            key = (ptr, tensor.storage_offset(), tuple(tensor.shape)) if ptr else name
            groups.setdefault(key, []).append(name)
        missing = []
        for names in groups.values():
            present = [n for n in names if n in tensors]
            if not present:
                missing.extend(names)
            elif any(not torch.equal(tensors[present[0]], tensors[n]) for n in present[1:]):
                raise bad(f"{path}: tied weights {present} differ in the checkpoint; the model ties them")
        if missing:
            raise bad(f"{path}: {len(missing)} model weight(s) missing from the checkpoint, e.g. {missing[:5]}")

    @torch.no_grad()
    def _apply_weights(self, job: _WeightLoad) -> None:
        try:
            for name, tensor in job.tensors.items():
                self._state[name].copy_(tensor)  # casts dtype and moves device as needed
        except Exception as exc:  # noqa: BLE001 - report it to the caller, keep serving
            log.exception("hf engine: loading weights failed")
            _resolve(job.loop, job.future, error=EngineError(f"loading weights failed: {exc}", status=500))
        else:
            _resolve(job.loop, job.future)
