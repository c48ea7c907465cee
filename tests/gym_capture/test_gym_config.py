"""How a Gym user points Gym at a tape: ``token_id_capture: {sink: recorder:TapeSink, ...}``, built
by Gym's own config code; and gymtape without nemo_gym installed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.gym_capture.conftest import require_gym


def test_gyms_config_builds_the_tape_sink_and_lineage_store_from_their_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_gym()
    from nemo_gym.token_id_capture.config import TokenIdCaptureConfig
    from nemo_gym.token_id_capture.protocols import LineageResolver, TokenSink

    from recorder import TapeLineage, TapeSink

    # Gym 0.7 reads Protocol.__protocol_attrs__ (Python >= 3.12); on 3.11 give it what 3.12 computes
    # (on the metaclass, so isinstance checks do not start requiring it of instances).
    if not hasattr(TokenSink, "__protocol_attrs__"):
        monkeypatch.setattr(type(TokenSink), "__protocol_attrs__",
                            property(lambda cls: typing._get_protocol_attrs(cls)), raising=False)
    tape = str(tmp_path / "tape")
    config = TokenIdCaptureConfig.model_validate({"token_id_capture": {
        "enabled": True, "delta_records": True,
        "sink": "recorder:TapeSink", "sink_kwargs": {"tape": tape},
        "lineage_store": "recorder:TapeLineage", "lineage_store_kwargs": {"tape": tape}}})
    sink, lineage = config.build_sink(), config.build_lineage_store()
    assert isinstance(sink, TapeSink) and isinstance(lineage, TapeLineage)
    assert isinstance(sink, TokenSink) and isinstance(lineage, LineageResolver) and lineage.is_process_shared()
    asyncio.run(sink.close())
    asyncio.run(lineage.close())


def test_gymtape_without_nemo_gym_imports_and_says_how_to_get_the_capture_classes() -> None:
    code = ("import sys; sys.modules['nemo_gym'] = None\n"  # as if nemo_gym were not installed
            "import recorder\n"
            "from recorder import GymCaptureUnavailableError, TapeSink\n"
            "try:\n    TapeSink('unused')\nexcept GymCaptureUnavailableError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "pip install --no-deps --ignore-requires-python nemo-gym==0.7.0" in out


def test_importing_recorder_does_not_import_nemo_gym() -> None:
    code = "import sys, recorder; print('nemo_gym' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
