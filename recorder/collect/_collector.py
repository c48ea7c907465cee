"""`gymtape record`: collect rollouts from environments straight into a tape.

Sources of rollouts, both producing NeMo Gym rollout lines:

* a running Gym agent server: POST ``{agent_url}/run`` with a task line; the answer is the
  verifier's rollout line (``response`` with token fields on its output items);
* a built-in environment (recorder._envs): a local agent loop that speaks the protocol of
  Gym's simple agent against a chat-completions endpoint (message-level token fields carried
  forward, tool calls executed, verifier reward).

Each line becomes a rollout row plus call rows (recorder._gym.line_to_records). When the model
server is `gymtape serve` (one replica or several) recording into the same tape, its call rows
already exist: the rollout is joined to them (same rollout id) and no call rows are written
twice. The join is resolved on the tape, not by asking a server: the calls' token IDs are
looked up in the tape's call-key index and the recorded rollout is claimed there, so each
recorded rollout joins at most one agent rollout, identical greedy repeats included
(recorder.tape._claims; docs/record.md).

Servers that go away mid-run are waited for (``_servers.ServerGate``, ``server_wait``), not
turned into a wall of failed rows; ``--resume --retry-failed`` runs again what failed or lost
its calls, and the new row supersedes the old (``recorder.rollout_integrity``).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from ._envs import BuiltinEnv, builtin_env
from .._errors import RecordConfigError
from ._gym import line_to_records
from ._servers import ServerGate, server_root
from ..tape._claims import CallClaims, Chain
from ..tape._integrity import read_integrity
from ..tape._keys import KEYS_DIR, KeyIndex, call_key
from ..tape._reader import Tape
from ..tape._records import RolloutRecord
from ..tape._storage import require_posix
from ..tape._writer import TapeWriter

TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")


@dataclass(kw_only=True)
class EnvConfig:
    """One environment to collect from; nothing about an environment needs a code change."""

    #: Name stored in the tape's `env` column and used by --select.
    name: str
    #: Gym task JSONL (default for built-in envs: their train split).
    tasks: Path | None = None
    #: Rollouts per task.
    repeats: int = 1
    #: A running Gym agent server (POST {agent_url}/run) ...
    agent_url: str | None = None
    #: ... or a built-in environment name (see `gymtape record --list-envs`).
    builtin: str | None = None
    #: Built-in envs: the chat-completions base URL (e.g. http://127.0.0.1:8000/v1) and model name.
    #: Several URLs (replicas): each call of a rollout goes to the next one, round robin.
    model_url: str | list[str] | None = None
    model: str = "default"
    #: The gymtape serve replicas the model calls go through (none, one or several): waited for
    #: when they go away, and checked to record into this tape. The join itself needs none of
    #: them: it is resolved on the tape. Default for built-in envs: model_url.
    server_url: str | list[str] | None = None
    #: Sampling overrides: temperature, top_p, max_tokens, seed (one seed for every request).
    sampling: dict[str, Any] = field(default_factory=dict)
    #: Share of this env in the interleaved work order (and under --limit).
    weight: float = 1.0
    #: Which tasks of the task file (0-based line numbers of its task lines, in this order);
    #: None: all of them. Each is run ``repeats`` times.
    task_indices: list[int] | None = None
    #: Seeds sampling per rollout: each (task, repeat) is sampled with its own seed derived from
    #: this one and the env name (:func:`rollout_seed`), so a re-run samples the same rollouts
    #: and no two rollouts of a run share a seed. None: the engine's own randomness.
    seed: int | None = None

    def validate(self) -> None:
        for name in ("model_url", "server_url"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not (
                    isinstance(value, (list, tuple)) and all(isinstance(u, str) and u for u in value)):
                raise RecordConfigError(f"env {self.name}: {name} must be a URL or a list of URLs, got {value!r}")
            if isinstance(value, (list, tuple)):
                setattr(self, name, list(value) or None)
        if (self.agent_url is None) == (self.builtin is None):
            raise RecordConfigError(f"env {self.name}: give exactly one of agent_url or builtin")
        if self.builtin is not None:
            try:
                env = builtin_env(self.builtin)
            except KeyError as e:
                raise RecordConfigError(str(e.args[0])) from None
            if self.model_url is None:
                raise RecordConfigError(f"env {self.name}: a built-in env needs model_url (the chat endpoint)")
            self.tasks = self.tasks or env.tasks_path("train")
        if self.tasks is None or not Path(self.tasks).is_file():
            raise RecordConfigError(f"env {self.name}: task file {self.tasks} not found")
        if self.repeats < 1 or self.weight <= 0:
            raise RecordConfigError(f"env {self.name}: repeats must be >= 1 and weight > 0")
        unknown = set(self.sampling) - {"temperature", "top_p", "max_tokens", "seed"}
        if unknown:
            raise RecordConfigError(f"env {self.name}: unknown sampling keys {sorted(unknown)}")
        if self.seed is not None and "seed" in self.sampling:
            raise RecordConfigError(f"env {self.name}: give seed (one per rollout) or sampling.seed (the same for "
                                    "every request), not both")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise RecordConfigError(f"env {self.name}: seed must be an integer, got {self.seed!r}")
        if self.task_indices is not None:
            bad = [i for i in self.task_indices if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if bad:
                raise RecordConfigError(f"env {self.name}: task_indices must be integers >= 0, got {bad}")
            twice = sorted({i for i in self.task_indices if self.task_indices.count(i) > 1})
            if twice:
                raise RecordConfigError(f"env {self.name}: task_indices lists {twice} more than once; "
                                        "to run a task more often, raise repeats")


@dataclass(kw_only=True)
class RecordConfig:
    tape: Path
    envs: list[EnvConfig]
    concurrency: int = 8
    #: Seconds one rollout may take (all its calls) before it is retried or failed.
    timeout: float = 600.0
    #: Retries on transient errors (connection errors, 5xx, timeouts), with backoff.
    retries: int = 2
    #: Skip (env, task, repeat) triples already on the tape.
    resume: bool = False
    #: With ``resume``: also run again every (env, task, repeat) whose rows on the tape are all
    #: failed, point at missing calls or are incomplete; the new row supersedes the old one
    #: (``recorder.rollout_integrity``; docs/record.md).
    retry_failed: bool = False
    #: Seconds to wait for a model or agent server that stopped answering (connection refused,
    #: 5xx, timeouts) to come back before the remaining work that needs it fails; 0: at once.
    server_wait: float = 300.0
    #: Stop after this many rollouts (in the weighted, interleaved order).
    limit: int | None = None

    def __post_init__(self) -> None:
        # Live capture needs rename and fsync: a POSIX folder, never a URL (StorageError says so).
        self.tape = require_posix(self.tape, "gymtape record --tape")


def load_config(path: Path, *, tape: Path | None = None, select: list[str] | None = None) -> RecordConfig:
    """Read a run YAML: `tape`, `concurrency`, ..., and `environments:` (a list of EnvConfig fields)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecordConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("environments"), list):
        raise RecordConfigError(f"{path}: expected a mapping with an `environments:` list")
    base = path.parent
    defaults = {k: data[k] for k in ("model_url", "model", "server_url", "seed") if k in data}
    envs = []
    for i, e in enumerate(data["environments"]):
        if not isinstance(e, dict) or "name" not in e:
            raise RecordConfigError(f"{path}: environments[{i}] needs a name")
        e = {**defaults, **e}
        if e.get("tasks") is not None:
            e["tasks"] = (base / e["tasks"]) if not Path(e["tasks"]).is_absolute() else Path(e["tasks"])
        try:
            envs.append(EnvConfig(**e))
        except TypeError as err:
            raise RecordConfigError(f"{path}: environments[{i}]: {err}") from None
    if select:
        names = {e.name for e in envs}
        missing = set(select) - names
        if missing:
            raise RecordConfigError(f"--select {','.join(sorted(missing))}: not in {path} (has {', '.join(sorted(names))})")
        envs = [e for e in envs if e.name in select]
    tape_path = tape or (base / data["tape"] if data.get("tape") else None)
    if tape_path is None:
        raise RecordConfigError(f"{path}: no tape given (set `tape:` or pass --tape)")
    known = {"concurrency", "timeout", "retries", "limit", "server_wait"}
    return RecordConfig(tape=Path(tape_path), envs=envs, **{k: v for k, v in data.items() if k in known})


