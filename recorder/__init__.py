"""gymtape recorder: the tape format, the on-policy server that records into it, and collection.

Three wings, one public face (this module):

* ``recorder.tape``: the format (layout, metadata, schema, records, delta prompts, reader,
  writer, storage, compaction, inspect). Imports nothing else of gymtape.
* ``recorder.serve``: `gymtape serve` (OpenAI parsing, prompting, the splice, the call log,
  process supervision) and ``serve/engines`` (protocol, hf, vllm, the embedded default model).
* ``recorder.collect``: `gymtape record` (Gym agents and built-in environments), Gym JSONL
  import/export, synthetic rollouts.

``replay``, ``trainer_bridge`` and ``cli`` use the names below and nothing else of this package.
Importing it has no side effects; the server and the collector (FastAPI, transformers, httpx)
load on first use of their names.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._errors import (
    BundledDataError,
    CaptureConflictError,
    CaptureRetiredError,
    CompactionBusyError,
    CorruptShardError,
    GymCaptureUnavailableError,
    GymConversionError,
    GymFormatError,
    GymtapeError,
    NotATapeError,
    RecordConfigError,
    ServeProcessError,
    StorageError,
    TapeError,
    TapeValueError,
    TapeVersionError,
    TapeWriteError,
    TokenizerLoadError,
    TokenizerMismatchError,
    UnknownEnvError,
    WriterClosedError,
    WriterIdConflictError,
)
from ._data import chat_template_path
from .collect._gym import IngestReport, export_gym_jsonl, gym_jsonl_size, ingest_gym_jsonl, iter_gym_lines
from .collect._gym_messages import gym_call_requests
from .collect._synthetic import synthesize_gym_rollouts
from .serve._config import ServeConfig, ServeConfigError
from .serve._splice import SpliceError, splice_prefix
from .serve._tokenizer import ResolvedTokenizer, resolve_tokenizer
from .serve.engines._models import DEFAULT_MODEL, ModelUnavailableError, cache_dir, default_model_dir
from .tape._compact import CompactReport, TableCompaction, compact_tape
from .tape._inspect import summarize
from .tape._integrity import (
    INTEGRITY_CALL_COLUMNS,
    INTEGRITY_ROLLOUT_COLUMNS,
    RolloutIntegrity,
    broken_rollouts,
    read_integrity,
    rollout_integrity,
)
from .tape._layout import FORMAT_VERSION
from .tape._meta import TapeMeta, TokenizerIdentity, tokenizer_identity
from .tape._prompts import common_prefix_len, rebuild_prompts
from .tape._reader import CallsByRollout, ListColumn, Tape
from .tape._runs import run_manifests
from .tape._shards import ShardCatalog, ShardInfo, ShardListing, segment_shard
from .tape._records import CallRecord, RolloutRecord
from .tape._schema import CALLS_SCHEMA, ROLLOUTS_SCHEMA
from .tape._storage import TapeStorage, atomic_file, write_bytes_atomic
from .tape._writer import TapeWriter

#: Names whose modules pull in heavy dependencies (FastAPI, transformers, httpx): loaded on first use.
_LAZY = {
    "create_app": ".serve._server",
    "PromptBuilder": ".serve._prompting",
    "ServeProcess": ".serve._process",
    "run_server": ".serve._entry",
    "qwen_tokenizer_dir": ".serve.engines._qwen",
    "BUILTIN_ENVS": ".collect._envs",
    "BuiltinEnv": ".collect._envs",
    "builtin_env": ".collect._envs",
    "EnvConfig": ".collect._collector",
    "RecordConfig": ".collect._collector",
    "RecordReport": ".collect._collector",
    "load_config": ".collect._collector",
    "record": ".collect._collector",
    "TapeSink": ".collect._token_capture",
    "TapeSource": ".collect._token_capture",
    "TapeLineage": ".collect._token_capture",
    "CaptureIngestReport": ".collect._capture_ingest",
    "ingest_gym_capture": ".collect._capture_ingest",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    # errors (the whole tree of every package: recorder/_errors.py)
    "BundledDataError", "CorruptShardError", "GymFormatError", "GymtapeError", "ModelUnavailableError", "NotATapeError",
    "RecordConfigError", "ServeConfigError", "ServeProcessError", "SpliceError", "TapeError", "TapeValueError",
    "TapeVersionError", "TokenizerLoadError", "TokenizerMismatchError", "UnknownEnvError", "WriterClosedError",
    "WriterIdConflictError", "StorageError", "CompactionBusyError", "TapeWriteError",
    "CaptureConflictError", "CaptureRetiredError", "GymCaptureUnavailableError", "GymConversionError",
    # the tape
    "CALLS_SCHEMA", "FORMAT_VERSION", "ROLLOUTS_SCHEMA", "CallRecord", "CallsByRollout", "ListColumn", "RolloutRecord",
    "ShardInfo", "Tape", "TapeMeta", "TapeWriter", "TokenizerIdentity", "atomic_file", "common_prefix_len",
    "rebuild_prompts", "run_manifests", "summarize", "tokenizer_identity",
    # referential integrity: rollouts missing calls, incomplete, superseded by a retry
    "INTEGRITY_CALL_COLUMNS", "INTEGRITY_ROLLOUT_COLUMNS", "RolloutIntegrity", "broken_rollouts", "read_integrity",
    "rollout_integrity",
    # storage (local, shared POSIX, object storage) and compaction
    "CompactReport", "ShardCatalog", "ShardListing", "segment_shard", "TableCompaction", "TapeStorage", "compact_tape",
    "write_bytes_atomic",
    # serving
    "DEFAULT_MODEL", "PromptBuilder", "ServeConfig", "ServeProcess", "cache_dir", "create_app", "default_model_dir",
    "qwen_tokenizer_dir", "run_server", "splice_prefix",
    # the one tokenizer policy (check, replay, diff, export)
    "ResolvedTokenizer", "resolve_tokenizer",
    # collection, Gym import/export
    "BUILTIN_ENVS", "BuiltinEnv", "EnvConfig", "IngestReport", "RecordConfig", "RecordReport",
    "chat_template_path", "builtin_env", "export_gym_jsonl", "gym_jsonl_size", "ingest_gym_jsonl", "iter_gym_lines", "load_config", "record",
    "synthesize_gym_rollouts",
    # the chat request of each call of a Gym rollout (what `gymtape check` re-templates)
    "gym_call_requests",
    # NeMo Gym 0.7 token capture on a tape (token_id_capture: sink: recorder:TapeSink), and its import
    "CaptureIngestReport", "TapeLineage", "TapeSink", "TapeSource", "ingest_gym_capture",
]
