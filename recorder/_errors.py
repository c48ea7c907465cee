"""The exception tree of gymtape.

Every error gymtape raises on purpose derives from :class:`GymtapeError`, so a caller can
catch one type. Foreign errors (pyarrow, OS, JSON) are wrapped where they cross into gymtape,
with the original kept as ``__cause__``::

    GymtapeError
    ├── TapeError                  a tape on disk cannot be used
    │   ├── NotATapeError          the directory has no tape.json
    │   ├── TapeVersionError       written by another format version
    │   ├── CorruptShardError      a shard cannot be read (names the file)
    │   └── TokenizerMismatchError a writer's tokenizer differs from the tape's
    ├── TapeValueError             a record handed to the writer breaks a rule
    ├── WriterClosedError          a closed writer was used
    └── GymFormatError             a Gym JSONL line is malformed (names file and line)
"""

from __future__ import annotations


class GymtapeError(Exception):
    """Base class of every error gymtape raises on purpose."""


class TapeError(GymtapeError):
    """A tape on disk cannot be used as it is."""


class NotATapeError(TapeError):
    """The path is not a tape (no ``tape.json``)."""


class TapeVersionError(TapeError):
    """The tape was written in a format version this gymtape does not read."""


class CorruptShardError(TapeError):
    """A shard file is truncated, corrupt, or not a gymtape shard."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"shard {path} cannot be read: {reason}. Move the file out of the tape "
            "(the other shards stay readable) or re-record that part."
        )
        self.path = path


class TokenizerMismatchError(TapeError):
    """A writer's tokenizer identity differs from the one recorded in ``tape.json``."""


class TapeValueError(GymtapeError, ValueError):
    """A record handed to the writer breaks a rule of the tape format."""


class WriterClosedError(GymtapeError):
    """The writer was already closed (or aborted)."""


class GymFormatError(GymtapeError, ValueError):
    """A NeMo Gym JSONL line is malformed."""

    def __init__(self, source: str, line_no: int, reason: str) -> None:
        super().__init__(f"{source}:{line_no}: {reason}")
        self.source = source
        self.line_no = line_no
        self.reason = reason
