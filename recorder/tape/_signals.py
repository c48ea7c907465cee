"""Close open writers on SIGTERM/SIGINT, then let the signal do what it did before.

A signal can land while a writer is half-way through a buffer update or a flush. Closing it
right there would flush a torn buffer, so the handler only *requests* a close from writers that
are busy; they honour it when they leave their critical section, and the signal is re-delivered
after that.
"""

from __future__ import annotations

import os
import signal
import threading
import weakref
from typing import Any, Protocol


class _Closable(Protocol):
    def _close_from_signal(self) -> bool: ...


_writers: weakref.WeakSet[Any] = weakref.WeakSet()
_previous: dict[int, Any] = {}
_pending: list[int] = []
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def register(writer: _Closable) -> None:
    _writers.add(writer)
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may install handlers; the main program's own stay
    for sig in _SIGNALS:
        if sig in _previous:
            continue
        current = signal.getsignal(sig)
        if current is _handler:
            continue
        _previous[sig] = current
        signal.signal(sig, _handler)


def unregister(writer: _Closable) -> None:
    _writers.discard(writer)


def _handler(signum: int, frame: Any) -> None:
    deferred = False
    for w in list(_writers):
        if not w._close_from_signal():
            deferred = True
    if deferred:
        _pending.append(signum)
        return
    _redeliver(signum, frame)


def busy_writer_finished() -> None:
    """Called by a writer that honoured a deferred close; re-delivers the held signal."""
    if _pending and not any(getattr(w, "_busy", 0) for w in list(_writers)):
        signum = _pending.pop()
        _pending.clear()
        _redeliver(signum, None)


def _redeliver(signum: int, frame: Any) -> None:
    prev = _previous.pop(signum, signal.SIG_DFL)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signum, prev if prev is not None else signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_DFL:
        os.kill(os.getpid(), signum)
