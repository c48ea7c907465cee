"""The sequences a re-templating trainer builds (`retemplated_sequences`): a split rollout becomes
the final conversation with every earlier generation back in the loss mask, where it lands after
re-rendering. Built from hand-made sequence rows, so each case is exact."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from trainer_bridge import SEQUENCE_SCHEMA, retemplated_sequences


def _row(rid: str, segment: int, ids: list[int], mask: list[int], first_call: int, version: int) -> dict:
    lp = [-0.1 * (i + 1) if m else 0.0 for i, m in enumerate(mask)]
    return {"sequence_id": f"{rid}/{segment}", "rollout_id": rid, "segment": segment,
            "split_reason": "history_rewrite" if segment else "", "first_call_index": first_call, "num_calls": 1,
            "input_ids": ids, "loss_mask": mask, "behaviour_logprobs": lp,
            "token_call_index": [first_call if m else -1 for m in mask], "prompt_len": mask.index(1),
            "num_generated": sum(mask), "reward": 1.0, "group_key": "g", "env": "e", "task_index": 0,
            "rollout_index": 0, "status": "ok", "min_policy_version": version, "max_policy_version": version}


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SEQUENCE_SCHEMA)


def test_a_dropped_think_block_moves_turn_one_back_to_where_the_rerendering_diverged() -> None:
    # turn 1 was sampled after [10, 11] + think block [20, 21]; the re-rendered history drops it
    seg0 = _row("r", 0, [10, 11, 20, 21, 30, 31], [0, 0, 0, 0, 1, 1], 0, 3)
    seg1 = _row("r", 1, [10, 11, 30, 31, 40, 41, 20, 21, 50], [0, 0, 0, 0, 0, 0, 0, 0, 1], 1, 4)
    out, stats = retemplated_sequences(_table([seg0, seg1]))
    (row,) = out.to_pylist()
    assert row["input_ids"] == seg1["input_ids"]
    assert row["loss_mask"] == [0, 0, 1, 1, 0, 0, 0, 0, 1]
    lp = np.array(row["behaviour_logprobs"], np.float32)
    assert np.allclose(lp[[2, 3]], np.float32([-0.5, -0.6])) and np.isclose(lp[8], np.float32(-0.9))
    assert row["token_call_index"][2:4] == [0, 0] and row["token_call_index"][8] == 1
    assert (row["num_calls"], row["first_call_index"], row["num_generated"], row["min_policy_version"]) == (2, 0, 3, 3)
    assert (stats.rollouts_merged, stats.tokens_moved, stats.offpolicy_tokens) == (1, 2, 0)  # same IDs, new context


def test_a_retokenized_generation_keeps_its_place_and_counts_the_ids_the_sampler_never_produced() -> None:
    seg0 = _row("r", 0, [10, 11, 30, 31, 32], [0, 0, 1, 1, 1], 0, 0)
    seg1 = _row("r", 1, [10, 11, 30, 35, 36, 40, 50], [0, 0, 0, 0, 0, 0, 1], 1, 0)
    out, stats = retemplated_sequences(_table([seg0, seg1]))
    (row,) = out.to_pylist()
    assert row["loss_mask"] == [0, 0, 1, 1, 1, 0, 1]
    assert (stats.tokens_moved, stats.offpolicy_tokens) == (3, 2)


def test_unsplit_rollouts_pass_through_unchanged_and_in_order() -> None:
    rows = [_row("a", 0, [1, 2, 3], [0, 1, 1], 0, 0), _row("b", 0, [1, 5], [0, 1], 0, 0),
            _row("c", 0, [1, 2, 3], [0, 0, 1], 0, 0), _row("c", 1, [1, 2, 4, 6], [0, 0, 0, 1], 1, 0)]
    out, stats = retemplated_sequences(_table(rows))
    assert out.column("rollout_id").to_pylist() == ["a", "b", "c"]
    assert out.slice(0, 2).to_pylist() == _table(rows[:2]).to_pylist()
    assert stats.rollouts_merged == 1
    same, _ = retemplated_sequences(_table(rows[:2]))
    assert same.to_pylist() == _table(rows[:2]).to_pylist()
