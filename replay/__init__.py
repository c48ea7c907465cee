"""gymtape replay: offline train-generation consistency checks over a tape.

:func:`check_tape` runs the structural checks (re-tokenization, re-templating, history, field
consistency) that need only the tokenizer; tapes are read through :class:`recorder.Tape`.
"""

from ._check import CheckReport, check_tape

__all__ = ["CheckReport", "check_tape"]
