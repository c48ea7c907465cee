"""gymtape trainer bridge: tapes into on-policy and asynchronous off-policy update loops.

Not built yet (see the trainer-bridge issue); tapes are read through :class:`recorder.Tape`.
"""

__all__: list[str] = []
