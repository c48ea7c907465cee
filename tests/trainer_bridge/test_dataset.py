"""TapeDataset: filters, GRPO advantages, packing, deterministic order, in-process sharding, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recorder import CallRecord, RolloutRecord, Tape, TapeWriter
from trainer_bridge import ResumeStateError, TapeDataset, TapeFilters, build_sequences, group_advantages


def _batches(ds) -> list:
    return list(ds)


def _ids(batches) -> list[str]:
    return [s for b in batches for s in b.sequence_ids]


@pytest.fixture
def tape(make_tape) -> Path:
    tape_dir, _ = make_tape(repeats=4, calls=3, context_tokens=192, rewrite_every=3, seed=7)
    return tape_dir


def test_group_advantages_normalise_within_groups_and_handle_degenerate_groups() -> None:
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    groups = np.array([0, 0, 0, 0, 1, 1, 2])
    adv, keep = group_advantages(rewards, groups, degenerate="zero")
    np.testing.assert_allclose(adv[:4], [1, -1, -1, 1], atol=1e-5)  # mean 0.5, std 0.5
    assert (adv[4:] == 0).all() and keep.all()
    adv, keep = group_advantages(rewards, groups, degenerate="drop")
    assert keep.tolist() == [True] * 4 + [False] * 3
    adv, keep = group_advantages(rewards, groups, degenerate="keep")
    batch = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    np.testing.assert_allclose(adv[4:], batch[4:], rtol=1e-5)
    adv, _ = group_advantages(rewards, groups, std_normalize=False)
    np.testing.assert_allclose(adv[:4], [0.5, -0.5, -0.5, 0.5])
    adv, keep = group_advantages(np.array([1.0, np.nan, 0.0]), np.array([0, 0, 0]))
    np.testing.assert_allclose(adv, [1, 0, -1], atol=1e-5)


def test_one_epoch_delivers_every_selected_sequence_once_packed_under_the_budget(tape: Path) -> None:
    budget = 700
    ds = TapeDataset(tape, token_budget=budget, seed=3)
    seqs = build_sequences(tape)
    by_id = {r["sequence_id"]: r for r in seqs.to_pylist()}
    batches = _batches(ds)
    ids = _ids(batches)
    assert sorted(ids) == sorted(by_id)  # every ok rollout with a reward, each sequence once
    for b in batches:
        lengths = torch.diff(b.cu_seqlens).tolist()
        assert b.num_tokens <= budget or len(lengths) == 1
        for j, sid in enumerate(b.sequence_ids):
            a, e = int(b.cu_seqlens[j]), int(b.cu_seqlens[j + 1])
            s = by_id[sid]
            assert b.input_ids[0, a:e].tolist() == s["input_ids"]
            assert b.position_ids[0, a:e].tolist() == list(range(e - a))
            assert b.extras["loss_mask"][0, a:e].tolist() == s["loss_mask"]
            np.testing.assert_allclose(b.extras["behaviour_logprobs"][0, a:e].numpy(), s["behaviour_logprobs"])
            assert (b.extras["advantages"][0, a:e] == b.seq_advantages[j]).all()
            assert b.rewards[j].item() == s["reward"]
    # Advantages are the group's: both segments of a rewritten rollout get the same one.
    adv = {sid: a for b in batches for sid, a in zip(b.sequence_ids, b.seq_advantages.tolist())}
    for sid, a in adv.items():
        rollout = sid.rsplit("/", 1)[0]
        assert a == adv[f"{rollout}/0"]
    rewards = {r["rollout_id"]: (r["group_key"], r["reward"]) for r in seqs.to_pylist()}
    groups = sorted({g for g, _ in rewards.values()})
    rids = sorted(rewards)
    expected, _ = group_advantages(np.array([rewards[r][1] for r in rids]),
                                   np.array([groups.index(rewards[r][0]) for r in rids]))
    for rid, e in zip(rids, expected):
        assert adv[f"{rid}/0"] == pytest.approx(float(e), abs=1e-6)


def test_order_is_a_function_of_seed_and_epoch(tape: Path) -> None:
    def order(seed: int, epoch: int) -> list[str]:
        ds = TapeDataset(tape, token_budget=500, seed=seed)
        ds.set_epoch(epoch)
        return _ids(_batches(ds))

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert sorted(order(1, 1)) == sorted(order(2, 0))


def test_in_process_shards_split_groups_whole_and_cover_everything(tape: Path) -> None:
    seen: list[str] = []
    for rank in range(3):
        ds = TapeDataset(tape, token_budget=600, seed=5, rank=rank, world_size=3)
        ids = _ids(_batches(ds))
        assert ids, "every shard gets work on this tape"
        seen += ids
    assert sorted(seen) == sorted(build_sequences(tape)["sequence_id"].to_pylist())
    full = TapeDataset(tape, token_budget=600, seed=5)
    owners = {}
    for rank in range(3):
        for row in full.assignment(0, (rank, 3, 0, 1)).tolist():
            owners.setdefault(int(full._group[row]), set()).add(rank)
    assert all(len(r) == 1 for r in owners.values())  # no group split across ranks


def test_resume_mid_epoch_reproduces_the_remaining_batches(tape: Path) -> None:
    ds = TapeDataset(tape, token_budget=400, seed=11)
    ds.set_epoch(2)
    full = _batches(ds)
    assert len(full) >= 4
    first = TapeDataset(tape, token_budget=400, seed=11)
    first.set_epoch(2)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert state["epoch"] == 2 and sum(state["consumed"].values()) == 3
    resumed = TapeDataset(tape, token_budget=400, seed=11)
    resumed.load_state_dict(state)
    rest = _batches(resumed)
    assert [b.sequence_ids for b in rest] == [b.sequence_ids for b in full[3:]]
    for a, b in zip(rest, full[3:]):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.extras["advantages"], b.extras["advantages"])
    with pytest.raises(ResumeStateError):
        TapeDataset(tape, token_budget=400, seed=12).load_state_dict(state)


def test_resume_with_dataloader_workers_counts_what_the_main_process_consumed(tape: Path) -> None:
    ds = TapeDataset(tape, token_budget=300, seed=2)
    everything = [b.sequence_ids for b in ds.loader(num_workers=2)]
    run = TapeDataset(tape, token_budget=300, seed=2)
    consumed = []
    for b in run.loader(num_workers=2):
        consumed.append(b.sequence_ids)
        if len(consumed) == 5:
            break
    state = run.state_dict()
    assert sum(state["consumed"].values()) == 5 and len(state["consumed"]) == 2
    resumed = TapeDataset(tape, token_budget=300, seed=2)
    resumed.load_state_dict(state)
    rest = [b.sequence_ids for b in resumed.loader(num_workers=2)]
    assert sorted(map(tuple, consumed + rest)) == sorted(map(tuple, everything))
    with pytest.raises(ResumeStateError, match="num_workers"):
        again = TapeDataset(tape, token_budget=300, seed=2)
        again.load_state_dict(state)
        list(again)


def test_a_streaming_dataset_in_spawned_workers_yields_what_forked_workers_yield(tape: Path) -> None:
    """Without the cache the dataset keeps its open tape (and its catalog's footer checks) from
    epoch to epoch; spawned DataLoader workers (macOS's default) get it pickled."""
    def epoch(ds: TapeDataset, n: int, **kw) -> list:
        ds.set_epoch(n)
        got = [(b.shard, b.batch_index, b.sequence_ids, b.input_ids.tolist()) for b in ds.loader(num_workers=2, **kw)]
        return sorted(got, key=lambda x: (x[0], x[1]))

    ds = TapeDataset(tape, token_budget=300, seed=4, cache=False)
    forked = [epoch(ds, n) for n in (1, 2)]
    spawned = [epoch(ds, n, multiprocessing_context="spawn") for n in (1, 2)]
    assert spawned == forked and forked[0] != forked[1] and len(forked[0]) > 3
    assert {b[0][2] for b in forked[0]} == {0, 1}  # both workers made batches


def test_a_streaming_dataset_opens_each_calls_shard_once_an_epoch(tape: Path, monkeypatch) -> None:
    """The footer checks of the first epoch hold for the next (same shard, size and mtime): an
    epoch opens each calls shard once, to read it (on object storage each open costs requests)."""
    from recorder import TapeStorage
    opened: list[str] = []
    real = TapeStorage.parquet_file

    def counting(self, path: str, **options):
        opened.append(path)
        return real(self, path, **options)

    ds = TapeDataset(tape, token_budget=300, seed=4, cache=False)
    monkeypatch.setattr(TapeStorage, "parquet_file", counting)
    shards = {s.path for s in Tape(tape).shards("calls")}
    for epoch in (1, 2, 3):
        opened.clear()
        ds.set_epoch(epoch)
        assert sum(b.num_tokens for b in ds) > 0
        assert sorted(opened) == sorted(shards), epoch


def _rollout(w: TapeWriter, rid: str, *, version: int, **kw) -> None:
    w.add_call(CallRecord(rollout_id=rid, call_index=0, prompt_ids=[1, 2, 3], generation_ids=[4, 5],
                          generation_logprobs=[-0.5, -0.25], policy_version=version))
    w.add_rollout(RolloutRecord(rollout_id=rid, **kw))


def test_filters_select_by_status_reward_env_and_policy_version(tmp_path: Path) -> None:
    tape = tmp_path / "tape"
    with TapeWriter(tape, flush_seconds=None, handle_signals=False) as w:
        _rollout(w, "ok-a", version=1, env="a", group_key="g", reward=1.0)
        _rollout(w, "ok-b", version=2, env="b", group_key="g", reward=0.0)
        _rollout(w, "old", version=0, env="a", group_key="g", reward=0.0)
        _rollout(w, "failed", version=2, env="a", group_key="g", reward=0.0, status="failed")
        _rollout(w, "unscored", version=2, env="a", group_key="g", reward=None)

    def rollouts(**kw) -> set[str]:
        ds = TapeDataset(tape, token_budget=64, filters=TapeFilters(**kw))
        return {s.rsplit("/", 1)[0] for b in ds for s in b.sequence_ids}

    assert rollouts() == {"ok-a", "ok-b", "old"}
    assert rollouts(status=None) == {"ok-a", "ok-b", "old", "failed"}
    assert rollouts(require_reward=False) == {"ok-a", "ok-b", "old", "unscored"}
    assert rollouts(envs=["a"]) == {"ok-a", "old"}
    assert rollouts(min_policy_version=1) == {"ok-a", "ok-b"}
    assert rollouts(max_policy_version=1) == {"ok-a", "old"}
    ds = TapeDataset(tape, token_budget=64, filters=TapeFilters(max_policy_version=0), degenerate="drop")
    assert list(ds) == []  # one rollout alone in its group: degenerate, dropped


def test_micro_batches_carry_each_sequence_own_tokens_mask_logprobs_and_advantage(tape: Path) -> None:
    """Micro-batches cut from the sequence table's flat columns match the rows read one by one."""
    from trainer_bridge import micro_batches, pack

    seqs = build_sequences(tape)
    rows = seqs.to_pylist()
    adv = np.linspace(-1, 1, len(rows)).astype(np.float32)
    mbs = micro_batches(seqs, 500, advantages=adv)
    assert sorted(i for mb in mbs for i in mb.index.tolist()) == [i for i, r in enumerate(rows) if r["input_ids"]]
    for mb in mbs:
        assert mb.num_tokens <= 500 or mb.num_seqs == 1
        members = [rows[i] for i in mb.index]
        ref = pack([np.asarray(r["input_ids"], np.int32) for r in members], index=mb.index, extras={
            "loss_mask": [np.asarray(r["loss_mask"], np.float32) for r in members],
            "behaviour_logprobs": [np.asarray(r["behaviour_logprobs"], np.float32) for r in members],
            "advantages": [np.full(len(r["input_ids"]), adv[i], np.float32) for i, r in zip(mb.index, members)],
            "weights": [np.ones(len(r["input_ids"]), np.float32) for r in members],
        })
        assert torch.equal(mb.input_ids, ref.input_ids) and torch.equal(mb.position_ids, ref.position_ids)
        assert torch.equal(mb.cu_seqlens, ref.cu_seqlens) and (mb.index == ref.index).all()
        assert mb.extras.keys() == ref.extras.keys()
        for k in ref.extras:
            assert torch.equal(mb.extras[k], ref.extras[k]), k


def test_cached_and_uncached_datasets_yield_the_same_micro_batches(tape: Path) -> None:
    for epoch in (0, 3):
        for shard in ((0, 2), (1, 2)):
            streams = []
            for cache in (True, False):
                ds = TapeDataset(tape, token_budget=450, seed=9, rank=shard[0], world_size=shard[1], cache=cache)
                ds.set_epoch(epoch)
                streams.append([(b.sequence_ids, b.input_ids, b.extras["advantages"], b.extras["loss_mask"])
                                for b in ds])
            assert [s[0] for s in streams[0]] == [s[0] for s in streams[1]]
            for a, b in zip(*streams):
                assert all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))


