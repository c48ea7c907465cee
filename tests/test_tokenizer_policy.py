"""One tokenizer policy (``recorder.resolve_tokenizer``) for check, replay, diff and export.

Real tokenizers only: the embedded SmolLM2's and the offline-built Qwen3 one, two different
vocabularies, so a "wrong tokenizer" here is one a user could really pick up by mistake.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from cli import app
from recorder import (CallRecord, RolloutRecord, Tape, TapeWriter, TokenizerIdentity, TokenizerMismatchError,
                      qwen_tokenizer_dir, resolve_tokenizer, tokenizer_identity)

runner = CliRunner()


def _tape(path: Path, ident: TokenizerIdentity | None, *, seed: int = 0) -> Path:
    """One rollout of one call, token IDs inside SmolLM2's vocabulary (and so inside Qwen's)."""
    rng = np.random.default_rng(seed)
    with TapeWriter(path, tokenizer=ident, flush_seconds=None, handle_signals=False) as w:
        w.add_call(CallRecord(rollout_id="r0", call_index=0, prompt_ids=rng.integers(3, 49000, 10),
                              generation_ids=rng.integers(3, 49000, 6), generation_logprobs=np.full(6, -1.0, np.float32),
                              temperature=1.0, logprobs_kind="raw"))
        w.add_rollout(RolloutRecord(rollout_id="r0", reward=1.0, env="e", task_index=0, rollout_index=0))
    return path


@pytest.fixture(scope="module")
def qwen() -> Path:
    return qwen_tokenizer_dir()


@pytest.fixture
def smol_tape(tmp_path: Path, model_dir: Path) -> Path:
    return _tape(tmp_path / "smol", tokenizer_identity(model_dir))


def test_the_recorded_tokenizer_is_found_without_being_named(tmp_path: Path, model_dir: Path, qwen: Path) -> None:
    # in gymtape's cache: the Qwen tokenizer a tape was recorded with
    got = resolve_tokenizer(Tape(_tape(tmp_path / "q", tokenizer_identity(qwen))), load=False)
    assert (got.path, got.source, got.mismatch, got.warnings) == (qwen, "recorded", None, ())
    # named by the tape's runs/*.json (what `gymtape serve --tokenizer DIR` writes): a tokenizer found nowhere else
    custom = tmp_path / "my-tokenizer"
    shutil.copytree(model_dir, custom, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    (custom / "chat_template.jinja").write_text((model_dir / "chat_template.jinja").read_text() + "{# mine #}")
    tape = _tape(tmp_path / "c", tokenizer_identity(custom))
    (tape / "runs").mkdir()
    (tape / "runs" / "w.json").write_bytes(orjson.dumps({"command": "gymtape serve",
                                                         "config": {"tokenizer": str(custom), "model": None}}))
    got = resolve_tokenizer(Tape(tape))
    assert got.path == custom and got.identity == tokenizer_identity(custom) and got.source == "recorded"
    assert len(got.tokenizer) == 49152
    # a tape that records no tokenizer (ingested Gym JSONL): the default, a warning, no mismatch
    got = resolve_tokenizer(Tape(_tape(tmp_path / "n", None)), load=False)
    assert got.path == model_dir and got.source == "default" and got.mismatch is None
    assert len(got.warnings) == 1 and "records no tokenizer identity" in got.warnings[0]


def test_a_named_tokenizer_that_differs_is_refused_naming_both(smol_tape: Path, qwen: Path) -> None:
    with pytest.raises(TokenizerMismatchError) as e:
        resolve_tokenizer(Tape(smol_tape), qwen, load=False)
    msg = str(e.value)
    assert "SmolLM2-135M-Instruct (sha256 " in msg and "qwen3 (sha256 " in msg and "--allow-tokenizer-mismatch" in msg
    allowed = resolve_tokenizer(Tape(smol_tape), qwen, allow_mismatch=True, load=False)
    assert allowed.path == qwen and allowed.mismatch and allowed.warnings == (allowed.mismatch,)


def _check(args: list[str], out: Path) -> None:
    r = runner.invoke(app, args + ["--json"])
    assert r.exit_code == 1, r.stderr  # runs every check, and the mismatch is one of the problems found
    d = json.loads(r.stdout)
    assert d["totals"]["tokenizer_mismatch"] == 1 and any("qwen3" in w for w in d["warnings"])


def _replay(args: list[str], out: Path) -> None:
    r = runner.invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["overall"]["tokens"] == 6 and any("qwen3" in w for w in d["warnings"])


def _diff(args: list[str], out: Path) -> None:
    r = runner.invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["summary"]["identical"] == 1 and any("qwen3" in w for w in d["warnings"])


def _export(args: list[str], out: Path) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    assert out.exists() and "warning:" in r.stderr and "qwen3" in r.stderr


COMMANDS: dict[str, tuple[Callable[[Path, Path], list[str]], Callable[[list[str], Path], None]]] = {
    "check": (lambda tape, out: ["check", str(tape)], _check),
    "replay": (lambda tape, out: ["replay", str(tape)], _replay),
    "diff": (lambda tape, out: ["diff", str(tape), str(tape)], _diff),
    "export": (lambda tape, out: ["export", str(tape), "--format", "sft", "-o", str(out)], _export),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_wrong_tokenizer_unless_allowed(command: str, smol_tape: Path, qwen: Path,
                                                                tmp_path: Path) -> None:
    make, proceeds = COMMANDS[command]
    out = tmp_path / "out.parquet"
    args = make(smol_tape, out) + ["--tokenizer", str(qwen)]
    r = runner.invoke(app, args)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "SmolLM2-135M-Instruct (sha256 " in lines[0] and "qwen3 (sha256 " in lines[0]
    assert not out.exists(), "nothing is written before the tokenizer is settled"
    proceeds(args + ["--allow-tokenizer-mismatch"], out)


def test_diff_refuses_two_tapes_recorded_with_different_tokenizers(smol_tape: Path, qwen: Path, tmp_path: Path) -> None:
    other = _tape(tmp_path / "q", tokenizer_identity(qwen))
    r = runner.invoke(app, ["diff", str(smol_tape), str(other)])
    assert r.exit_code == 2 and f"tape {other} was recorded with tokenizer qwen3" in r.stderr, r.stderr
    r = runner.invoke(app, ["diff", str(smol_tape), str(other), "--json", "--allow-tokenizer-mismatch"])
    assert r.exit_code == 0, r.stderr
    assert any("different tokenizers" in w for w in json.loads(r.stdout)["warnings"])


def test_commands_find_the_tapes_own_tokenizer_by_default(smol_tape: Path, qwen: Path, tmp_path: Path) -> None:
    qtape = _tape(tmp_path / "q", tokenizer_identity(qwen))
    r = runner.invoke(app, ["check", str(qtape), "--json"])
    d = json.loads(r.stdout)
    assert d["tokenizer"] == d["tape_tokenizer"] and d["tokenizer"]["name"] == "qwen3" and not d["warnings"]
    r = runner.invoke(app, ["diff", str(qtape), str(qtape), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["tokenizer"]["name"] == "qwen3", r.stderr
    out = tmp_path / "sft.parquet"
    r = runner.invoke(app, ["export", str(smol_tape), "--format", "sft", "-o", str(out)])
    assert r.exit_code == 0 and "warning" not in r.stderr, r.stderr
