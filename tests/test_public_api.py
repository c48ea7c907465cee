"""The public surface: explicit __all__, one exception tree, and docs generated from the schema."""

from __future__ import annotations

import inspect

import recorder
import replay
import trainer_bridge
from recorder.tape._schema import render_markdown
from tests.conftest import ROOT


def test_all_lists_exactly_the_public_names() -> None:
    for mod in (recorder, replay, trainer_bridge):
        public = {n for n in dir(mod) if not n.startswith("_") and not inspect.ismodule(getattr(mod, n))}
        assert public == set(mod.__all__), f"{mod.__name__}: __all__ and the public names differ"


def test_every_error_derives_from_gymtape_error() -> None:
    errors = [getattr(recorder, n) for n in recorder.__all__ if n.endswith("Error")]
    assert errors and all(issubclass(e, recorder.GymtapeError) for e in errors)


def test_schema_reference_is_up_to_date() -> None:
    doc = (ROOT / "docs" / "tape-format.md").read_text()
    assert doc == render_markdown(), "run: make docs"
