"""`gymtape train`: a reference GRPO loop on one machine, closing the loop through a tape.

Pieces, all real and all public: :class:`~recorder.ServeProcess` runs ``gymtape serve --engine hf``
for a :class:`~recorder.ServeConfig` (a child process) that samples the policy and records every
call with its policy version; :func:`recorder.record` runs a built-in environment against it
(each round: ``groups_per_step`` tasks × ``group_size`` rollouts, each with its own sampling
seed, joined to the server's calls);
a :class:`~trainer_bridge.TapeFollower` tails the tape and hands over complete groups with GRPO
advantages once they are within ``max_staleness`` versions of the trainer; the trainer scores
them with :func:`~trainer_bridge.packed_token_logprobs` under autograd, takes one AdamW step on
:func:`~trainer_bridge.policy_loss` (clipped, with a train-inference mismatch correction), saves
the weights (safetensors) and POSTs them to the server's ``/admin/weights``, which bumps the
policy version stamped on every later call.

``max_staleness=0`` is on-policy: round s is sampled only after update s-1 is live. With
``max_staleness=K`` the collector thread runs up to K rounds ahead of the trainer, so sampling
overlaps training and each batch is at most K versions old (the correction weight
``π_old/μ`` then covers staleness as well as kernel mismatch).

Validation: every ``val_every`` steps (and before the first and after the last), the first
``val_tasks`` tasks of the environment's validation split are answered greedily (temperature 0)
through the same server and recorded to ``OUT/validation`` (its own tape; the server also
logs those calls in ``OUT/tape`` as calls without a rollout row, which the follower never uses).

Outputs in ``OUT``: ``tape/``, ``validation/``, ``weights/step-N/`` (the latest ``keep_checkpoints``),
``metrics.jsonl`` (one row per step, step 0 = the base model's validation), ``curve.png``,
``serve.log`` and ``serve.json`` (the server's log and config), ``config.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow.compute as pc

from recorder import GymtapeError, ServeConfig, ServeProcess

from ._losses import CORRECTIONS, ISCorrection, policy_loss, sequence_index


class TrainError(GymtapeError):
    """The training loop cannot start or continue (bad settings, the server died, no data)."""


@dataclass(kw_only=True)
class TrainConfig:
    """Everything `gymtape train` needs; CLI flags map onto these fields one to one."""

    #: Run directory (created; must not hold an earlier run's metrics.jsonl).
    out: Path
    #: Built-in environment (``recorder.BUILTIN_ENVS``) to train on.
    env: str = "plus"
    #: Initial checkpoint (default: the embedded SmolLM2-135M-Instruct).
    model: str | None = None
    steps: int = 100
    #: Tasks per round, and rollouts per task (the GRPO group).
    groups_per_step: int = 8
    group_size: int = 4
    #: Sampling for training rollouts (validation uses the same max_tokens; greedy, plus val_samples).
    temperature: float = 1.0
    max_tokens: int = 32
    #: AdamW.
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    max_grad_norm: float = 1.0
    #: PPO clip range (clip-higher: clip_high > clip_low).
    clip_low: float = 0.2
    clip_high: float = 0.28
    #: Train-inference mismatch correction (trainer_bridge._losses.ISCorrection).
    correction: str = "tis"
    is_cap: float = 2.0
    is_low: float | None = None
    is_high: float | None = None
    #: Loss aggregation: token-mean (DAPO) or seq-mean-token-mean (GRPO as published).
    aggregate: str = "token-mean"
    #: GRPO advantage: divide by the group's std (False: Dr. GRPO).
    std_normalize: bool = True
    #: 0: on-policy. K > 0: sampling runs up to K versions ahead of the trainer.
    max_staleness: int = 0
    #: Validation every N steps (0: only before the first and after the last step).
    val_every: int = 10
    val_tasks: int = 64
    #: Also sample each validation task this many times at ``temperature`` (0: greedy only):
    #: ``val_reward_sampled`` is the policy's expected reward, what the RL objective moves.
    val_samples: int = 0
    #: Trainer micro-batch size in tokens (packed, no padding).
    token_budget: int = 4096
    #: Server engine dtype (the trainer keeps fp32 master weights and computes in fp32).
    serve_dtype: str = "float32"
    #: torch threads for the trainer and for the server process (None: torch's default). On a
    #: small CPU machine in async mode, give each a share of the cores: both run at once.
    threads: int | None = None
    serve_threads: int | None = None
    seed: int = 0
    #: Server port (0: a free one).
    port: int = 0
    #: Rollouts in flight while collecting.
    concurrency: int = 64
    #: Checkpoints kept under weights/ (the latest ones; the last step's is always kept).
    keep_checkpoints: int = 2
    #: Seconds the trainer waits for a batch, and for the server to start.
    batch_timeout: float = 600.0
    server_timeout: float = 300.0
    #: Write curve.png at the end.
    plot: bool = True
    #: The "without the correction" arm of ``gymtape train --ab``: the server re-templates every
    #: prompt from text (``ServeConfig.retemplate``) and the trainer trains on the sequences a
    #: re-templating trainer builds (:func:`~trainer_bridge.retemplated_sequences`).
    retemplate: bool = False
    #: Chat template of the sampling server: a Jinja file, or the name of a bundled one
    #: (``datasets/chat_templates/``, e.g. ``qwen3_nothink.jinja``); None: the model's own.
    chat_template: str | None = None

    def validate(self) -> None:
        from recorder import BUILTIN_ENVS

        _template_file(self.chat_template)
        if self.env not in BUILTIN_ENVS:
            raise TrainError(f"no built-in environment {self.env!r}; built-in: {', '.join(BUILTIN_ENVS)}")
        num_tasks = _count_tasks(BUILTIN_ENVS[self.env].tasks_path("train"))
        if self.groups_per_step > num_tasks:  # a round holds each task once
            raise TrainError(f"groups_per_step={self.groups_per_step} but the {self.env} training split has "
                             f"{num_tasks} tasks; lower --groups-per-step")
        positive = {"steps": self.steps, "groups_per_step": self.groups_per_step, "max_tokens": self.max_tokens,
                    "val_tasks": self.val_tasks, "token_budget": self.token_budget, "concurrency": self.concurrency,
                    "keep_checkpoints": self.keep_checkpoints}
        bad = [f"{k}={v}" for k, v in positive.items() if v < 1]
        bad += [f"{k}={v}" for k, v in (("threads", self.threads), ("serve_threads", self.serve_threads))
                if v is not None and v < 1]
        if self.group_size < 2:
            bad.append(f"group_size={self.group_size} (GRPO needs at least 2 rollouts per task)")
        if self.lr <= 0 or self.max_tokens < 1 or self.temperature <= 0:
            bad.append(f"lr={self.lr}, temperature={self.temperature} (both must be > 0)")
        if self.max_staleness < 0 or self.val_every < 0 or self.val_samples < 0:
            bad.append(f"max_staleness={self.max_staleness}, val_every={self.val_every}, "
                       f"val_samples={self.val_samples} (must be >= 0)")
        if self.correction not in CORRECTIONS:
            bad.append(f"correction={self.correction!r} (one of {', '.join(CORRECTIONS)})")
        if self.aggregate not in ("token-mean", "seq-mean-token-mean"):
            bad.append(f"aggregate={self.aggregate!r} (token-mean or seq-mean-token-mean)")
        if bad:
            raise TrainError("invalid training settings: " + "; ".join(bad))
        try:
            self.is_correction()
        except ValueError as e:
            raise TrainError(f"invalid correction settings: {e}") from None

    def is_correction(self) -> ISCorrection:
        kind: Any = self.correction
        return ISCorrection(kind, cap=self.is_cap, low=self.is_low, high=self.is_high)

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class TrainReport:
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    final_version: int = 0
    metrics_path: Path | None = None
    plot_path: Path | None = None

    @property
    def validation(self) -> list[tuple[int, float]]:
        return [(r["step"], r["val_reward"]) for r in self.rows if r.get("val_reward") is not None]

    @property
    def base_val_reward(self) -> float | None:
        v = self.validation
        return v[0][1] if v else None

    @property
    def final_val_reward(self) -> float | None:
        v = self.validation
        return v[-1][1] if v else None


# ----------------------------------------------------------------------------- the server


def _serve_config(cfg: TrainConfig, model_dir: str, tape: Path) -> ServeConfig:
    """The sampling server's settings: the hf engine on the initial checkpoint, recording to ``tape``."""
    return ServeConfig(engine="hf", model=model_dir, tape=tape, port=cfg.port, dtype=cfg.serve_dtype,
                       max_batch_size=max(16, min(cfg.concurrency, 64)), retemplate=cfg.retemplate,
                       chat_template=_template_file(cfg.chat_template))


