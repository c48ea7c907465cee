"""PromptBuilder calls the Rust tokenizer directly on the hot path: it must give exactly what the
Hugging Face wrapper gives (``encode(text, add_special_tokens=False)``, ``decode(ids,
skip_special_tokens=False)``), and fall back to the wrapper where the wrapper would do more."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from recorder.serve._prompting import PromptBuilder

TEXTS = ["", " ", "hello", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "  two  spaces  ",
         "a\n\n\nb\t\tc", "émoji 🎉 ünïcödé 中文 日本語", "<think>x</think>", "don't , . ! ? hello .world",
         "<|endoftext|><|endoftext|>", "x" * 3000]
PIECES = list("abc XYZ\n\t.,!?'é中🎉<>|/") + ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"]


def _tokenizers(model_dir: Path) -> list[Any]:
    from recorder.serve.engines._qwen import qwen_tokenizer_dir

    return [AutoTokenizer.from_pretrained(str(model_dir)), AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))]


def test_direct_encode_and_decode_match_the_hf_tokenizer(model_dir: Path) -> None:
    rng = random.Random(0)
    texts = TEXTS + ["".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 120))) for _ in range(300)]
    for tok in _tokenizers(model_dir):
        builder = PromptBuilder(tok)
        assert builder._backend is not None  # both are fast tokenizers: the direct path is the one tested
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False)
            assert builder.encode(text) == ids, (tok.name_or_path, text)
            assert builder.decode(ids) == tok.decode(ids, skip_special_tokens=False), (tok.name_or_path, text)
        some = [rng.randrange(len(tok)) for _ in range(500)]
        for i in range(0, len(some), 5):
            assert builder.decode(some[i:i + 5]) == tok.decode(some[i:i + 5], skip_special_tokens=False)


@pytest.mark.parametrize("setting", ["truncation", "split_special_tokens", "clean_up"])
def test_the_wrapper_is_used_where_it_would_change_the_result(model_dir: Path, setting: str) -> None:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    builder = PromptBuilder(tok)
    text = "<|im_start|>user\nHello , world .<|im_end|>\n" * 4
    if setting == "truncation":
        tok.backend_tokenizer.enable_truncation(max_length=3)
        # the wrapper turns the backend's truncation off before it encodes: the whole text
        assert builder.encode(text) == tok.encode(text, add_special_tokens=False)
        assert len(builder.encode(text)) > 3
    elif setting == "split_special_tokens":
        tok.split_special_tokens = True
        assert builder.encode(text) == tok.encode(text, add_special_tokens=False)
        assert tok.convert_tokens_to_ids("<|im_start|>") not in builder.encode(text)
    else:
        tok.clean_up_tokenization_spaces = True
        ids = tok.encode(text, add_special_tokens=False)
        assert builder.decode(ids) == tok.decode(ids, skip_special_tokens=False)
