"""`gymtape export --format sft|dpo`: Parquet in TRL's column layouts, read back with plain PyTorch.

TRL is not installed here; the column names checked are the ones its trainers read: SFT
pre-tokenised rows (``input_ids`` + ``completion_mask`` for ``completion_only_loss``,
``assistant_masks`` for ``assistant_only_loss``) or prompt/completion text; DPO preference rows
(``prompt``/``chosen``/``rejected`` text and ``prompt_input_ids``/``chosen_input_ids``/
``rejected_input_ids`` as its ``tokenize_row`` produces them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset
from typer.testing import CliRunner

from cli import app
from recorder import CallRecord, RolloutRecord, Tape, TapeWriter
from trainer_bridge import DPO_SCHEMA, SFT_SCHEMA, build_sequences

runner = CliRunner()
SMOLLM2_VOCAB = 49152


class ParquetRows(Dataset):
    """The simplest PyTorch map-style dataset over an exported file: one dict per row."""

    def __init__(self, path: Path) -> None:
        self.rows = pq.read_table(path).to_pylist()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _pad(rows: list[dict], key: str, value: int) -> torch.Tensor:
    return pad_sequence([torch.tensor(r[key]) for r in rows], batch_first=True, padding_value=value)


def _export(tape: Path, out: Path, *args: str) -> str:
    r = runner.invoke(app, ["export", str(tape), "-o", str(out), *args])
    assert r.exit_code == 0, r.stderr
    return r.stderr


def test_sft_export_holds_exact_tokens_and_masks_of_rewarded_rollouts(
    make_tape, tmp_path: Path, model_dir: Path
) -> None:
    tape, _ = make_tape(repeats=4, calls=3, context_tokens=128, vocab_size=SMOLLM2_VOCAB, rewrite_every=3, seed=4)
    out = tmp_path / "sft.parquet"
    msg = _export(tape, out, "--format", "sft", "--min-reward", "1.0", "--tokenizer", str(model_dir))
    table = pq.read_table(out)
    assert table.schema.equals(SFT_SCHEMA)
    seqs = {r["sequence_id"]: r for r in build_sequences(tape).to_pylist()}
    rewarded = {sid for sid, r in seqs.items() if r["reward"] >= 1.0}
    assert set(table["sequence_id"].to_pylist()) == rewarded and rewarded != set(seqs)
    assert f"exported {len(rewarded)} sequences" in msg
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    for row in table.to_pylist():
        s = seqs[row["sequence_id"]]
        assert row["input_ids"] == s["input_ids"]
        assert row["completion_mask"] == s["loss_mask"] == row["assistant_masks"]
        assert row["prompt"] == tok.decode(s["input_ids"][: s["prompt_len"]])
        assert row["completion"] == tok.decode(s["input_ids"][s["prompt_len"]:])
    # Plain PyTorch: pad, turn the mask into labels (-100 off the completion), as a TRL collator does.
    loader = DataLoader(ParquetRows(out), batch_size=4, collate_fn=lambda rows: {
        "input_ids": _pad(rows, "input_ids", 0),
        "labels": torch.where(_pad(rows, "completion_mask", 0).bool(), _pad(rows, "input_ids", 0), -100),
    })
    trained = sum(int((b["labels"] != -100).sum()) for b in loader)
    assert trained == sum(seqs[s]["num_generated"] for s in rewarded)


def _group_tape(path: Path, rewards: dict[str, list[float]]) -> Path:
    """Tasks whose repeats share their first prompt (as a Gym task's repeats do), two calls each."""
    rng = np.random.default_rng(8)
    with TapeWriter(path, flush_seconds=None, handle_signals=False) as w:
        for task, values in rewards.items():
            prompt = rng.integers(0, SMOLLM2_VOCAB, size=12).tolist()
            for i, reward in enumerate(values):
                rid = f"{task}-{i}"
                p = prompt if i < len(values) - 1 or task != "odd" else prompt[:-1] + [7]  # one differing prompt
                gen = rng.integers(0, SMOLLM2_VOCAB, size=5).tolist()
                w.add_call(CallRecord(rollout_id=rid, call_index=0, prompt_ids=p, generation_ids=gen,
                                      generation_logprobs=[-1.0] * 5))
                w.add_call(CallRecord(rollout_id=rid, call_index=1, prompt_ids=p + gen + [3, 4], generation_ids=[9],
                                      generation_logprobs=[-1.0]))
                w.add_rollout(RolloutRecord(rollout_id=rid, group_key=task, env="e", reward=reward))
    return path


def test_dpo_export_pairs_first_calls_within_groups_by_reward_margin(tmp_path: Path, model_dir: Path) -> None:
    rewards = {"a": [1.0, 0.0, 0.0, 1.0, 0.2], "b": [0.3, 0.0, 1.0], "c": [1.0, 1.0], "odd": [1.0, 0.0]}
    tape = _group_tape(tmp_path / "tape", rewards)
    out = tmp_path / "dpo.parquet"
    msg = _export(tape, out, "--format", "dpo", "--margin", "0.5", "--tokenizer", str(model_dir))
    table = pq.read_table(out)
    assert table.schema.equals(DPO_SCHEMA)
    trl_columns = {"prompt", "chosen", "rejected", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}
    assert trl_columns <= set(table.column_names)
    rows = table.to_pylist()
    assert f"exported {len(rows)} pairs" in msg
    # Ranked by (reward desc, id), best paired with worst while the gap holds:
    # a: a-0 a-3 a-4 a-1 a-2 -> (a-0, a-2), (a-3, a-1); b: (b-2, b-1); c: no gap; odd: prompts differ.
    got = {(r["chosen_rollout_id"], r["rejected_rollout_id"]) for r in rows}
    assert got == {("a-0", "a-2"), ("a-3", "a-1"), ("b-2", "b-1")}
    index = Tape(tape).calls_by_rollout()
    for r in rows:
        assert r["chosen_reward"] - r["rejected_reward"] >= 0.5
        cc, jc = index.get(r["chosen_rollout_id"]), index.get(r["rejected_rollout_id"])
        assert r["prompt_input_ids"] == cc["prompt_ids"][0].tolist() == jc["prompt_ids"][0].tolist()
        assert r["chosen_input_ids"] == cc["generation_ids"][0].tolist()  # the first call only
        assert r["rejected_input_ids"] == jc["generation_ids"][0].tolist()
        assert isinstance(r["prompt"], str) and isinstance(r["chosen"], str) and isinstance(r["rejected"], str)
    batch = next(iter(DataLoader(ParquetRows(out), batch_size=len(rows), collate_fn=lambda rs: {
        k: _pad(rs, k, 0) for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")})))
    assert batch["chosen_input_ids"].shape == (3, 5)
    all_pairs = tmp_path / "all.parquet"
    _export(tape, all_pairs, "--format", "dpo", "--pairs", "all", "--no-text", "--margin", "0.7")
    t = pq.read_table(all_pairs)
    got = {(c, j) for c, j in zip(t["chosen_rollout_id"].to_pylist(), t["rejected_rollout_id"].to_pylist())}
    assert got == {("a-0", "a-1"), ("a-0", "a-2"), ("a-3", "a-1"), ("a-3", "a-2"), ("a-0", "a-4"), ("a-3", "a-4"),
                   ("b-2", "b-1"), ("b-2", "b-0")}
    assert t["prompt"].null_count == t.num_rows


def test_tokenizer_that_cannot_decode_the_tape_is_refused_with_advice(
    make_tape, tmp_path: Path, model_dir: Path
) -> None:
    tape, _ = make_tape(repeats=2, calls=2, context_tokens=64, seed=6)  # Qwen-sized IDs, beyond SmolLM2's vocabulary
    out = tmp_path / "sft.parquet"
    r = runner.invoke(app, ["export", str(tape), "--format", "sft", "-o", str(out), "--min-reward", "0",
                            "--tokenizer", str(model_dir)])
    assert r.exit_code == 2 and "outside the tokenizer's vocabulary" in r.stderr and "--no-text" in r.stderr
    assert not out.exists()
    _export(tape, out, "--format", "sft", "--min-reward", "0", "--no-text")
    assert pq.read_table(out).num_rows == build_sequences(tape).num_rows
    r = runner.invoke(app, ["export", str(tape), "--format", "dpo"])
    assert r.exit_code == 2 and "--out" in r.stderr