def test_window_packing_equals_packing_each_micro_batch_alone(tape: Path) -> None:
    """The loader's windowed packing (window smaller than the epoch) == SequenceArrays.micro_batch."""
    from trainer_bridge._microbatch import SequenceArrays, packed_windows
    from trainer_bridge._packing import plan_bins
    from trainer_bridge._sequences import plan_sequences

    t = Tape(tape)
    plan = plan_sequences(t.read("calls"), t.read("rollouts"))
    table = plan.table()
    adv = np.linspace(-2, 2, plan.num_sequences).astype(np.float32)
    w = np.where(np.arange(plan.num_sequences) % 3 == 0, 0.5, 1.0).astype(np.float32)
    bins = plan_bins(plan.lengths, 600)[::-1]
    alone = SequenceArrays(table, adv, w)
    windowed = list(packed_windows(plan, bins, adv, w, window_tokens=1500))
    assert len(windowed) == len(bins)
    for mb, b in zip(windowed, bins):
        ref = alone.micro_batch(b, batch_index=mb.batch_index)
        assert mb.sequence_ids == ref.sequence_ids and (mb.index == ref.index).all()
        for name in ("input_ids", "position_ids", "cu_seqlens", "rewards", "seq_advantages", "seq_weights"):
            got, want = getattr(mb, name), getattr(ref, name)
            assert got.dtype == want.dtype and torch.equal(got, want), name
        for k in ref.extras:
            assert mb.extras[k].dtype == ref.extras[k].dtype and torch.equal(mb.extras[k], ref.extras[k]), k
        # The wire dtypes: int32 IDs, a bool mask (what crosses worker processes and the H2D copy).
        assert mb.input_ids.dtype == mb.position_ids.dtype == mb.cu_seqlens.dtype == torch.int32
        assert mb.extras["loss_mask"].dtype == torch.bool


