"""`gymtape replay --ray`: trainer-side re-scoring fanned out over Ray Data workers.

The driver builds the scoring sequences once (cheap next to scoring), hands them to Ray Data
as an Arrow table, and a pool of actors — one model replica per worker, or per GPU with
``device="cuda"`` — scores blocks of sequences with the same :func:`replay._score.score_sequences`
the single-process path uses. Results come back keyed by sequence index, so the metrics are
computed exactly as without Ray.

On an existing cluster (``RAY_ADDRESS`` set, or ``ray.init`` called by the caller) the work
goes there; otherwise a local cluster is started for the run and shut down after it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from ._score import ReplayModelError, ScoreSettings


class _Scorer:
    """A Ray Data actor: loads the model once, then scores the blocks of sequences it is given."""

    def __init__(self, model_path: str, device: str, dtype: str, settings: dict[str, Any], threads: int) -> None:
        import torch

        from ._score import load_model

        torch.set_num_threads(threads)
        self.model = load_model(model_path, device=device, dtype=dtype)
        self.settings = ScoreSettings(**settings)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ._score import score_sequences

        def lists(name: str, dtype: Any) -> list[np.ndarray]:
            col = batch.column(name).combine_chunks()
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
            return [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

        out = score_sequences(self.model, lists("input_ids", np.int64), temperatures=lists("temperature", np.float32),
                              score_masks=lists("mask", bool), settings=self.settings)
        return pa.table({"seq_index": batch.column("seq_index"),
                         "logprobs": pa.array(out, type=pa.list_(pa.float32()))})


def score_sequences_ray(
    model_path: str | os.PathLike[str],
    sequences: Sequence[np.ndarray],
    *,
    temperatures: Sequence[np.ndarray],
    score_masks: Sequence[np.ndarray],
    workers: int = 2,
    device: str = "cpu",
    dtype: str = "float32",
    settings: ScoreSettings = ScoreSettings(),
    sequences_per_block: int = 64,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Per-token logprobs of each sequence, like :func:`replay._score.score_sequences`, on Ray workers."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ReplayModelError("--ray needs Ray Data: pip install 'gymtape[ray]' (ray[data])") from e
    if workers < 1:
        raise ReplayModelError(f"--ray needs at least 1 worker, got {workers}")
    n = len(sequences)
    if n == 0:
        return []
    table = pa.table({
        "seq_index": pa.array(np.arange(n, dtype=np.int64)),
        "input_ids": pa.array([np.asarray(s, dtype=np.int32) for s in sequences], type=pa.list_(pa.int32())),
        "temperature": pa.array([np.asarray(t, dtype=np.float32) for t in temperatures], type=pa.list_(pa.float32())),
        "mask": pa.array([np.asarray(m, dtype=bool) for m in score_masks], type=pa.list_(pa.bool_())),
    })
    gpu = device.startswith("cuda")
    started_here = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if started_here:
        # Ray Data's own tasks need CPU slots beside the actors, or the pipeline waits forever.
        ray.init(num_cpus=max(workers + 2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    elif not ray.is_initialized():
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    try:
        threads = 1 if gpu else max(1, (os.cpu_count() or 1) // workers)
        blocks = max(workers, -(-n // sequences_per_block))
        ds = ray.data.from_arrow(table).repartition(blocks)
        scored = ds.map_batches(
            _Scorer,
            fn_constructor_kwargs={"model_path": str(model_path), "device": device, "dtype": dtype,
                                   "settings": asdict(settings), "threads": threads},
            batch_format="pyarrow",
            batch_size=None,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=1 if gpu else 0,
            num_cpus=0 if gpu else 1,
        )
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * n
        for batch in scored.iter_batches(batch_format="pyarrow", batch_size=None):
            col = batch.column("logprobs").combine_chunks()
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy(zero_copy_only=False)
            for j, a, b in zip(batch.column("seq_index").to_numpy(), offsets[:-1], offsets[1:]):
                out[int(j)] = values[a:b].copy()
            if progress is not None:
                progress(int(offsets[-1] - offsets[0]))
        return out
    finally:
        if started_here:
            ray.shutdown()
