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
    "ShardInfo",
    "Tape",
    "TapeError",
    "TapeMeta",
    "TapeValueError",
    "TapeVersionError",
    "TapeWriter",
    "TokenizerIdentity",
    "TokenizerMismatchError",
    "WriterClosedError",
    "export_gym_jsonl",
    "ingest_gym_jsonl",
    "iter_gym_lines",
    "summarize",
    "synthesize_gym_rollouts",
    "tokenizer_identity",
]
