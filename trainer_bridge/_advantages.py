"""GRPO group advantages: each rollout's reward against the other rollouts of its group.

GRPO needs no value network: the baseline of a rollout is the mean reward of the rollouts
sampled for the same task (its group), and the advantage is ``(r - mean) / (std + eps)``. A
group whose rewards are all equal (or that has one rollout) carries no learning signal under
that rule; what to do with it is a choice the caller makes with ``degenerate``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ._errors import BridgeValueError

Degenerate = Literal["drop", "zero", "keep"]
DEGENERATE_CHOICES: tuple[str, ...] = ("drop", "zero", "keep")


def group_advantages(
    rewards: np.ndarray,
    group_ids: np.ndarray,
    *,
    degenerate: Degenerate = "zero",
    std_normalize: bool = True,
    eps: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """Advantages of rollouts (one reward each) grouped by ``group_ids``.

    Args:
        rewards: ``[n]`` float rewards, one per rollout (not per sequence: a rollout split by a
            history rewrite counts once in its group). NaN (no reward yet) gets advantage 0 and
            is left out of its group's statistics.
        group_ids: ``[n]`` integer (or any sortable) group label per rollout.
        degenerate: what a group whose rewards have zero spread (all equal, or one rollout) gets:
            ``"drop"``: its rollouts are not kept (``keep`` false), they take no tokens in a batch;
            ``"zero"``: kept with advantage 0, so they add tokens to the loss normaliser but no
            gradient (what plain GRPO does implicitly);
            ``"keep"``: kept, with the batch-level baseline instead of the group's:
            ``(r - mean(all)) / (std(all) + eps)``, so an all-solved task is still reinforced
            relative to the rest of the batch.
        std_normalize: divide by the group's standard deviation (GRPO); False gives the
            mean-centred reward only (Dr. GRPO).
        eps: added to the standard deviation.

    Returns:
        ``(advantages float32 [n], keep bool [n])``.
    """
    if degenerate not in DEGENERATE_CHOICES:
        raise BridgeValueError(f"degenerate must be one of {DEGENERATE_CHOICES}, got {degenerate!r}")
    r = np.asarray(rewards, dtype=np.float64)
    if r.size == 0:
        return np.zeros(0, np.float32), np.zeros(0, bool)
    unscored = np.isnan(r)
    if unscored.any():  # rollouts without a reward: advantage 0, and they do not shape their group's baseline
        adv = np.zeros(r.size, np.float32)
        keep = np.ones(r.size, dtype=bool)
        if (~unscored).any():
            scored = ~unscored
            adv[scored], keep[scored] = group_advantages(
                r[scored], np.asarray(group_ids)[scored], degenerate=degenerate, std_normalize=std_normalize, eps=eps
            )
        return adv, keep
    _, inv, counts = np.unique(np.asarray(group_ids), return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    mean = sums / counts
    var = np.bincount(inv, weights=(r - mean[inv]) ** 2) / counts
    std = np.sqrt(var)
    spread = (np.bincount(inv, weights=np.abs(r - mean[inv])) > 0) & (counts > 1)
    centred = r - mean[inv]
    adv = centred / (std[inv] + eps) if std_normalize else centred
    deg = ~spread[inv]
    keep = np.ones(r.size, dtype=bool)
    if deg.any():
        if degenerate == "drop":
            keep[deg] = False
            adv[deg] = 0.0
        elif degenerate == "zero":
            adv[deg] = 0.0
        else:
            g = r - r.mean()
            adv[deg] = (g / (r.std() + eps) if std_normalize else g)[deg]
    return adv.astype(np.float32), keep