@dataclass
class RecordReport:
    ok: int = 0
    truncated: int = 0
    failed: int = 0
    skipped: int = 0
    #: Of the rollouts run, those whose earlier rows failed or were broken (``retry_failed``).
    retried: int = 0
    joined: int = 0
    tokens: int = 0
    reward_sum: float = 0.0
    rewarded: int = 0
    elapsed_s: float = 0.0
    #: Seconds spent waiting for servers that went away (summed over servers).
    server_wait_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.ok + self.truncated + self.failed

    @property
    def mean_reward(self) -> float | None:
        return self.reward_sum / self.rewarded if self.rewarded else None


@dataclass(frozen=True)
class WorkItem:
    env: EnvConfig
    task_index: int
    repeat: int
    task: dict[str, Any]
    #: The rollout's sampling seed (EnvConfig.seed), or None.
    seed: int | None = None


def rollout_seed(seed: int, env: str, task_index: int, repeat: int) -> int:
    """The sampling seed of one rollout: a hash of the run's seed, env, task and repeat, so every
    rollout is reproducible and no two share a seed (31 bits: what every engine accepts)."""
    key = f"{seed}\0{env}\0{task_index}\0{repeat}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little") & 0x7FFFFFFF


class _Transient(Exception):
    """Worth retrying: connection trouble, 5xx, a timeout. ``url``: the request that failed."""

    def __init__(self, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


#: Attempts per rollout that may end with its server away (and come back) without counting as
#: retries: past this, a rollout whose requests keep taking the server down stops being tried.
MAX_SERVER_AWAY_ATTEMPTS = 10


class _Permanent(Exception):
    """Not worth retrying: the request itself is wrong (4xx), or the answer is unusable."""


def work_items(envs: list[EnvConfig]) -> list[WorkItem]:
    """All (env, task, repeat) triples, interleaved by weight (deterministic)."""
    keyed = []
    for env in envs:
        lines = [orjson.loads(x) for x in Path(env.tasks).read_bytes().splitlines() if x.strip()]  # type: ignore[arg-type]
        indices = list(range(len(lines))) if env.task_indices is None else env.task_indices
        outside = [i for i in indices if i >= len(lines)]
        if outside:
            raise RecordConfigError(f"env {env.name}: task_indices {outside} are out of range: {env.tasks} has "
                                    f"{len(lines)} tasks (0..{len(lines) - 1})")
        k = 0
        for repeat in range(env.repeats):
            for ti in indices:
                seed = None if env.seed is None else rollout_seed(env.seed, env.name, ti, repeat)
                keyed.append(((k + 0.5) / env.weight, env.name, WorkItem(env, ti, repeat, lines[ti], seed)))
                k += 1
    keyed.sort(key=lambda x: (x[0], x[1]))
    return [x[2] for x in keyed]


_base = server_root


async def _post(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        r = await client.post(url, content=orjson.dumps(body), headers={"content-type": "application/json"})
    except httpx.HTTPError as e:
        raise _Transient(f"{url}: {type(e).__name__}: {e}", url) from e
    if r.status_code >= 500:
        raise _Transient(f"{url} answered {r.status_code}: {r.text[:300]}", url)
    if r.status_code >= 400:
        raise _Permanent(f"{url} answered {r.status_code}: {r.text[:300]}")
    try:
        return r.json()
    except ValueError as e:
        raise _Permanent(f"{url} answered non-JSON: {r.text[:200]!r}") from e


def _chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses-API tools ({type, name, parameters}) → Chat Completions tools."""
    if not tools:
        return None
    out = []
    for t in tools:
        if "function" in t:
            out.append(t)
        else:
            out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}})
    return out


def _token_fields(resp: dict[str, Any], choice: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
    """The three token fields, in Gym's order of preference: on the message, else vLLM's
    top-level ``prompt_token_ids`` + ``choices[0].token_ids`` with ``logprobs.content``."""
    if all(msg.get(f) is not None for f in TOKEN_FIELDS):
        return {f: msg[f] for f in TOKEN_FIELDS}
    gen = choice["token_ids"]
    logprobs = [c["logprob"] for c in choice["logprobs"]["content"]]
    if len(logprobs) != len(gen):
        raise ValueError(f"{len(gen)} token IDs but {len(logprobs)} logprobs")
    return {"prompt_token_ids": resp["prompt_token_ids"], "generation_token_ids": gen, "generation_log_probs": logprobs}


async def run_builtin(client: httpx.AsyncClient, env: BuiltinEnv, cfg: EnvConfig, task: dict[str, Any],
                      task_index: int, repeat: int, *, seed: int | None = None, first_url: int = 0
                      ) -> tuple[dict[str, Any], list[dict[str, Any] | None]]:
    """One episode of Gym's simple-agent loop against a chat endpoint; returns (Gym line, join info per call).
    A multi-turn env (``env.follow_up``) answers each turn's final answer with its next user
    message, appended to the chat messages and recorded in the output items as a Responses input
    message (which Gym's Responses-to-chat conversion turns back into that user message).
    ``seed`` seeds the first call; each later call gets its own seed derived from it (the same
    seed on every turn would draw the same random numbers each turn). With several model URLs,
    call ``step`` goes to URL ``first_url + step`` (round robin), as a balancer might send it."""
    rcp = task.get("responses_create_params") or {}
    messages: list[dict[str, Any]] = [
        {"role": m.get("role", "user"), "content": m.get("content")} for m in rcp.get("input", []) if isinstance(m, dict)
    ]
    tools = _chat_tools(rcp.get("tools"))
    params = {"temperature": rcp.get("temperature", 1.0), **{k: v for k, v in cfg.sampling.items()}}
    output: list[dict[str, Any]] = []
    joins: list[dict[str, Any] | None] = []
    answers: list[str | None] = []  # each turn's final answer
    status = "completed"
    model_name = cfg.model
    urls = urls_of(cfg.model_url)
    for step in range(env.max_steps):
        body = {"model": cfg.model, "messages": messages, **params, "logprobs": True, "top_logprobs": 0,
                "return_tokens_as_token_ids": True, "return_token_ids": True}
        if seed is not None:
            body["seed"] = seed if step == 0 else rollout_seed(seed, "call", step, 0)
        if tools:
            body["tools"] = tools
        resp = await _post(client, f"{urls[(first_url + step) % len(urls)].rstrip('/')}/chat/completions", body)
        try:
            choice = resp["choices"][0]
            msg = choice["message"]
            fields = _token_fields(resp, choice, msg)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise _Permanent(f"the chat endpoint answered without token IDs and logprobs ({e!r}); use gymtape "
                             "serve, or vLLM with return_token_ids") from e
        model_name = resp.get("model", model_name)
        joins.append(resp.get("gymtape"))
        calls = msg.get("tool_calls") or []
        items: list[dict[str, Any]] = []
        if msg.get("reasoning_content"):
            items.append({"type": "reasoning", "id": f"rs_{uuid.uuid4().hex[:12]}",
                          "summary": [{"type": "summary_text", "text": msg["reasoning_content"]}]})
        if msg.get("content") or not calls:
            items.append({"type": "message", "id": f"msg_{uuid.uuid4().hex[:12]}", "role": "assistant",
                          "status": "completed",
                          "content": [{"type": "output_text", "text": msg.get("content") or "", "annotations": []}]})
        for c in calls:
            items.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:12]}", "call_id": c["id"],
                          "name": c["function"]["name"], "arguments": c["function"]["arguments"], "status": "completed"})
        items[-1].update(fields)  # the last item of each model call carries its token fields (as in Gym)
        output.extend(items)
        # Carry the message forward exactly as returned: with its token fields when the server put
        # them on the message (gymtape serve splices them), as plain chat otherwise.
        messages.append({k: v for k, v in msg.items() if v is not None})
        if choice.get("finish_reason") == "length":
            status = "incomplete"
            answers.append(msg.get("content"))
            break
        if not calls:
            answers.append(msg.get("content"))
            follow_up = env.follow_up(task, len(answers) - 1, msg.get("content")) if env.follow_up else None
            if follow_up is None or step + 1 == env.max_steps:  # no turn left to answer it
                break
            messages.append({"role": "user", "content": follow_up})
            output.append({"type": "message", "role": "user", "content": [{"type": "input_text", "text": follow_up}]})
            continue
        for c in calls:
            try:
                args = orjson.loads(c["function"]["arguments"] or "{}")
            except orjson.JSONDecodeError:
                args = {}
            result = env.call_tool(c["function"]["name"], args if isinstance(args, dict) else {}, task)
            messages.append({"role": "tool", "tool_call_id": c["id"], "content": result})
            output.append({"type": "function_call_output", "call_id": c["id"], "output": result})
    reward, extras = env.score(task, answers)
    line = {
        "responses_create_params": rcp,
        "response": {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": time.time(),
                     "model": model_name, "output": output, "status": status,
                     "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None},
        "reward": reward,
        **{k: v for k, v in task.items() if k != "responses_create_params"},
        **extras,
        "_ng_task_index": task_index,
        "_ng_rollout_index": repeat,
        "agent_ref": {"type": "gymtape_builtin", "name": cfg.name},
    }
    return line, joins


async def run_agent(client: httpx.AsyncClient, cfg: EnvConfig, task: dict[str, Any], task_index: int,
                    repeat: int, *, seed: int | None = None) -> dict[str, Any]:
    """One rollout from a Gym agent server's /run (the verifier's answer is a rollout line)."""
    body = dict(task)
    rcp = dict(body.get("responses_create_params") or {})
    for k, v in cfg.sampling.items():
        rcp["max_output_tokens" if k == "max_tokens" else k] = v
    if seed is not None:
        rcp["seed"] = seed
    body["responses_create_params"] = rcp
    line = await _post(client, f"{cfg.agent_url.rstrip('/')}/run", body)  # type: ignore[union-attr]
    if not isinstance(line, dict) or "response" not in line:
        raise _Permanent(f"{cfg.agent_url}/run answered without a response object")
    line.setdefault("_ng_task_index", task_index)
    line.setdefault("_ng_rollout_index", repeat)
    return line


def urls_of(value: str | list[str] | None) -> list[str]:
    """EnvConfig.model_url / server_url as a list (none, one or several URLs)."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _joined_rollout_id(joins: list[dict[str, Any] | None]) -> str | None:
    """The server's rollout id when every call was answered as one rollout, in order: the
    chain the tape-side join tries first (greedy repeats may have crossed; then another)."""
    if not joins or any(j is None for j in joins):
        return None
    ids = {j["rollout_id"] for j in joins}  # type: ignore[index]
    indices = [j["call_index"] for j in joins]  # type: ignore[index]
    return ids.pop() if len(ids) == 1 and indices == list(range(indices[0], indices[0] + len(indices))) else None


class Recorder:
    """Runs the work list with bounded concurrency and writes each result as it arrives."""

    def __init__(self, config: RecordConfig, *, on_result: Callable[[RecordReport, int], None] | None = None,
                 on_message: Callable[[str], None] | None = None) -> None:
        for env in config.envs:
            env.validate()
        if not config.envs:
            raise RecordConfigError("no environments to record (check --select)")
        if config.retry_failed and not config.resume:
            raise RecordConfigError("--retry-failed runs again what an earlier run left failed: give --resume too")
        if config.server_wait < 0:
            raise RecordConfigError(f"server_wait must be >= 0 seconds, got {config.server_wait}")
        self.config = config
        self.report = RecordReport()
        self.on_result = on_result
        self.say = on_message or (lambda msg: print(f"gymtape record: {msg}", file=sys.stderr, flush=True))
        self._same_tape: dict[str, bool] = {}
        self._gates: dict[str, ServerGate] = {}
        self._joiner: CallClaims | None = None
        self._rollouts_started = 0

    def pending(self) -> list[WorkItem]:
        items = work_items(self.config.envs)
        if self.config.limit is not None:  # the same first N on a resumed run, so it finishes that set
            items = items[: self.config.limit]
        if self.config.resume and (self.config.tape / "tape.json").exists():
            rows, integrity = read_integrity(Tape(self.config.tape))
            keys = list(zip(*(rows.column(c).to_pylist() for c in ("env", "task_index", "rollout_index"))))
            if self.config.retry_failed:
                # Done: a row that neither failed nor lost calls nor is incomplete. The rest run again.
                settled = (~integrity.retryable).tolist()
                done = {k for k, ok in zip(keys, settled) if ok}
                broken = {k for k, ok in zip(keys, settled) if not ok} - done
            else:
                done, broken = set(keys), set()
            before = len(items)
            items = [i for i in items if (i.env.name, i.task_index, i.repeat) not in done]
            self.report.skipped = before - len(items)
            self.report.retried = sum((i.env.name, i.task_index, i.repeat) in broken for i in items)
            if self.report.retried:
                self.say(f"resume: {self.report.retried} rollout(s) that failed or lost calls run again; their new "
                         "rows supersede the old ones")
        return items

    def _gate(self, url: str, role: str) -> ServerGate:
        root = server_root(url)
        if root not in self._gates:
            self._gates[root] = ServerGate(url, role, self.config.server_wait, self.say)
        return self._gates[root]

    def _gates_for(self, env: EnvConfig) -> tuple[list[ServerGate], list[ServerGate]]:
        """The gates of the servers a rollout of ``env`` needs: those it calls (the agent, or the
        model URLs of a built-in env), and the model servers behind an agent (``server_url``: an
        agent answers 5xx while they are away). A built-in env's ``server_url`` is only joined
        with, never needed to run."""
        if env.agent_url is not None:
            calls = [self._gate(env.agent_url, "agent")]
            behind = [self._gate(u, "model") for u in urls_of(env.server_url)]
        else:
            calls, behind = [self._gate(u, "model") for u in urls_of(env.model_url)], []
        return calls, [g for g in behind if g not in calls]

    @staticmethod
    def _blocked(calls: list[ServerGate], behind: list[ServerGate]) -> str | None:
        """Why no attempt can succeed: every server the rollout calls is gone (one of several
        replicas gone leaves the others), or every model server behind its agent is."""
        for gates in (calls, behind):
            if gates and all(g.gone is not None for g in gates):
                return gates[0].gone
        return None

    async def run(self, items: list[WorkItem]) -> RecordReport:
        t0 = time.perf_counter()
        self._gates = {}  # asyncio objects belong to this run's event loop
        # Durable: each rollout row is on the tape (the write-ahead log) before the next work
        # starts, so a killed recorder loses nothing it reported, and --resume sees it all.
        writer = TapeWriter(self.config.tape, created_by="gymtape record", flush_rows=4096, flush_seconds=60.0,
                            durable=True)
        limits = httpx.Limits(max_connections=self.config.concurrency * 2, max_keepalive_connections=self.config.concurrency * 2)
        queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        for it in items:
            queue.put_nowait(it)
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(self.config.timeout, connect=10), limits=limits) as client:
                workers = [asyncio.create_task(self._worker(client, queue, writer))
                           for _ in range(min(self.config.concurrency, max(1, len(items))))]
                await asyncio.gather(*workers)
        except BaseException:
            writer.abort() if not writer.closed else None
            raise
        writer.close()
        self.report.elapsed_s = time.perf_counter() - t0
        self.report.server_wait_s = sum(g.waited_s for g in self._gates.values())
        return self.report

    async def _worker(self, client: httpx.AsyncClient, queue: asyncio.Queue[WorkItem], writer: TapeWriter) -> None:
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            self._write(item, await self._attempt(client, item), writer)

    async def _attempt(self, client: httpx.AsyncClient, item: WorkItem) -> tuple[dict[str, Any] | None, list[Any], str]:
        """Run one rollout: retried on transient errors; a server that went away is waited for
        (its gate) and the attempt it spoiled does not count; a gone server fails it at once."""
        calls, behind = self._gates_for(item.env)
        reason = ""
        attempt = away = 0
        while True:
            gone = self._blocked(calls, behind)
            if gone is not None:
                return None, [], gone
            try:
                return await asyncio.wait_for(self._one(client, item), self.config.timeout) + ("",)  # type: ignore[return-value]
            except (_Transient, asyncio.TimeoutError) as e:
                reason = str(e) or f"timed out after {self.config.timeout:g} s"
                # Probe the server the failed request went to (and, for an agent, the model
                # servers behind it); a timeout names none: probe them all.
                url = getattr(e, "url", None) or ""
                hit = [g for g in calls + behind if url == server_root(g.url) or url.startswith(server_root(g.url) + "/")]
                probe = (hit + (behind if hit and hit[0] in calls else [])) if hit else calls + behind
                verdicts = [await g.after_failure(client, reason) for g in probe]
                if "back" in verdicts and away < MAX_SERVER_AWAY_ATTEMPTS:
                    away += 1
                    continue
                if self._blocked(calls, behind) is not None:
                    continue  # fails with the gone server's reason above
                if attempt >= self.config.retries:
                    break
                await asyncio.sleep(min(30.0, 0.5 * 2**attempt) * (1 + random.random()))
                attempt += 1
            except _Permanent as e:
                reason = str(e)
                break
        return None, [], reason

    async def _check_server(self, client: httpx.AsyncClient, server_url: str) -> None:
        """Say once when a gymtape serve named for this env records elsewhere (or nothing): the
        calls of rollouts through it cannot be joined and are written again here. Joining itself
        never depends on this answer (it is resolved on the tape)."""
        if server_url in self._same_tape:
            return
        try:
            r = await client.get(f"{_base(server_url)}/health")
        except httpx.HTTPError:
            return  # not known yet: ask again next time (the server may be restarting)
        if r.status_code >= 500:
            return
        try:
            recording = r.json().get("recording") if r.status_code == 200 else None
        except (ValueError, AttributeError):  # not a gymtape serve (vLLM answers an empty 200)
            recording = None
        tape = recording.get("tape") if isinstance(recording, dict) else None
        same = tape is not None and Path(tape) == self.config.tape.resolve()
        self._same_tape[server_url] = same
        if isinstance(recording, dict) and not same:  # a gymtape serve (others have no `recording`)
            self.say(f"{server_url} records {'into ' + tape if tape else 'no tape'}, not into {self.config.tape}: "
                     "the calls of rollouts through it are written by gymtape record (give both the same --tape "
                     "to store them once)")

    async def _one(self, client: httpx.AsyncClient, item: WorkItem) -> tuple[dict[str, Any], list[Any]]:
        env = item.env
        servers = urls_of(env.server_url) or (urls_of(env.model_url) if env.builtin is not None else [])
        if env.builtin is not None:
            self._rollouts_started += 1
            line, joins = await run_builtin(client, builtin_env(env.builtin), env, item.task, item.task_index, item.repeat,
                                            seed=item.seed, first_url=self._rollouts_started)
        else:
            line = await run_agent(client, env, item.task, item.task_index, item.repeat, seed=item.seed)
            joins = []
        # Asked after the rollout ran: the server has just answered, so its /health does too
        # (asked before, a server coming back from a restart could not say which tape it records).
        for url in servers:
            await self._check_server(client, url)
        return line, joins

    def _join(self, calls: list[Any], joins: list[Any]) -> Chain | None:
        """Claim the rollout a gymtape serve recorded these calls as, on the tape (None: none did)."""
        if not calls:
            return None
        if self._joiner is None:
            if not (self.config.tape / KEYS_DIR).is_dir():
                return None  # no gymtape serve records into this tape (yet)
            self._joiner = CallClaims(self.config.tape, KeyIndex(self.config.tape), scan_evicted=True)
        keys = [call_key(c.prompt_ids, c.generation_ids) for c in calls]
        return self._joiner.join(keys, prefer=_joined_rollout_id(joins))

    def _write(self, item: WorkItem, result: tuple[dict[str, Any] | None, list[Any], str], writer: TapeWriter) -> None:
        line, joins, reason = result
        r = self.report
        if line is None:
            rcp = item.task.get("responses_create_params")
            writer.add_rollout(RolloutRecord(
                rollout_id=uuid.uuid4().hex, env=item.env.name, task_index=item.task_index, rollout_index=item.repeat,
                group_key=f"{item.env.name}#{item.task_index}", status="failed", status_reason=reason[:2000],
                input=rcp, source=f"gymtape record: {item.env.agent_url or item.env.builtin}"))
            writer.commit()
            r.failed += 1
            r.failures.append(f"{item.env.name} task {item.task_index} repeat {item.repeat}: {reason[:300]}")
        else:
            raw = orjson.dumps(line)
            rollout, calls = line_to_records(raw, orjson.loads(raw), f"gymtape record: {item.env.agent_url or item.env.builtin}")
            rollout.env = item.env.name
            rollout.group_key = f"{item.env.name}#{item.task_index}"
            joined = self._join(calls, joins)
            if joined is not None:
                # gymtape serve recorded these calls: point the rollout at them instead of copying them.
                rollout.rollout_id = joined.rollout_id
                rollout.num_calls = len(calls)
                rollout.prompt_tokens = sum(len(c.prompt_ids) for c in calls)
                rollout.generation_tokens = sum(len(c.generation_ids) for c in calls)
                versions = [e.policy_version for e in joined.calls]
                rollout.min_policy_version, rollout.max_policy_version = min(versions), max(versions)
                rollout.token_status = "ok" if all(len(c.generation_ids) for c in calls) else "partial"
                r.joined += 1
            else:
                for c in calls:
                    writer.add_call(c)
            writer.add_rollout(rollout)
            writer.commit()
            r.tokens += sum(len(c.generation_ids) for c in calls)
            if rollout.status == "truncated":
                r.truncated += 1
            else:
                r.ok += 1
            if rollout.reward is not None:
                r.reward_sum += rollout.reward
                r.rewarded += 1
        if self.on_result is not None:
            self.on_result(r, 1)


def record(config: RecordConfig, *, on_result: Callable[[RecordReport, int], None] | None = None,
           on_start: Callable[[int, int], None] | None = None,
           on_message: Callable[[str], None] | None = None) -> RecordReport:
    """Collect every pending (env, task, repeat) into the tape; see :class:`Recorder`.
    ``on_message`` gets what a user should read now (a server went away, came back, is gone;
    rollouts run again); default: standard error."""
    rec = Recorder(config, on_result=on_result, on_message=on_message)
    items = rec.pending()
    if on_start is not None:
        on_start(len(items), rec.report.skipped)
    return asyncio.run(rec.run(items))
