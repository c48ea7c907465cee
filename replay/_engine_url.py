"""Re-score recorded tokens on a live vLLM through ``prompt_logprobs`` (engine vs recording).

Each training sequence (a rollout's full context) is sent once to ``/v1/completions`` as a
token-ID prompt with ``max_tokens: 1`` and ``prompt_logprobs: 0``: vLLM then returns, for
every prompt position, the logprob of the token that is actually there given everything before
it, which for the generated positions is exactly what the sampler recorded. Nothing is
re-tokenized and nothing is echoed. Requests run concurrently (httpx, a bounded number in
flight) so a batching engine sees many at once.

Prompt logprobs are what vLLM's ``logprobs_mode`` says (default ``raw_logprobs``: the model's
distribution before temperature, top-p, top-k). A tape whose calls recorded ``processed``
logprobs therefore cannot match unless the engine runs in a processed mode; replay says so in
a warning rather than silently comparing different quantities.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np
import orjson

from recorder import GymtapeError

_HEADERS = {"content-type": "application/json"}


class EngineReplayError(GymtapeError):
    """The engine at ``--engine-url`` cannot re-score the tape (unreachable, refuses, odd answer)."""


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


async def _pick_model(client: httpx.AsyncClient, url: str, model: str | None) -> tuple[str, int]:
    try:
        r = await client.get(f"{url}/v1/models")
    except httpx.HTTPError as e:
        raise EngineReplayError(f"cannot reach the engine at {url} ({type(e).__name__}: {e}); is vLLM running there?") from e
    if r.status_code != 200:
        raise EngineReplayError(f"{url}/v1/models answered {r.status_code}: {r.text[:300]}")
    models = r.json().get("data") or []
    if not models:
        raise EngineReplayError(f"the engine at {url} serves no model")
    chosen = next((m for m in models if m.get("id") == model), None) if model else models[0]
    if chosen is None:
        names = ", ".join(str(m.get("id")) for m in models)
        raise EngineReplayError(f"the engine at {url} does not serve {model!r} (it serves {names}); pass --engine-model")
    return str(chosen["id"]), int(chosen.get("max_model_len") or 0)


def _prompt_logprobs(answer: dict[str, Any], ids: np.ndarray, mask: np.ndarray, where: str) -> np.ndarray:
    """The prompt token's logprob at each masked position of one vLLM answer (0.0 elsewhere)."""
    try:
        entries = answer["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError) as e:
        raise EngineReplayError(f"{where}: the answer has no choices[0].prompt_logprobs; is this a vLLM "
                                "(it must accept `prompt_logprobs` on /v1/completions)?") from e
    if entries is None or len(entries) != ids.size:
        got = None if entries is None else len(entries)
        raise EngineReplayError(f"{where}: {got} prompt logprobs for a {ids.size}-token prompt")
    out = np.zeros(ids.size, dtype=np.float32)
    for t in np.flatnonzero(mask).tolist():  # JSON decoding is per position anyway; only scored ones are read
        entry = entries[t]
        hit = entry.get(str(int(ids[t]))) if entry else None
        if hit is None:
            raise EngineReplayError(f"{where}: position {t} has no logprob for its token {int(ids[t])}")
        out[t] = hit["logprob"] if isinstance(hit, dict) else hit
    return out


def score_on_engine(
    url: str,
    sequences: Sequence[np.ndarray],
    score_masks: Sequence[np.ndarray],
    *,
    model: str | None = None,
    concurrency: int = 16,
    timeout: float = 600.0,
    api_key: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[np.ndarray], str]:
    """Each sequence's prompt logprobs from the vLLM at ``url``; returns (per-sequence arrays, model name).

    Positions where ``score_masks[j]`` is 0 come back as 0.0. Sequences without a masked
    position are not sent.
    """
    return asyncio.run(_score(url, sequences, score_masks, model=model, concurrency=concurrency, timeout=timeout,
                              api_key=api_key, progress=progress))


async def _score(url: str, sequences: Sequence[np.ndarray], score_masks: Sequence[np.ndarray], *, model: str | None,
                 concurrency: int, timeout: float, api_key: str | None,
                 progress: Callable[[int], None] | None) -> tuple[list[np.ndarray], str]:
    base = _base(url)
    headers = {**_HEADERS, **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    out = [np.zeros(len(s), dtype=np.float32) for s in sequences]
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0), limits=limits) as client:
        name, max_len = await _pick_model(client, base, model)
        too_long = [j for j, s in enumerate(sequences) if max_len and len(s) + 1 > max_len]
        if too_long:
            j = too_long[0]
            raise EngineReplayError(f"{len(too_long)} sequences do not fit the engine's max_model_len {max_len} "
                                    f"(sequence {j} has {len(sequences[j])} tokens, +1 generated); restart vLLM "
                                    "with a larger --max-model-len")
        gate = asyncio.Semaphore(concurrency)
        endpoint = f"{base}/v1/completions"

        async def one(j: int) -> None:
            ids = np.asarray(sequences[j])
            mask = np.asarray(score_masks[j]).astype(bool)
            body = {"model": name, "prompt": ids.astype(np.int64).tolist(), "max_tokens": 1, "temperature": 0.0,
                    "prompt_logprobs": 0, "skip_special_tokens": False}
            async with gate:
                try:
                    r = await client.post(endpoint, content=orjson.dumps(body))
                except httpx.HTTPError as e:
                    raise EngineReplayError(f"sequence {j}: the engine at {base} failed ({type(e).__name__}: {e})") from e
            if r.status_code != 200:
                raise EngineReplayError(f"sequence {j}: {endpoint} answered {r.status_code}: {r.text[:300]}")
            out[j] = _prompt_logprobs(orjson.loads(r.content), ids, mask, f"sequence {j}")
            if progress is not None:
                progress(ids.size)

        todo = [j for j in range(len(sequences)) if len(sequences[j]) and np.asarray(score_masks[j]).any()]
        tasks = [asyncio.create_task(one(j)) for j in todo]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
    return out, name
