"""TapeDataset: a finished tape as a PyTorch IterableDataset of packed, GRPO-ready micro-batches.

Per epoch, every selected rollout's sequences are delivered exactly once across all
``torch.distributed`` ranks and DataLoader workers, in an order fixed by ``(seed, epoch)``:

1. Rollouts are selected (:class:`TapeFilters`) and grouped; advantages are computed per group
   on the whole selection (before sharding, so they never depend on the number of ranks).
2. Groups are shuffled by ``(seed, epoch)`` and dealt to shards ``(rank, worker)``, each group
   whole, to the shard with the fewest (estimated) tokens so far: shards get similar work.
3. Each shard builds its rollouts' sequences (C1), plans bins under ``token_budget`` (C2
   first-fit-decreasing), shuffles the bins by ``(seed, epoch, shard)`` and packs one bin per
   micro-batch.

Resume: :meth:`TapeDataset.state_dict` is ``{epoch, seed, consumed: {shard: micro-batches}}``.
Iterating in-process counts what it yields; with DataLoader workers the counting must happen in
the main process, where batches are consumed: iterate :meth:`TapeDataset.loader` (it calls
:meth:`TapeDataset.observe` on every batch), or call ``observe(batch)`` yourself. Each batch says
which shard made it (``batch.shard``) and its place in that shard's stream (``batch.batch_index``).
:meth:`load_state_dict` makes each shard skip exactly its consumed bins (at the plan level:
nothing skipped is packed), so the rest of the epoch is the same micro-batches. Resuming needs
the same world size and worker count; the state refuses anything else.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recorder import INTEGRITY_CALL_COLUMNS, GymtapeError, Tape, rollout_integrity

from ._advantages import Degenerate, group_advantages
from ._errors import BridgeValueError
from ._filters import ROLLOUT_META_COLUMNS, TapeFilters, effective_group_keys, estimated_tokens, first_row_per_rollout
from ._microbatch import MicroBatch, packed_windows
from ._packing import Bins, packed_bins
from ._sequences import CALL_COLUMNS, ROLLOUT_COLUMNS, SequencePlan, plan_sequences

Shard = tuple[int, int, int, int]  # (rank, world_size, worker_id, num_workers)

#: Bins' worth of tokens planned together (see ``TapeDataset._bins``).
PLAN_WINDOW_BINS = 64
#: Tokens packed per window (whole bins; see ``packed_windows``): about 17 bytes of arrays per
#: token, so a window's arrays (4.5 MB) and the next one's stay in a server's L3 cache while
#: they are written and consumed; a window of 1M tokens (18 MB) costs a fifth more per token.
WINDOW_TOKENS = 1 << 18
#: ``cache=None`` caches the planned sequences when the tape's calls shards total at most this.
CACHE_AUTO_BYTES = 256 << 20


class ResumeStateError(GymtapeError, ValueError):
    """A loader state cannot be applied to this dataset (other seed, world size or workers)."""


def shard_key(shard: Shard) -> str:
    rank, world, worker, workers = shard
    return f"rank{rank}of{world}/worker{worker}of{workers}"


class TapeDataset(IterableDataset):
    """Packed micro-batches (:class:`MicroBatch`) of a tape, sharded, shuffled and resumable.

    Args:
        tape: tape directory (or :class:`recorder.Tape`).
        token_budget: most tokens per micro-batch (a longer sequence gets one of its own).
        max_seqs_per_batch: most sequences per micro-batch (None: no cap).
        seed: shuffling seed; the order is a function of ``(seed, epoch)`` only.
        shuffle: False keeps groups in key order and bins in plan order.
        filters: which rollouts to train on (default: status ok, reward present).
        degenerate, std_normalize: GRPO advantage options (see :func:`group_advantages`).
        min_group_size: groups with fewer selected rollouts are left out.
        rank, world_size: override what ``torch.distributed`` says (default: it, or 0 and 1).
        cache: plan the selection's sequences once, at construction, and keep them in memory
            (about the calls shards' decompressed size); every epoch then packs from memory, and
            DataLoader workers inherit the plan when they fork. False: every shard reads the
            tape's calls each epoch and keeps no tokens (only each shard's footer check, so an
            epoch opens every shard once). None: cache when the calls shards total
            at most :data:`CACHE_AUTO_BYTES` on disk.

    Use with ``DataLoader(dataset, batch_size=None, num_workers=...)`` (micro-batches are
    already formed), preferably through :meth:`loader`. Call :meth:`set_epoch` before each epoch.

    Rollouts a trainer must not see are left out before the filters, and counted in
    :attr:`stats` (``recorder.rollout_integrity``): rows that point at missing calls, incomplete
    rows (a call failed to be captured), and rows a retry of the same task and repeat superseded.

    Attributes:
        stats: how the tape's rollout rows were used, each counted once (the counts add up to
            ``rollouts``): ``rollouts_selected`` (trained on), ``rollouts_superseded``,
            ``rollouts_incomplete``, ``rollouts_missing_calls``, ``rollouts_filtered`` (by
            ``filters``), ``rollouts_left_out_by_group`` (``min_group_size``,
            ``degenerate="drop"``).
    """

    def __init__(
        self,
        tape: Tape | str | os.PathLike[str],
        *,
        token_budget: int,
        max_seqs_per_batch: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        filters: TapeFilters | None = None,
        degenerate: Degenerate = "zero",
        std_normalize: bool = True,
        min_group_size: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        cache: bool | None = None,
    ) -> None:
        super().__init__()
        if token_budget < 1:
            raise BridgeValueError(f"token_budget must be positive, got {token_budget}")
        tape = tape if isinstance(tape, Tape) else Tape(tape)
        self.tape_path = tape.location
        # Without the cache every epoch reads the calls again through this one Tape: its catalog
        # keeps each shard's footer check (by path, size and mtime) from one epoch to the next.
        self._tape = tape
        self.token_budget = token_budget
        self.max_seqs_per_batch = max_seqs_per_batch
        self.seed = seed
        self.shuffle = shuffle
        self.filters = filters or TapeFilters()
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self._skip: dict[str, int] = {}
        self._consumed: dict[str, int] = {}

        rollouts = first_row_per_rollout(tape.read("rollouts", [*ROLLOUT_META_COLUMNS, "created_at"]))
        if cache is None:
            cache = sum(s.bytes for s in tape.shards("calls")) <= CACHE_AUTO_BYTES
        # Integrity per rollout (vectorised over the calls' rollout_id and call_index): with the
        # cache the calls are read once, here, for both; without it only those two columns.
        all_calls = tape.read("calls", CALL_COLUMNS) if cache and rollouts.num_rows else None
        integrity = rollout_integrity(
            rollouts, all_calls if all_calls is not None else
            (tape.read("calls", INTEGRITY_CALL_COLUMNS) if rollouts.num_rows else pa.table({})))
        counts = integrity.counts()
        self.stats: dict[str, int] = {
            "rollouts": rollouts.num_rows, "rollouts_selected": 0,
            "rollouts_superseded": counts["superseded"], "rollouts_incomplete": counts["incomplete"],
            "rollouts_missing_calls": counts["missing_calls"], "rollouts_filtered": 0, "rollouts_left_out_by_group": 0,
        }
        sound = integrity.current & ~integrity.missing_calls & ~integrity.incomplete
        rollouts = (rollouts.filter(pa.array(sound)) if rollouts.num_rows else rollouts).drop_columns(["created_at"])
        before = rollouts.num_rows
        rollouts = rollouts.filter(pa.array(self.filters.mask(rollouts))) if rollouts.num_rows else rollouts
        self.stats["rollouts_filtered"] = before - rollouts.num_rows
        # In rollout-id order, not the order rows happen to be stored in: a compacted copy of a
        # tape (rows rewritten in another order) gives the same epochs as the tape it came from.
        rollouts = rollouts.take(pc.sort_indices(rollouts["rollout_id"])) if rollouts.num_rows else rollouts
        groups = effective_group_keys(rollouts) if rollouts.num_rows else pa.array([], pa.string())
        enc = pc.dictionary_encode(groups)
        # Group numbers follow the sorted key, so the unshuffled order is stable across runs.
        rank_of = np.argsort(np.argsort(np.asarray(enc.dictionary.to_pylist(), dtype=object), kind="stable"))
        gid = rank_of[enc.indices.to_numpy()] if rollouts.num_rows else np.zeros(0, np.int64)
        sizes = np.bincount(gid, minlength=len(enc.dictionary)) if gid.size else np.zeros(0, np.int64)
        big = sizes[gid] >= min_group_size if gid.size else np.zeros(0, bool)
        rewards = (pc.fill_null(rollouts["reward"], np.nan).to_numpy(zero_copy_only=False)
                   if rollouts.num_rows else np.zeros(0))
        adv, keep = group_advantages(rewards[big], gid[big], degenerate=degenerate, std_normalize=std_normalize)
        sel = np.flatnonzero(big)[keep]
        self._rollouts = rollouts.take(pa.array(sel, pa.int64())).select(ROLLOUT_COLUMNS)
        self._advantages = adv[keep]
        self._group = gid[sel]
        self._tokens = estimated_tokens(rollouts.take(pa.array(sel, pa.int64()))) if sel.size else np.zeros(0, np.int64)
        self.num_groups = int(np.unique(self._group).size)
        self.stats["rollouts_selected"] = self.num_rollouts
        self.stats["rollouts_left_out_by_group"] = rollouts.num_rows - self.num_rollouts
        # With the cache, the selection's sequences are planned once, here, and every epoch and
        # shard packs from memory (DataLoader workers inherit it when they fork). Without it,
        # each shard reads the tape's calls every epoch and keeps nothing.
        self.cache = cache
        self._full: tuple[SequencePlan, np.ndarray] | None = None
        if cache and self.num_rollouts:
            calls = all_calls if all_calls is not None else tape.read("calls", CALL_COLUMNS)
            if self.num_rollouts != rollouts.num_rows:
                wanted = self._rollouts["rollout_id"].combine_chunks()
                calls = calls.filter(pc.is_in(calls["rollout_id"], value_set=wanted))
            plan = plan_sequences(calls, self._rollouts, include_open=False)
            if plan is not None:
                self._full = (plan, plan.rollout_row)

    @property
    def num_rollouts(self) -> int:
        return self._rollouts.num_rows

    # -- epochs, shards, resume --------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (reshuffles; forgets consumed counts of another epoch)."""
        if epoch != self.epoch:
            self._skip, self._consumed = {}, {}
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`load_state_dict` needs to resume mid-epoch (plain JSON-able values)."""
        consumed = {**self._skip, **self._consumed}
        return {"epoch": self.epoch, "seed": self.seed, "token_budget": self.token_budget, "consumed": consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: each shard skips the micro-batches ``state`` says were consumed."""
        if state["seed"] != self.seed or state.get("token_budget", self.token_budget) != self.token_budget:
            raise ResumeStateError(
                f"the state was saved with seed {state['seed']} and token_budget {state.get('token_budget')}, "
                f"this dataset has seed {self.seed} and token_budget {self.token_budget}; build the dataset "
                "with the saved settings to resume exactly"
            )
        self.epoch = int(state["epoch"])
        self._skip = {str(k): int(v) for k, v in state["consumed"].items()}
        self._consumed = dict(self._skip)

    def observe(self, batch: MicroBatch) -> None:
        """Record that ``batch`` was consumed (call in the process that trains, for every batch)."""
        if batch.epoch != self.epoch:
            self.set_epoch(batch.epoch)
        self._consumed[shard_key(batch.shard)] = batch.batch_index + 1

    def loader(self, **dataloader_kwargs: Any) -> TapeLoader:
        """A DataLoader over this dataset that records consumption (for :meth:`state_dict`)."""
        return TapeLoader(self, **dataloader_kwargs)

    def current_shard(self) -> Shard:
        """(rank, world_size, worker_id, num_workers) of the calling process."""
        rank, world = self._rank, self._world
        if rank is None or world is None:
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank() if rank is None else rank
                world = dist.get_world_size() if world is None else world
            else:
                rank, world = rank or 0, world or 1
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank, world, worker, workers

    def assignment(self, epoch: int, shard: Shard) -> np.ndarray:
        """Rollout rows (into the selection) that ``shard`` trains on in ``epoch``, groups whole."""
        rank, world, worker, workers = shard
        slots = world * workers
        slot = rank * workers + worker
        if self._group.size == 0:
            return np.zeros(0, np.int64)
        n_groups = int(self._group.max()) + 1
        order = np.random.default_rng([self.seed, epoch]).permutation(n_groups) if self.shuffle else np.arange(n_groups)
        if slots == 1:  # one shard takes every group
            owner = np.zeros(n_groups, dtype=np.int64)
        else:
            group_tokens = np.bincount(self._group, weights=self._tokens, minlength=n_groups).tolist()
            loads = [0.0] * slots
            owners = [0] * n_groups
            for g in order.tolist():  # one step per group, never per token
                s = loads.index(min(loads))
                owners[g] = s
                loads[s] += group_tokens[g] or 1.0
            owner = np.asarray(owners, dtype=np.int64)
        position = np.empty(n_groups, dtype=np.int64)
        position[order] = np.arange(n_groups)
        mine = np.flatnonzero(owner[self._group] == slot)
        return mine[np.argsort(position[self._group[mine]], kind="stable")]

    # -- iteration -----------------------------------------------------------------------------

    def plan(
        self, epoch: int | None = None, shard: Shard | None = None
    ) -> tuple[SequencePlan | None, list[np.ndarray], np.ndarray]:
        """One shard's epoch: its sequence plan, its micro-batch bins (rows of the plan) and the
        advantage of each sequence. Nothing is packed yet."""
        epoch = self.epoch if epoch is None else epoch
        shard = self.current_shard() if shard is None else shard
        plan, bins, advantages = self._plan(epoch, shard)
        return plan, bins.as_list(), advantages

    def _plan(self, epoch: int, shard: Shard) -> tuple[SequencePlan | None, Bins, np.ndarray]:
        rows = self.assignment(epoch, shard)
        if self._full is not None:
            plan, rollout_of_seq = self._full
        else:
            # The shard's rollouts are planned by row: other shards' calls are left out by index,
            # nothing is copied.
            plan = None
            if rows.size:
                calls = self._tape.read("calls", CALL_COLUMNS)
                plan = plan_sequences(calls, self._rollouts, include_open=False, rows=rows)
            if plan is None:
                return None, Bins(np.zeros(0, np.int64), np.zeros(0, np.int64)), np.zeros(0, np.float32)
            rollout_of_seq = plan.rollout_row
        slot = np.full(self.num_rollouts, -1, dtype=np.int64)
        slot[rows] = np.arange(rows.size)
        where = slot[rollout_of_seq]  # position of each sequence's rollout in this shard's order, or -1
        advantages = self._advantages[rollout_of_seq]
        order = np.flatnonzero(where >= 0)
        order = order[np.argsort(where[order], kind="stable")]  # ties keep (rollout, segment) order
        # Plan in this shard's shuffled group order (ties in length keep it), then shuffle the bins.
        nonempty = order[plan.lengths[order] > 0]
        bins = self._bins(plan.lengths, nonempty)
        if self.shuffle and len(bins):
            rank, world, worker, workers = shard
            perm = np.random.default_rng([self.seed, epoch, rank, world, worker, workers]).permutation(len(bins))
            bins = bins.reorder(perm)
        return plan, bins, advantages

    def _bins(self, lengths: np.ndarray, rows: np.ndarray) -> Bins:
        """First-fit-decreasing bins (C2 ``plan_bins``) over consecutive windows of ``rows``.

        First-fit scans the open bins for every sequence, so one plan over a whole shard costs
        sequences x bins; windows of about :data:`PLAN_WINDOW_BINS` bins' worth of tokens keep
        it linear in the shard, and leave at most one part-filled bin per window.
        """
        if rows.size == 0:
            return Bins(np.zeros(0, np.int64), np.zeros(0, np.int64))
        window = np.cumsum(lengths[rows]) // (PLAN_WINDOW_BINS * self.token_budget)
        cuts = np.flatnonzero(np.diff(window)) + 1
        parts = [packed_bins(lengths[part], self.token_budget, max_seqs=self.max_seqs_per_batch)
                 for part in np.split(rows, cuts)]
        # Each window's members index its part of `rows`: offset them, then map through `rows`.
        offset = np.repeat(np.concatenate([[0], cuts]), [p.members.size for p in parts])
        return Bins(rows[np.concatenate([p.members for p in parts]) + offset],
                    np.concatenate([p.sizes for p in parts]))

    def __iter__(self) -> Iterator[MicroBatch]:
        shard = self.current_shard()
        key = shard_key(shard)
        epoch = self.epoch
        skip = self._skip.get(key, 0)
        self._check_skip_keys(shard)
        plan, bins, advantages = self._plan(epoch, shard)
        if plan is None or skip >= len(bins):
            return
        weights = np.ones(plan.num_sequences, np.float32)
        window = max(WINDOW_TOKENS, 4 * self.token_budget)
        if skip:
            bins = Bins(bins.members[int(bins.sizes[:skip].sum()):], bins.sizes[skip:])
        for batch in packed_windows(plan, bins, advantages, weights, epoch=epoch, shard=shard,
                                    first_index=skip, window_tokens=window):
            self._consumed[key] = batch.batch_index + 1
            yield batch

    def _check_skip_keys(self, shard: Shard) -> None:
        if not self._skip:
            return
        _, world, _, workers = shard
        expected = {shard_key((r, world, w, workers)) for r in range(world) for w in range(workers)}
        if not set(self._skip) <= expected:
            raise ResumeStateError(
                f"the resume state was saved by shards {sorted(self._skip)}, but this run has world size {world} "
                f"and {workers} DataLoader worker(s) per rank; resume with the same world size and num_workers "
                "(or start the epoch over with set_epoch)"
            )


class TapeLoader:
    """``DataLoader(dataset, batch_size=None, ...)`` that tells the dataset what was consumed."""

    def __init__(self, dataset: TapeDataset, **dataloader_kwargs: Any) -> None:
        if dataloader_kwargs.get("persistent_workers"):
            raise BridgeValueError("persistent_workers would keep an old epoch's plan in the workers; leave it off")
        dataloader_kwargs.setdefault("batch_size", None)
        self.dataset = dataset
        self.kwargs = dataloader_kwargs

    def __iter__(self) -> Iterator[MicroBatch]:
        for batch in DataLoader(self.dataset, **self.kwargs):
            self.dataset.observe(batch)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)

