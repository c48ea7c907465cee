"""The exception tree of gymtape: every package's, in one place.

Every error gymtape raises on purpose derives from :class:`GymtapeError`, so a caller can
catch one type. Foreign errors (pyarrow, OS, JSON, transformers) are wrapped where they cross
into gymtape, with the original kept as ``__cause__``. Where a builtin type was raised before,
the gymtape type also derives from it (shown in brackets), so ``except ValueError`` keeps
working. ``tests/test_public_api.py`` checks that this drawing lists exactly the subclasses
that exist::

    GymtapeError
    ├── TapeError                    a tape on disk cannot be used (recorder.tape)
    │   ├── NotATapeError            the directory has no tape.json
    │   ├── TapeVersionError         written by another format version
    │   ├── CorruptShardError        a shard cannot be read (names the file)
    │   ├── TokenizerMismatchError   a tokenizer's identity differs from the tape's
    │   ├── WriterIdConflictError    two writers share one writer id [FileExistsError]
    │   └── StorageError             the tape's storage cannot be used as asked (e.g. live capture to a URL)
    │       └── CompactionBusyError  another compactor is working on the tape
    ├── TapeValueError               a record or argument breaks a tape rule [ValueError]
    ├── WriterClosedError            a closed writer was used
    ├── TapeWriteError               rows could not be made durable (disk full, permissions); retried [OSError]
    ├── GymFormatError               a Gym JSONL line is malformed (names file and line) [ValueError]
    ├── GymConversionError           a Gym rollout's Responses items have no chat-message form [ValueError]
    ├── CaptureConflictError         a NeMo Gym capture call id was put again with another payload [ValueError]
    ├── CaptureRetiredError          a NeMo Gym capture rollout was used after its drop [RuntimeError]
    ├── GymCaptureUnavailableError   nemo_gym 0.7 is not installed: the Gym capture classes cannot run [ImportError]
    ├── TokenizerLoadError           a tokenizer directory cannot be loaded
    ├── ModelUnavailableError        a model is not installed or cannot be built (recorder.serve)
    ├── ServeConfigError             the server cannot start as configured
    ├── ServeProcessError            a `gymtape serve` child did not start, died, or refused weights
    ├── BundledDataError             gymtape's bundled datasets/ is missing (a broken install)
    ├── SpliceError                  message token IDs cannot be spliced into the prompt [ValueError]
    ├── RecordConfigError            a record configuration is invalid (recorder.collect) [ValueError]
    │   └── UnknownEnvError          no built-in environment has that name [KeyError]
    ├── ReplayError                  replay was asked for something it cannot do (replay)
    │   ├── UnknownMetricError       a --fail-above names no metric
    │   └── TokenOutOfVocabError     a tape's token ID is outside the scoring model's vocabulary
    ├── ReplayModelError             the re-scoring model cannot be loaded or run
    ├── EngineReplayError            re-scoring on a live engine failed
    ├── DiffError                    two tapes cannot be compared as asked
    ├── BridgeValueError             a trainer_bridge argument breaks a rule [ValueError]
    ├── UnsupportedModelError        a model lacks what scoring needs [TypeError]
    ├── ResumeStateError             a loader's resume state does not fit [ValueError]
    ├── FollowerTimeout              a live tape produced no batch in time [TimeoutError]
    ├── ExportError                  an SFT/DPO export cannot be written as asked
    └── TrainError                   the reference GRPO loop cannot go on
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
            f"shard {path} cannot be read: {reason.rstrip('. ')}. Move the file out of the tape "
            "(the other shards stay readable) or re-record that part."
        )
        self.path = path


class TokenizerMismatchError(TapeError):
    """A tokenizer's identity differs from the one recorded in ``tape.json`` (a writer's, or
    the one a command reads the tape with: see :func:`recorder.resolve_tokenizer`)."""


class WriterIdConflictError(TapeError, FileExistsError):
    """A shard name is taken: two writers share one writer id."""


class StorageError(TapeError):
    """The tape's storage cannot be used as asked: a URL where live capture needs a POSIX
    folder, a filesystem that cannot be reached, a URL no filesystem knows."""


class CompactionBusyError(StorageError):
    """Another `gymtape compact` holds the tape's compaction lock (one compactor per tape)."""


class TapeValueError(GymtapeError, ValueError):
    """A record handed to the writer, or an argument of the tape API, breaks a rule of the tape format."""


class WriterClosedError(GymtapeError):
    """The writer was already closed (or aborted)."""


class TapeWriteError(GymtapeError, OSError):
    """Rows could not be made durable on the tape (disk full, permission, I/O error).

    Nothing is dropped: the rows stay in the writer and the next commit retries them; the
    message names the file and the cause."""


class GymFormatError(GymtapeError, ValueError):
    """A NeMo Gym JSONL line is malformed."""

    def __init__(self, source: str, line_no: int, reason: str) -> None:
        super().__init__(f"{source}:{line_no}: {reason}")
        self.source = source
        self.line_no = line_no
        self.reason = reason


class GymConversionError(GymtapeError, ValueError):
    """A NeMo Gym rollout's Responses request or output items cannot be turned back into the chat
    messages its model server sent (an item type or field with no chat form, bad call indices)."""


class CaptureConflictError(GymtapeError, ValueError):
    """A NeMo Gym token-capture entry reuses a recorded model call id with another payload (Gym's
    rule: a retry resends the identical entry; a rebuilt one is a conflict)."""


class CaptureRetiredError(GymtapeError, RuntimeError):
    """A NeMo Gym token-capture rollout was written to or frozen after its snapshot was dropped."""


class GymCaptureUnavailableError(GymtapeError, ImportError):
    """The NeMo Gym capture classes need ``nemo_gym.token_id_capture`` (nemo-gym 0.7)."""


class TokenizerLoadError(GymtapeError):
    """A tokenizer directory (or hub id) cannot be loaded."""


class RecordConfigError(GymtapeError, ValueError):
    """A record configuration (YAML or flags) is invalid."""


class UnknownEnvError(RecordConfigError, KeyError):
    """No built-in environment has the name asked for."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ServeProcessError(GymtapeError):
    """A `gymtape serve` child process (:class:`~recorder.ServeProcess`) did not start, died, or
    refused a request; the message ends with its log."""


class BundledDataError(GymtapeError):
    """gymtape's bundled data (built-in environments, chat templates) is not where it should be."""
