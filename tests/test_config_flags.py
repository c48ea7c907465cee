"""Every config field has its `gymtape` flag and every flag its field: a field added to a config
without a flag (or a flag that reaches no field) fails here, not in a user's hands."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli import app
from recorder import EnvConfig, RecordConfig, ServeConfig
from trainer_bridge import TrainConfig


def _flags(command: str) -> set[str]:
    return {p.name for p in typer.main.get_command(app).commands[command].params}  # type: ignore[attr-defined]


def _fields(*configs: type) -> set[str]:
    return {f.name for c in configs for f in dataclasses.fields(c)}


#: (command, configs, flag -> field where the names differ, fields deliberately without a flag,
#:  flags that are no field), each exception with its reason.
CASES = [
    ("train", (TrainConfig,), {}, {}, {"ab": "runs TrainConfig twice (both arms of the A/B)",
                                         "ab_report": "where --ab writes its report"}),
    ("serve", (ServeConfig,), {"vllm_arg": "vllm_args"}, {},
     {"config": "a file of ServeConfig fields that the other flags override"}),
    ("record", (RecordConfig, EnvConfig), {"env": "builtin", "task_index": "task_indices"},
     {"envs": "the flags describe one environment; several come from --config YAML",
      "weight": "an env's share among several environments: only meaningful in a --config YAML",
      "sampling": "spelled out as --temperature, --top-p, --max-tokens (per-rollout seeds: --seed)"},
     {"config": "the run YAML", "select": "picks environments of --config", "list_envs": "lists and exits",
      "split": "picks a built-in env's task file (EnvConfig.tasks)",
      "temperature": "EnvConfig.sampling", "top_p": "EnvConfig.sampling", "max_tokens": "EnvConfig.sampling"}),
]


@pytest.mark.parametrize(("command", "configs", "renames", "no_flag", "no_field"), CASES, ids=[c[0] for c in CASES])
def test_every_config_field_has_its_flag_and_every_flag_its_field(
        command: str, configs: tuple[type, ...], renames: dict[str, str], no_flag: dict[str, str],
        no_field: dict[str, str]) -> None:
    fields = _fields(*configs) - set(no_flag)
    flags = {renames.get(p, p) for p in _flags(command) - set(no_field)}
    names = "/".join(c.__name__ for c in configs)
    assert fields - flags == set(), f"{names} fields without a `gymtape {command}` flag (add one, or list why not)"
    assert flags - fields == set(), f"`gymtape {command}` flags that set no {names} field"
    assert set(no_flag) <= _fields(*configs) and set(no_field) <= _flags(command), "stale exceptions in CASES"


def test_train_flags_reach_train_config_one_to_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each flag set on the command line arrives in the TrainConfig that `train` runs with."""
    import trainer_bridge

    seen: list[TrainConfig] = []

    def fake_train(cfg: TrainConfig, **_: object) -> trainer_bridge.TrainReport:
        seen.append(cfg)
        return trainer_bridge.TrainReport()

    monkeypatch.setattr(trainer_bridge, "train", fake_train)
    args = ["train", "--out", str(tmp_path), "--weight-decay", "0.1", "--betas", "0.8", "0.95", "--max-grad-norm",
            "0.5", "--no-std-normalize", "--token-budget", "1024", "--keep-checkpoints", "3", "--batch-timeout", "9",
            "--server-timeout", "8", "--seed", "7"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    expected = TrainConfig(out=tmp_path, weight_decay=0.1, betas=(0.8, 0.95), max_grad_norm=0.5, std_normalize=False,
                           token_budget=1024, keep_checkpoints=3, batch_timeout=9.0, server_timeout=8.0, seed=7)
    assert seen == [expected]


def test_serve_config_file_round_trips_and_flags_override_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What ServeProcess writes is what the server runs with; a flag given as well wins."""
    import orjson

    import recorder

    ran: list[ServeConfig] = []
    monkeypatch.setattr(recorder, "run_server", ran.append)
    config = ServeConfig(tape=tmp_path / "t", port=1234, dtype="bfloat16", flush_seconds=0.2, vllm_args=("--x",),
                         max_model_len=512, reasoning=False)
    path = tmp_path / "serve.json"
    path.write_bytes(orjson.dumps(config.to_dict()))
    assert ServeConfig.from_file(path) == config
    r = CliRunner().invoke(app, ["serve", "--config", str(path), "--port", "99", "--vllm-arg", "--y"])
    assert r.exit_code == 0, r.output
    assert ran == [dataclasses.replace(config, port=99, vllm_args=("--y",))]
    r = CliRunner().invoke(app, ["serve", "--port", "98", "--no-reasoning"])
    assert r.exit_code == 0 and ran[-1] == ServeConfig(port=98, reasoning=False), r.output


@pytest.mark.parametrize(("content", "message"), [
    ('{"prot": 1}', "unknown field(s) prot"),
    ('{"port": "80"}', "port must be int, got '80'"),
    ('{"api_key": "***"}', "api_key is masked"),
    ("[1, 2]", "expected a mapping"),
    ("port: [", "not valid JSON or YAML"),
])
def test_a_bad_serve_config_file_is_a_one_line_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "serve.json"
    path.write_text(content)
    r = CliRunner().invoke(app, ["serve", "--config", str(path)])
    assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.stderr, r.output
