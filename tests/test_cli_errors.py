"""Every user-caused failure of a `gymtape` command is one line on standard error naming the file
and what to do, exit code 2, no traceback; ``--debug`` (or ``GYMTAPE_DEBUG=1``) shows it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli import app
from recorder import TapeWriter, tokenizer_identity
from tests.conftest import DEMO_TASKS, fill_disk

runner = CliRunner()


def _run(*args: Any, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    r = runner.invoke(app, [str(a) for a in args], env=env)
    return r.exit_code, r.stdout, r.stderr


def _one_line(code: int, err: str, *needles: str) -> None:
    """Exit 2 and a last stderr line ``error: ...`` holding every needle; no traceback anywhere."""
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for n in needles:
        assert n in last, f"{n!r} not in {last!r}"


def _damage_footer(shard: Path) -> None:
    """Flip the first byte of the column name ``call_id`` in the Parquet footer's schema: the
    footer still parses, but its metadata is no longer UTF-8 (today's UnicodeDecodeError)."""
    data = bytearray(shard.read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer_len
    pos = data.index(b"call_id", start)
    data[pos] ^= 0xFF
    shard.write_bytes(bytes(data))


@pytest.fixture
def damaged(make_tape: Callable[..., tuple[Path, Path]]) -> tuple[Path, Path]:
    tape, _ = make_tape(repeats=1, calls=2, context_tokens=64, vocab_size=49152)
    shard = next((tape / "calls").glob("*.parquet"))
    _damage_footer(shard)
    return tape, shard


@pytest.mark.parametrize("command", ["inspect", "export"])
def test_a_damaged_footer_is_one_line_naming_the_shard(damaged: tuple[Path, Path], command: str) -> None:
    tape, shard = damaged
    code, _, err = _run(command, tape)
    _one_line(code, err, str(shard), "cannot be read", "Move the file out of the tape")


def test_replay_of_a_damaged_footer_names_the_shard(damaged: tuple[Path, Path], model_dir: Path) -> None:
    tape, shard = damaged
    code, _, err = _run("replay", tape, "--model", model_dir)
    _one_line(code, err, str(shard), "cannot be read")


def test_check_of_a_damaged_footer_reports_the_shard_and_exits_1(damaged: tuple[Path, Path]) -> None:
    tape, shard = damaged
    code, out, err = _run("check", tape, "--json")
    assert code == 1 and "Traceback" not in err, err
    report = json.loads(out)
    assert report["unreadable_shards"] == [str(shard)] and report["totals"]["unreadable_shard"] == 1
    assert report["rollouts_missing_calls"] == report["rollout_rows"] > 0, \
        "the rollouts whose calls were in the damaged shard are named as missing them"


def test_replay_of_out_of_vocabulary_ids_names_rollout_call_id_and_vocabulary(
        make_tape: Callable[..., tuple[Path, Path]], model_dir: Path) -> None:
    # token IDs drawn from Qwen's 151,936 IDs, replayed with SmolLM2's 49,152 (today: IndexError)
    tape, _ = make_tape(repeats=1, calls=1, context_tokens=16, vocab_size=151_936)
    code, _, err = _run("replay", tape, "--model", model_dir)
    _one_line(code, err, "rollout ", " call 0: ", "outside the vocabulary of the model", "49152 IDs")
    r = runner.invoke(app, ["--debug", "replay", str(tape), "--model", str(model_dir)])
    from replay import TokenOutOfVocabError

    assert isinstance(r.exception, TokenOutOfVocabError), "--debug lets the error (and its traceback) through"


def test_tape_json_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "t" / "tape.json").mkdir(parents=True)
    for command in ("inspect", "check", "export"):
        code, _, err = _run(command, tmp_path / "t")
        _one_line(code, err, str(tmp_path / "t" / "tape.json"), "is a directory")


def test_missing_and_impossible_paths(make_tape: Callable[..., tuple[Path, Path]], tmp_path: Path) -> None:
    tape, src = make_tape(repeats=1, calls=1, context_tokens=16)
    code, _, err = _run("export", tape, "-o", tmp_path / "no" / "such" / "dir" / "out.jsonl")
    _one_line(code, err, str(tmp_path / "no" / "such" / "dir" / "out.jsonl"), "No such file or directory",
              "check the path")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, _, err = _run("ingest", src, "--tape", a_file / "tape")
    _one_line(code, err, str(a_file / "tape"), "check the path")
    code, _, err = _run("inspect", tmp_path / "nowhere")
    _one_line(code, err, str(tmp_path / "nowhere"), "is not a tape")


def test_wrong_tokenizer(tmp_path: Path, model_dir: Path) -> None:
    with TapeWriter(tmp_path / "t", tokenizer=tokenizer_identity(model_dir), flush_seconds=None,
                    handle_signals=False):
        pass
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / f).is_file():
            shutil.copy(model_dir / f, other / f)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 7}))
    code, _, err = _run("check", tmp_path / "t", "--tokenizer", other)
    _one_line(code, err, "other-tokenizer", "--allow-tokenizer-mismatch")
    code, _, err = _run("check", tmp_path / "t", "--tokenizer", tmp_path)
    _one_line(code, err, str(tmp_path), "holds no tokenizer files")


def test_full_disk_during_ingest_is_one_line(small_disk: Path, tmp_path: Path, make_rollouts: Any) -> None:
    from tests.conftest import write_jsonl

    src = write_jsonl(tmp_path / "big.jsonl", make_rollouts(repeats=100, calls=4, context_tokens=2048, seed=1))
    code, _, err = _run("ingest", src, "--tape", small_disk / "t")  # 30 MB of JSONL into a 3 MiB disk
    _one_line(code, err, str(small_disk / "t"), "No space left on device", "free space")
    leftovers = [p.name for p in (small_disk / "t").rglob(".*")]
    assert not leftovers, f"the failed flush left temporary files: {leftovers}"
    shutil.rmtree(small_disk / "t")
    filler = fill_disk(small_disk)
    try:
        code, _, err = _run("ingest", src, "--tape", small_disk / "t2")  # not even tape.json fits
        _one_line(code, err, str(small_disk / "t2"), "No space left on device", "free space")
    finally:
        filler.unlink()


def test_full_disk_during_record_is_one_line(small_disk: Path) -> None:
    filler = fill_disk(small_disk)
    try:
        code, _, err = _run("record", "--agent-url", "http://127.0.0.1:9", "--tasks", DEMO_TASKS, "--tape",
                            small_disk / "t", "--server-wait", "0", "--retries", "0")
    finally:
        filler.unlink()
    _one_line(code, err, str(small_disk / "t"), "No space left on device", "free space")


def test_debug_flag_and_environment_variable_show_the_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("gymtape")
    env = {k: v for k, v in os.environ.items() if k != "GYMTAPE_DEBUG"}
    plain = subprocess.run([str(exe), "inspect", str(tmp_path)], capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    for args, extra in ((["--debug", "inspect", str(tmp_path)], {}),
                        (["inspect", str(tmp_path)], {"GYMTAPE_DEBUG": "1"})):
        r = subprocess.run([str(exe), *args], capture_output=True, text=True, env={**env, **extra})
        assert r.returncode == 1 and "Traceback" in r.stderr and "NotATapeError" in r.stderr, r.stderr
