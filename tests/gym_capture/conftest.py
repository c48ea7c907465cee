"""NeMo Gym capture tests: nemo-gym 0.7's ``token_id_capture`` package, as Gym ships it."""

from __future__ import annotations

import pytest

#: Why these tests skip when nemo_gym is missing (``make test`` installs it).
GYM_MISSING = ("nemo_gym.token_id_capture (nemo-gym 0.7.0) is not installed: "
               "pip install --no-deps --ignore-requires-python nemo-gym==0.7.0 (make test does)")


def require_gym() -> None:
    pytest.importorskip("nemo_gym.token_id_capture.conformance", reason=GYM_MISSING)