def _template_file(name: str | None) -> str | None:
    """A chat template file's path: the given one, else the bundled template of that name."""
    from recorder import chat_template_path

    if name is None or Path(name).is_file():
        return name
    bundled = chat_template_path(name)
    if not bundled.is_file():
        raise TrainError(f"chat template {name!r} is neither a file nor a bundled template (bundled: "
                         f"{', '.join(sorted(p.name for p in bundled.parent.glob('*.jinja')))})")
    return str(bundled)  # answered calls are on the tape at once


# ----------------------------------------------------------------------------- collection


def _count_tasks(path: Path) -> int:
    return sum(1 for line in path.read_bytes().splitlines() if line.strip())


def _round_seed(seed: int, r: int) -> int:
    """Round r's seed (EnvConfig.seed): the recorder derives a distinct one per rollout from it."""
    return int.from_bytes(hashlib.blake2b(repr((seed, r)).encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


class _Collector:
    """Runs rounds of rollouts into the tape, at most ``max_staleness`` rounds ahead of the trainer.

    Round r (1-based) may start once the trainer has finished step ``r - 1 - max_staleness``,
    so with max_staleness 0 it is sampled by exactly the weights of update r - 1.
    """

    def __init__(self, cfg: TrainConfig, tape: Path, model_url: str) -> None:
        from recorder import builtin_env

        self.cfg = cfg
        self.tape = tape
        self.model_url = model_url
        self.num_tasks = _count_tasks(builtin_env(cfg.env).tasks_path("train"))
        self.order: list[int] = []
        self.rng = random.Random(cfg.seed)
        self.cond = threading.Condition()
        self.steps_done = 0
        self.rounds: dict[int, dict[str, Any]] = {}
        self.error: BaseException | None = None
        self.stopped = False
        self.thread: threading.Thread | None = None

    def _round_tasks(self) -> list[int]:
        """The next ``groups_per_step`` tasks of a fresh shuffle of the training split each epoch;
        a round never holds a task twice (one group per task), also across an epoch's end."""
        picked: list[int] = []
        while len(picked) < self.cfg.groups_per_step:
            if not self.order:
                self.order = list(range(self.num_tasks))
                self.rng.shuffle(self.order)
                # tasks this round already holds go first in the list: popped last, in a later round
                self.order.sort(key=lambda t: t not in picked)
            picked.append(self.order.pop())
        return picked

    def collect_round(self, r: int) -> dict[str, Any]:
        from recorder import EnvConfig, RecordConfig, record

        env = EnvConfig(name=self.cfg.env, builtin=self.cfg.env, model_url=self.model_url, repeats=self.cfg.group_size,
                        task_indices=self._round_tasks(), seed=_round_seed(self.cfg.seed, r),
                        sampling={"temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens})
        t0 = time.perf_counter()
        report = record(RecordConfig(tape=self.tape, envs=[env], concurrency=self.cfg.concurrency, retries=1))
        return {"round": r, "rollouts": report.done, "failed": report.failed, "truncated": report.truncated,
                "reward_mean": report.reward_sum / max(1, report.done), "tokens": report.tokens,
                "collect_s": time.perf_counter() - t0}

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="gymtape-train-collector", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for r in range(1, self.cfg.steps + 1):
                with self.cond:
                    self.cond.wait_for(lambda: self.stopped or self.steps_done >= r - 1 - self.cfg.max_staleness)
                    if self.stopped:
                        return
                info = self.collect_round(r)
                with self.cond:
                    self.rounds[r] = info
                    self.cond.notify_all()
        except BaseException as e:  # surfaced to the trainer thread
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def step_done(self, step: int) -> None:
        with self.cond:
            self.steps_done = step
            self.cond.notify_all()

    def round_info(self, r: int) -> dict[str, Any] | None:
        with self.cond:
            return self.rounds.get(r)

    def check(self) -> None:
        if self.error is not None:
            raise TrainError(f"collecting rollouts failed: {type(self.error).__name__}: {self.error}") from self.error

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        # A SIGTERM can land inside Thread.start(), before the thread counts as started: it then
        # sees `stopped` on its own, and joining it would raise instead of returning.
        if self.thread is not None and self.thread.is_alive():
            self.thread.join(timeout=120)


def _validate(cfg: TrainConfig, tape: Path, model_url: str) -> dict[str, Any]:
    """Greedy answers to the first ``val_tasks`` validation tasks (and, with ``val_samples``,
    sampled ones at the training temperature); a failed rollout scores 0."""
    from recorder import EnvConfig, RecordConfig, builtin_env, record

    tasks = builtin_env(cfg.env).tasks_path("validation")
    first = list(range(min(cfg.val_tasks, _count_tasks(tasks))))  # the first val_tasks validation tasks
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    runs = [("val_reward", 1, {"temperature": 0.0, "max_tokens": cfg.max_tokens})]
    if cfg.val_samples:
        runs.append(("val_reward_sampled", cfg.val_samples, {"temperature": cfg.temperature,
                                                              "max_tokens": cfg.max_tokens}))
    for key, repeats, sampling in runs:
        env = EnvConfig(name=f"{cfg.env}-validation", builtin=cfg.env, model_url=model_url, tasks=tasks,
                        task_indices=first, repeats=repeats, sampling=sampling)
        since = time.time()
        report = record(RecordConfig(tape=tape, envs=[env], concurrency=cfg.concurrency, retries=1))
        out[key] = report.reward_sum / max(1, report.done)
        out["val_failed"] = out.get("val_failed", 0) + report.failed
        if key == "val_reward":
            out.update(_turn_rewards(tape, env.name, since))
    out["val_s"] = time.perf_counter() - t0
    return out


def _turn_rewards(tape: Path, env: str, since: float) -> dict[str, Any]:
    """Multi-turn envs (rollout extras ``turn_rewards``): mean reward of each turn and mean model
    calls per rollout over the rollouts of ``env`` written since ``since`` (this validation pass)."""
    import datetime

    import polars as pl

    from recorder import Tape

    rows = (Tape(tape).rollouts().select("env", "num_calls", "extras_json", "created_at")
            .filter((pl.col("env") == env) & (pl.col("created_at") >= datetime.datetime.fromtimestamp(
                since, datetime.timezone.utc))).collect())
    turns = [orjson.loads(e).get("turn_rewards") if e else None for e in rows["extras_json"].to_list()]
    if not turns or any(t is None for t in turns):
        return {}
    width = max(len(t) for t in turns)
    return {"val_turn_rewards": [float(np.mean([t[k] if k < len(t) else 0.0 for t in turns])) for k in range(width)],
            "val_calls_mean": float(rows["num_calls"].mean())}


# ----------------------------------------------------------------------------- the update


def _update(model: Any, optimizer: Any, batch: Any, cfg: TrainConfig) -> dict[str, Any]:
    """One optimiser step on a follower batch; groups without reward spread are skipped (no gradient)."""
    import torch

    from ._logprobs import packed_token_logprobs
    from ._microbatch import micro_batches

    from ._retemplated import retemplated_sequences

    table = batch.table
    # rollouts the tape splits (a prompt that does not extend the previous call's context)
    split_rollouts = int(pc.sum(pc.greater(table["segment"], 0)).as_py() or 0) if table.num_rows else 0
    merged = None
    if cfg.retemplate:
        table, merged = retemplated_sequences(table)
    adv = table["advantage"].to_numpy(zero_copy_only=False)
    weights = table["weight"].to_numpy(zero_copy_only=False)
    rewards = table["reward"].to_numpy(zero_copy_only=False).astype(np.float64)
    staleness = table["staleness"].to_numpy(zero_copy_only=False)
    out: dict[str, Any] = {
        "sequences": table.num_rows, "reward_batch": float(np.nanmean(rewards)) if rewards.size else None,
        # model calls per training sequence: > 1 when multi-turn rollouts train as one sequence
        "calls_mean": float(np.mean(table["num_calls"].to_numpy())) if table.num_rows else None,
        "staleness_mean": float(staleness.mean()) if staleness.size else None,
        "staleness_max": int(staleness.max()) if staleness.size else None,
        "split_sequences": split_rollouts,
    }
    if merged is not None:
        out.update(retemplated_tokens=merged.tokens_moved, offpolicy_tokens=merged.offpolicy_tokens)
    live = np.flatnonzero((adv != 0) & (weights > 0))
    out["sequences_trained"] = int(live.size)
    if live.size == 0:
        out.update(loss=0.0, tokens=0, grad_norm=0.0, updated=False)
        return out
    sub = table.take(live)
    mbs = micro_batches(sub, cfg.token_budget, advantages=adv[live], weights=weights[live])
    n_tokens = float(sum(float(mb.extras["loss_mask"].sum()) for mb in mbs))
    n_seqs = float(live.size)
    correction = cfg.is_correction()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    gathered: dict[str, list[tuple[float, float]]] = {}
    for mb in mbs:
        lp = packed_token_logprobs(model, mb, temperature=cfg.temperature)
        seq = sequence_index(mb.cu_seqlens)
        loss, m = policy_loss(
            lp, mb.extras["behaviour_logprobs"], mb.extras["advantages"], mb.extras["loss_mask"],
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, correction=correction, weights=mb.extras["weights"],
            seq_index=seq, aggregate=cfg.aggregate,  # type: ignore[arg-type]
            normalizer=n_tokens if cfg.aggregate == "token-mean" else n_seqs)
        loss.backward()
        total += float(loss.detach())
        w = float(m["tokens"] or 0)
        for k, v in m.items():
            if v is not None and k != "tokens":
                gathered.setdefault(k, []).append((v, w))
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise TrainError(f"non-finite gradient norm ({grad_norm}); lower --lr or check the data")
    optimizer.step()
    for k, pairs in gathered.items():  # token-weighted over micro-batches (min/max: extremes)
        if k.endswith("_min"):
            out[k] = min(v for v, _ in pairs)
        elif k.endswith("_max"):
            out[k] = max(v for v, _ in pairs)
        else:
            out[k] = sum(v * w for v, w in pairs) / max(1e-12, sum(w for _, w in pairs))
    out.update(loss=total, tokens=int(n_tokens), grad_norm=grad_norm, updated=True)
    return out


# ----------------------------------------------------------------------------- the loop


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _log_line(row: dict[str, Any]) -> str:
    return (f"step {row['step']:>3} v{row['policy_version']:<3} loss {_fmt(row.get('loss'), '+.4f')} "
            f"reward {_fmt(row.get('reward_mean'), '.3f')} val {_fmt(row.get('val_reward'), '.3f')}"
            + (f"/{_fmt(row.get('val_reward_sampled'), '.3f')}s" if "val_reward_sampled" in row else "")
            + (" turns [" + ", ".join(f"{v:.3f}" for v in row["val_turn_rewards"]) + "]"
               if row.get("val_turn_rewards") else "") + " "
            f"k3 {_fmt(row.get('kl_k3'), '.1e')} tmpe {_fmt(row.get('token_mult_prob_error'), '.4f')} "
            f"IS [{_fmt(row.get('is_weight_min'), '.3f')}, {_fmt(row.get('is_weight_max'), '.3f')}] "
            f"stale {_fmt(row.get('staleness_mean'), '.2f')}/{_fmt(row.get('staleness_max'), 'd')} "
            f"calls {_fmt(row.get('calls_mean'), '.2f')} "
            f"tok {row.get('tokens', 0)} {row.get('seconds', 0):.1f}s")


def train(cfg: TrainConfig, *, log: Callable[[str], None] | None = None) -> TrainReport:
    """Run the GRPO loop described in the module docstring; returns the per-step rows."""
    cfg.validate()
    import torch
    from transformers import AutoModelForCausalLM

    from recorder import default_model_dir

    from ._filters import TapeFilters
    from ._follower import TapeFollower

    say = log or (lambda s: print(s, flush=True))
    out = Path(cfg.out)
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists():
        raise TrainError(f"{out} already holds a run ({metrics_path}); pick a new --out")
    (out / "weights").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_bytes(orjson.dumps(cfg.to_dict(), option=orjson.OPT_INDENT_2))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model_dir = str(cfg.model or default_model_dir())
    tape, val_tape = out / "tape", out / "validation"
    t_start = time.perf_counter()
    report = TrainReport(metrics_path=metrics_path)
    # Cleanup runs every step even if an earlier one raises (a SIGTERM turned SystemExit can land
    # anywhere, a collector's stop included): the server this loop starts must not outlive it.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(_exit_on_sigterm())
        # OMP_NUM_THREADS: torch's intra-op pool in the server
        server = ServeProcess(_serve_config(cfg, model_dir, tape), log=out / "serve.log",
                              env={"OMP_NUM_THREADS": str(cfg.serve_threads)} if cfg.serve_threads else None)
        cleanup.callback(server.stop)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        server.wait_ready(cfg.server_timeout)
        model_url = f"{server.url}/v1"
        version = 0
        follower = TapeFollower(tape, max_staleness=cfg.max_staleness, groups_per_batch=cfg.groups_per_step,
                                group_size=cfg.group_size, std_normalize=cfg.std_normalize, poll_interval=0.1,
                                # an answer cut off at max_tokens is a real (usually wrong) sample: keep it
                                filters=TapeFilters(status=("ok", "truncated")))
        with open(metrics_path, "ab") as jf:
            def emit(row: dict[str, Any]) -> None:
                jf.write(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
                jf.flush()
                report.rows.append(row)
                say(_log_line(row))

            emit({"step": 0, "policy_version": 0, **_validate(cfg, val_tape, model_url),
                  "elapsed_s": time.perf_counter() - t_start})
            collector = _Collector(cfg, tape, model_url)
            cleanup.callback(collector.stop)
            collector.start()
            checkpoints: list[Path] = []
            for step in range(1, cfg.steps + 1):
                t0 = time.perf_counter()
                batch = _next_batch(follower, version, cfg, collector, server)
                t_batch = time.perf_counter()
                upd = _update(model, optimizer, batch, cfg)
                t_train = time.perf_counter()
                if upd["updated"]:
                    ckpt = out / "weights" / f"step-{step}"
                    model.save_pretrained(ckpt, safe_serialization=True)
                    version = server.load_weights(ckpt)
                    checkpoints.append(ckpt)
                    while len(checkpoints) > cfg.keep_checkpoints:
                        shutil.rmtree(checkpoints.pop(0), ignore_errors=True)
                t_sync = time.perf_counter()
                collector.step_done(step)
                row: dict[str, Any] = {"step": step, "policy_version": version}
                info = collector.round_info(step)
                row["reward_mean"] = upd.pop("reward_batch")
                if info:
                    row.update(rollouts=info["rollouts"], failed=info["failed"], truncated=info["truncated"],
                               collect_s=info["collect_s"])
                row.update({k: v for k, v in upd.items() if k != "updated"})
                row.update(wait_s=t_batch - t0, train_s=t_train - t_batch, sync_s=t_sync - t_train)
                if step == cfg.steps or (cfg.val_every and step % cfg.val_every == 0):
                    row.update(_validate(cfg, val_tape, model_url))
                row["seconds"] = time.perf_counter() - t0
                row["elapsed_s"] = time.perf_counter() - t_start
                emit(row)
        report.final_version = version
    report.seconds = time.perf_counter() - t_start
    if cfg.plot and report.rows:
        report.plot_path = plot_curve(report.rows, out / "curve.png", title=f"gymtape train: {cfg.env}")
    return report


def _exit_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into SystemExit while the loop runs, so its ``finally`` stops the server it
    started (a plain SIGTERM would leave that child serving); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return lambda: signal.signal(signal.SIGTERM, previous)


def _next_batch(follower: Any, version: int, cfg: TrainConfig, collector: _Collector, server: ServeProcess) -> Any:
    """The follower's next batch, checking the collector and server while waiting."""
    from ._follower import FollowerTimeout

    deadline = time.monotonic() + cfg.batch_timeout
    while True:
        collector.check()
        server.check_alive()
        try:
            return follower.next_batch(trainer_version=version, timeout=min(5.0, max(0.1, deadline - time.monotonic())))
        except FollowerTimeout:
            if time.monotonic() >= deadline:
                raise TrainError(f"no training batch within {cfg.batch_timeout:.0f} s (follower: "
                                 f"{follower.stats().to_dict()}); see {server.log}") from None


def plot_curve(rows: list[dict[str, Any]], path: Path, *, title: str = "gymtape train") -> Path:
    """Training reward, validation reward, mismatch and staleness per step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows if r["step"] > 0]
    reward = [r.get("reward_mean") for r in rows if r["step"] > 0]
    val = [(r["step"], r["val_reward"]) for r in rows if r.get("val_reward") is not None]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    if steps:
        ax1.plot(steps, reward, color="tab:blue", alpha=0.35, lw=1, label="train reward (sampled, per step)")
        r = np.array([np.nan if v is None else v for v in reward], dtype=float)
        k = min(10, len(r))
        smooth = np.convolve(np.nan_to_num(r), np.ones(k) / k, mode="valid")
        ax1.plot(steps[k - 1:], smooth, color="tab:blue", lw=2, label=f"train reward ({k}-step mean)")
    if val:
        ax1.plot([s for s, _ in val], [v for _, v in val], "o-", color="tab:red", lw=2,
                 label="validation reward (greedy, held-out)")
    turns = [(r["step"], r["val_turn_rewards"]) for r in rows if r.get("val_turn_rewards")]
    for k in range(max((len(t) for _, t in turns), default=0)):  # multi-turn envs: each turn's share
        ax1.plot([s for s, t in turns if k < len(t)], [t[k] for _, t in turns if k < len(t)], ":", marker=".",
                 color=("tab:pink", "tab:brown", "tab:olive", "tab:cyan")[k % 4], lw=1.5,
                 label=f"validation, turn {k + 1} correct (greedy)")
    sampled = [(r["step"], r["val_reward_sampled"]) for r in rows if r.get("val_reward_sampled") is not None]
    if sampled:
        ax1.plot([s for s, _ in sampled], [v for _, v in sampled], "s--", color="tab:orange", lw=2,
                 label="validation reward (sampled at the training temperature, held-out)")
    _reward_axes(ax1, title)
    k3 = [(r["step"], r["kl_k3"]) for r in rows if r.get("kl_k3") is not None]
    if k3:
        ax2.semilogy([s for s, _ in k3], [max(v, 1e-12) for _, v in k3], color="tab:purple", lw=1,
                     label="mismatch k3 KL(sampler‖trainer)")
        ax2.set_ylabel("k3 (log)")
    st = [(r["step"], r["staleness_mean"]) for r in rows if r.get("staleness_mean") is not None]
    if st:
        ax3 = ax2.twinx()
        ax3.plot([s for s, _ in st], [v for _, v in st], color="tab:green", lw=1, label="staleness (mean)")
        ax3.set_ylabel("staleness (versions)")
        ax3.set_ylim(-0.1, max(1.0, max(v for _, v in st)) + 0.5)
        ax3.legend(loc="upper right", fontsize=8)
    return _save(fig, ax2, path)


def plot_validation_curves(runs: dict[str, list[dict[str, Any]]], path: Path, *, title: str) -> Path:
    """Several runs' validation reward (top) and trainer-side k3 per step (bottom), one colour
    per run, e.g. the two arms of ``gymtape train --ab``; ``runs`` maps a name to metrics rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ("tab:blue", "tab:red", "tab:green", "tab:orange")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for i, (name, rows) in enumerate(runs.items()):
        val = [(r["step"], r["val_reward"]) for r in rows if r.get("val_reward") is not None]
        ax1.plot([s for s, _ in val], [v for _, v in val], "o-", color=colors[i % 4], lw=2,
                 label=f"{name}: validation reward (greedy, held-out)")
        k3 = [(r["step"], r["kl_k3"]) for r in rows if r.get("kl_k3") is not None]
        if k3:
            ax2.semilogy([s for s, _ in k3], [max(v, 1e-12) for _, v in k3], color=colors[i % 4], lw=1,
                         label=f"{name}: k3 KL(sampler‖trainer)")
    _reward_axes(ax1, title)
    ax2.set_ylabel("k3 (log)")
    return _save(fig, ax2, path)


def _reward_axes(ax: Any, title: str) -> None:
    ax.set_ylabel("reward")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)


def _save(fig: Any, ax2: Any, path: Path) -> Path:
    """The lower (per-step) axes' labels, then the PNG."""
    import matplotlib.pyplot as plt

    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
