"""Gym's own conformance suite (``nemo_gym.token_id_capture.conformance.run_conformance``) over a tape.

Factories open fresh instances over one tape, as the suite asks: with ``share=False`` each
instance has its own writer and index, as it would in a process of its own, so visibility comes
from the tape alone; with the default sharing, as Gym's server processes use them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.gym_capture.conftest import require_gym

require_gym()

from nemo_gym.token_id_capture.conformance import run_conformance  # noqa: E402

from recorder import TapeLineage, TapeSink, TapeSource  # noqa: E402

EVERY_CHECK = [
    "put_then_freeze_visibility", "idempotent_reput", "conflicting_reput", "mark_incomplete_durability",
    "freeze_idempotency", "post_freeze_write_safety", "conditional_retirement", "lineage_visibility",
    "fresh_client_lineage_visibility", "begin_call_custody",
]


@pytest.mark.parametrize("share", [False, True], ids=["instances-alone", "instances-shared"])
def test_gym_conformance_suite_passes_every_check_over_one_tape(tmp_path: Path, share: bool) -> None:
    tape = tmp_path / "tape"
    passed = asyncio.run(run_conformance(
        lambda: TapeSink(tape, share=share), lambda: TapeSource(tape, share=share),
        lambda: TapeLineage(tape, share=share)))
    assert passed == EVERY_CHECK, f"checks that did not run: {sorted(set(EVERY_CHECK) - set(passed))}"


def test_gym_conformance_passes_again_on_a_tape_that_already_holds_its_rollouts(tmp_path: Path) -> None:
    """A second run over the same tape (new processes' view: fresh instances, old rows) passes too:
    each check uses its own rollout id prefix, and what the first run left must not leak in."""
    tape = tmp_path / "tape"
    for prefix in ("first", "second"):
        passed = asyncio.run(run_conformance(
            lambda: TapeSink(tape, share=False), lambda: TapeSource(tape, share=False),
            lambda: TapeLineage(tape, share=False), rollout_id=f"{prefix}-run"))
        assert passed == EVERY_CHECK
