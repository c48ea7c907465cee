"""The public surface: explicit __all__, one exception tree, and docs generated from the schema."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import recorder
import recorder._errors
import replay
import trainer_bridge
from recorder.tape._schema import render_markdown
from tests.conftest import ROOT


def test_all_lists_exactly_the_public_names() -> None:
    for mod in (recorder, replay, trainer_bridge):
        public = {n for n in dir(mod) if not n.startswith("_") and not inspect.ismodule(getattr(mod, n))}
        assert public == set(mod.__all__), f"{mod.__name__}: __all__ and the public names differ"


def test_every_error_derives_from_gymtape_error() -> None:
    for mod in (recorder, replay, trainer_bridge):
        errors = {n: getattr(mod, n) for n in mod.__all__ if n.endswith("Error")}
        outside = sorted(n for n, e in errors.items() if not issubclass(e, recorder.GymtapeError))
        assert errors and not outside, f"{mod.__name__} exports errors outside the GymtapeError tree: {outside}"


def _drawn_tree() -> dict[str, str]:
    """``{error: parent}`` as drawn in recorder/_errors.py's docstring (four columns per level)."""
    lines = (recorder._errors.__doc__ or "").splitlines()
    root = next(line for line in lines if line.strip() == "GymtapeError")
    col = root.index("GymtapeError")
    parents: dict[str, str] = {}
    stack = ["GymtapeError"]
    for line in lines:
        m = re.match(r"([ │]*)[├└]── (\w+)", line)
        if m is None:
            continue
        depth = (len(m.group(1)) - col) // 4 + 1
        del stack[depth:]
        assert m.group(2) not in parents, f"{m.group(2)} is drawn twice"
        parents[m.group(2)] = stack[-1]
        stack.append(m.group(2))
    return parents


def _existing_tree() -> dict[str, str]:
    """``{error: parent}`` of every GymtapeError subclass defined in the three packages."""
    for pkg in (recorder, replay, trainer_bridge):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not info.name.endswith(".__main__"):  # a __main__ runs its program when imported
                importlib.import_module(info.name)
    out: dict[str, str] = {}
    todo = [recorder.GymtapeError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            parent = next(b for b in sub.__mro__[1:] if issubclass(b, recorder.GymtapeError))
            assert out.get(sub.__name__, parent.__name__) == parent.__name__, f"two errors named {sub.__name__}"
            out[sub.__name__] = parent.__name__
            todo.append(sub)
    return out


def test_the_error_tree_docstring_lists_exactly_the_errors_that_exist() -> None:
    drawn, existing = _drawn_tree(), _existing_tree()
    assert drawn.keys() == existing.keys(), (
        f"recorder/_errors.py's tree and the code differ: not drawn {sorted(existing.keys() - drawn.keys())}, "
        f"drawn but gone {sorted(drawn.keys() - existing.keys())}")
    moved = {n: (drawn[n], existing[n]) for n in drawn if drawn[n] != existing[n]}
    assert not moved, f"drawn under another parent than in the code (drawn, code): {moved}"


def test_public_functions_raise_gymtape_errors_not_bare_builtins(tmp_path: Path) -> None:
    """Representative raise sites that used to leak ValueError / KeyError / FileExistsError; each
    gymtape type still derives from that builtin, so older ``except`` clauses keep working."""
    from recorder import CallRecord, TapeValueError, TapeWriter, UnknownEnvError, WriterIdConflictError, builtin_env
    from recorder.serve._config import ServeConfig, ServeConfigError
    from recorder.serve._server import build_engine
    from trainer_bridge import BridgeValueError, TapeDataset, TapeFollower

    with TapeWriter(tmp_path / "t", flush_seconds=None, handle_signals=False) as w:
        pass
    with pytest.raises(TapeValueError, match="table must be one of") as e:
        recorder.Tape(w.path).shards("call")
    assert isinstance(e.value, ValueError)
    assert '"tokenizer": null' in (w.path / "tape.json").read_text()
    meta = w.path / "tape.json"
    meta.write_text(meta.read_text().replace('"tokenizer": null', '"tokenizer": {"name": "x"}'))
    with pytest.raises(recorder.NotATapeError, match="tokenizer is .* expected an object with name and sha256"):
        recorder.Tape(w.path)  # was a KeyError from deep inside the metadata parser
    with pytest.raises(UnknownEnvError) as e:
        builtin_env("no-such-env")
    assert isinstance(e.value, KeyError) and str(e.value).startswith("no built-in environment 'no-such-env'")
    with pytest.raises(ServeConfigError, match="engine must be hf or vllm, got 'nope'"):
        build_engine(ServeConfig(engine="nope"))
    with pytest.raises(BridgeValueError, match="max_staleness must be >= 0, got -1") as e:
        TapeFollower(w.path, max_staleness=-1, groups_per_batch=1)
    assert isinstance(e.value, ValueError)
    with pytest.raises(BridgeValueError, match="token_budget must be positive, got 0"):
        TapeDataset(w.path, token_budget=0)
    # two writers given one writer id: the second cannot publish its shard under a taken name
    def one_call(writer: TapeWriter) -> None:
        writer.add_call(CallRecord(rollout_id="r", call_index=0, prompt_ids=[1, 2], generation_ids=[3],
                                   generation_logprobs=[-0.1]))
        writer.flush()

    first = TapeWriter(tmp_path / "dup", writer_id="w", flush_seconds=None, handle_signals=False)
    second = TapeWriter(tmp_path / "dup", writer_id="w", flush_seconds=None, handle_signals=False)
    try:
        one_call(first)
        with pytest.raises(WriterIdConflictError, match="two writers share the writer id") as e:
            one_call(second)
        assert isinstance(e.value, FileExistsError)
    finally:
        first.abort()
        second.abort()
