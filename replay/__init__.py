"""gymtape replay: offline train-generation consistency checks over a tape.

Not built yet (see the replay issue); tapes are read through :class:`recorder.Tape`.
"""

__all__: list[str] = []
