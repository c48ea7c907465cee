"""gymtape recorder: writes and reads tapes (Parquet shards of model calls and rollouts).

The tape format lives here; replay and trainer_bridge read tapes through :class:`Tape`.
Importing this package has no side effects.
"""

from ._errors import (
    CorruptShardError,
    GymFormatError,
    GymtapeError,
    NotATapeError,
    TapeError,
    TapeValueError,
    TapeVersionError,
    TokenizerMismatchError,
    WriterClosedError,
)
from ._gym import IngestReport, export_gym_jsonl, ingest_gym_jsonl, iter_gym_lines
from ._inspect import summarize
from ._layout import FORMAT_VERSION
from ._meta import TapeMeta, TokenizerIdentity, tokenizer_identity
from ._reader import CallsByRollout, ShardInfo, Tape
from ._records import CallRecord, RolloutRecord
from ._synthetic import synthesize_gym_rollouts
from ._writer import TapeWriter
from .onpolicy import SpliceError, splice_prefix


def __getattr__(name: str):  # the server pulls in FastAPI and transformers: load it on first use
    if name in ("ServeConfig", "create_app"):
        from . import _server

        return getattr(_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "FORMAT_VERSION",
    "CallRecord",
    "CallsByRollout",
    "CorruptShardError",
    "GymFormatError",
    "GymtapeError",
    "IngestReport",
    "NotATapeError",
    "RolloutRecord",
    "ServeConfig",
    "ShardInfo",
    "SpliceError",
    "Tape",
    "TapeError",
    "TapeMeta",
    "TapeValueError",
    "TapeVersionError",
    "TapeWriter",
    "TokenizerIdentity",
    "TokenizerMismatchError",
    "WriterClosedError",
    "create_app",
    "export_gym_jsonl",
    "ingest_gym_jsonl",
    "iter_gym_lines",
    "splice_prefix",
    "summarize",
    "synthesize_gym_rollouts",
    "tokenizer_identity",
]
