"""Short scheduler slices for the threads every call waits on.

A call at concurrency 1 passes through three of this process's threads in turn: the event loop
(request in, upstream call, answer out), a prompt worker (parse, template, tokenize) and the
committer (the row made durable). Each hand-off wakes a thread; on a busy host (vLLM's own
processes busy-poll their cores, a trainer, other jobs) a woken ordinary thread waits in the run
queue for the running task's slice to end: 2-4 ms p50 per wake-up measured on 2 shared cores at
load average 5-10. A thread that asks for a short slice (EEVDF's ``sched_attr.sched_runtime``
of a ``SCHED_OTHER`` thread, Linux >= 6.12; unprivileged) gets an earlier deadline and runs at
once on waking (0.02 ms in the same measurement), with the same CPU share as before, only in
finer pieces. These threads' bursts are short, so the finer pieces cost nothing.
"""

from __future__ import annotations

import sys

#: The slice the request path's threads ask for, in ns.
SHORT_SLICE_NS = 100_000
#: ``sched_setattr`` flag: a thread's children start with the default scheduling attributes.
SCHED_FLAG_RESET_ON_FORK = 0x01


def ask_for_short_slice(ns: int = SHORT_SLICE_NS) -> bool:
    """Ask the kernel for a ``ns`` time slice for the calling thread; True if it took effect.

    Best effort: other kernels and platforms, and threads given another scheduling policy by
    their operator, keep what they have (False)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        import platform

        numbers = {"x86_64": (314, 315), "aarch64": (274, 275)}.get(platform.machine())
        if numbers is None:
            return False
        set_nr, get_nr = numbers

        class SchedAttr(ctypes.Structure):
            _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32),
                        ("sched_flags", ctypes.c_uint64), ("sched_nice", ctypes.c_int32),
                        ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
                        ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64),
                        ("sched_util_min", ctypes.c_uint32), ("sched_util_max", ctypes.c_uint32)]

        libc = ctypes.CDLL(None, use_errno=True)
        attr = SchedAttr()
        if libc.syscall(get_nr, 0, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0 or attr.sched_policy != 0:
            return False  # unknown, or not SCHED_OTHER (someone chose a policy for this thread: keep it)
        attr.size = ctypes.sizeof(attr)
        # Threads this one starts later (executor threads, an engine's compute threads) keep
        # the default: only the threads that asked run with the short slice.
        attr.sched_flags = SCHED_FLAG_RESET_ON_FORK
        attr.sched_runtime = ns
        if libc.syscall(set_nr, 0, ctypes.byref(attr), 0) != 0:
            return False  # refused by older kernels: nothing to do
        check = SchedAttr()
        got = libc.syscall(get_nr, 0, ctypes.byref(check), ctypes.sizeof(check), 0)
        return got == 0 and check.sched_runtime == ns
    except Exception:  # noqa: BLE001 - an optimisation only; the server works without it
        return False