def test_loader_micro_batches_pickle_and_copy_as_plain_micro_batches(tape: Path) -> None:
    """The loader cuts per-sequence bookkeeping when first read; pickled (DataLoader workers) or
    copied, a micro-batch is a plain MicroBatch with every field equal."""
    import copy
    import pickle
    from dataclasses import fields

    from trainer_bridge import MicroBatch

    ds = TapeDataset(tape, token_budget=400, seed=4, cache=False)
    for mb in list(ds)[:3]:
        for other in (pickle.loads(pickle.dumps(mb)), copy.copy(mb), copy.deepcopy(mb)):
            assert type(other) is MicroBatch
            for f in fields(MicroBatch):
                a, b = getattr(mb, f.name), getattr(other, f.name)
                if isinstance(a, torch.Tensor):
                    assert a.dtype == b.dtype and torch.equal(a, b), f.name
                elif isinstance(a, np.ndarray):
                    assert (a == b).all(), f.name
                elif f.name == "extras":
                    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                else:
                    assert a == b, f.name
    with pytest.raises(AttributeError):
        mb.not_a_field  # noqa: B018


def test_planning_a_shard_by_rows_equals_planning_its_rollouts_taken_out(tape: Path) -> None:
    import pyarrow as pa

    from trainer_bridge._sequences import CALL_COLUMNS, plan_sequences

    ds = TapeDataset(tape, token_budget=400, seed=4, cache=False)
    calls = Tape(tape).read("calls", CALL_COLUMNS)
    rows = ds.assignment(1, (1, 2, 0, 1))
    by_rows = plan_sequences(calls, ds._rollouts, include_open=False, rows=rows).table()
    taken = plan_sequences(calls, ds._rollouts.take(pa.array(rows)), include_open=False).table()
    assert 0 < by_rows.num_rows < build_sequences(tape).num_rows
    assert by_rows.equals(taken)
