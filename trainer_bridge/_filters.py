"""Which rollouts a trainer takes from a tape, and how rollouts form GRPO groups.

Shared by the epoch dataset and the live follower so both select and group the same way.
Everything here works on the rollouts table (one row per episode): decisions are made per
rollout, never per sequence, so a rollout split by a history rewrite is kept or left whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Rollouts columns the dataset and follower read (metadata only, no token columns).
ROLLOUT_META_COLUMNS = [
    "rollout_id", "env", "task_index", "rollout_index", "group_key", "reward", "status", "token_status",
    "num_calls", "prompt_tokens", "generation_tokens", "min_policy_version", "max_policy_version",
]


@dataclass(frozen=True)
class TapeFilters:
    """Rollout selection. Rollouts without token IDs (``token_status != "ok"``) are always left out.

    Attributes:
        status: rollout statuses kept (``None``: all). Default ``("ok",)`` leaves out truncated
            and failed episodes.
        require_reward: leave out rollouts whose reward is null (not verified yet).
        envs: only these environments (``None``: all).
        min_policy_version / max_policy_version: keep rollouts all of whose calls were generated
            by policy versions in this window (inclusive; ``None``: open).
    """

    status: Sequence[str] | None = ("ok",)
    require_reward: bool = True
    envs: Sequence[str] | None = None
    min_policy_version: int | None = None
    max_policy_version: int | None = None

    def mask(self, rollouts: pa.Table) -> np.ndarray:
        """Boolean keep-mask over the rows of a rollouts table."""
        keep = pc.equal(rollouts["token_status"], "ok")
        if self.status is not None:
            keep = pc.and_(keep, pc.is_in(rollouts["status"], value_set=pa.array(list(self.status), pa.string())))
        if self.require_reward:
            keep = pc.and_(keep, pc.is_valid(rollouts["reward"]))
        if self.envs is not None:
            keep = pc.and_(keep, pc.is_in(rollouts["env"], value_set=pa.array(list(self.envs), pa.string())))
        if self.min_policy_version is not None:
            keep = pc.and_(keep, pc.greater_equal(rollouts["min_policy_version"], self.min_policy_version))
        if self.max_policy_version is not None:
            keep = pc.and_(keep, pc.less_equal(rollouts["max_policy_version"], self.max_policy_version))
        return pc.fill_null(keep, False).to_numpy(zero_copy_only=False).astype(bool)


def effective_group_keys(rollouts: pa.Table) -> pa.Array:
    """Group key per rollout: ``group_key``; if null ``env/task_index``; if that is null too, the
    rollout alone (its id), so rollouts of unknown tasks are never pooled by accident."""
    task = pc.binary_join_element_wise(
        pc.fill_null(rollouts["env"], ""), pc.cast(rollouts["task_index"], pa.string()), "\x1f"
    )
    alone = pc.binary_join_element_wise("\x1e", rollouts["rollout_id"], "")
    out = pc.coalesce(rollouts["group_key"], task, alone)
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


def first_row_per_rollout(rollouts: pa.Table) -> pa.Table:
    """Drop repeated rollout rows (a rollout recorded twice keeps its first row)."""
    if rollouts.num_rows == 0 or pc.count_distinct(rollouts["rollout_id"]).as_py() == rollouts.num_rows:
        return rollouts
    codes = pc.dictionary_encode(rollouts["rollout_id"].combine_chunks()).indices.to_numpy()
    _, first = np.unique(codes, return_index=True)
    return rollouts.take(pa.array(np.sort(first)))


def estimated_tokens(rollouts: pa.Table) -> np.ndarray:
    """Rough sequence tokens per rollout (last context) from the rollout row alone, for balancing
    shards without reading token columns: mean prompt length + all generated tokens."""
    calls = np.maximum(pc.fill_null(rollouts["num_calls"], 1).to_numpy(zero_copy_only=False), 1)
    prompt = pc.fill_null(rollouts["prompt_tokens"], 0).to_numpy(zero_copy_only=False)
    gen = pc.fill_null(rollouts["generation_tokens"], 0).to_numpy(zero_copy_only=False)
    return (prompt // calls + gen).astype(np.int64)
