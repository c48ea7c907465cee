"""Delta encoding of prompts: each call stores only what its prompt adds to the last context.

context(k) = prompt(k) + generation(k);  prompt(k+1) = context(k)[:prefix_len] + suffix(k+1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .._errors import TapeError


def common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D integer arrays."""
    n = min(a.size, b.size)
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def rebuild_prompts(
    prefix_lens: Sequence[int],
    suffixes: Sequence[np.ndarray],
    generations: Sequence[np.ndarray],
    *,
    rollout_id: str = "?",
) -> Iterator[np.ndarray]:
    """Yield each call's full prompt, for one rollout's calls in call order."""
    context = np.empty(0, dtype=np.int32)
    for i, (keep, suffix, gen) in enumerate(zip(prefix_lens, suffixes, generations)):
        if keep > context.size:
            raise TapeError(
                f"rollout {rollout_id} call {i}: prefix_len {keep} exceeds the previous context "
                f"({context.size} tokens); a call of this rollout is missing from the tape"
            )
        prompt = np.concatenate([context[:keep], suffix]) if keep else np.asarray(suffix, dtype=np.int32)
        yield prompt
        context = np.concatenate([prompt, gen])
