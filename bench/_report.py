"""Shared output of the benchmarks: one `bench <name>: <value> <unit> (target <op> <bound>) ok|SHORT` line per target."""

from __future__ import annotations

import operator
import os
import platform
import time
from collections.abc import Callable

_OPS = {">=": operator.ge, "<=": operator.le}


_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine() -> str:
    cpus = _CORES
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()} {model or platform.processor()}, {cpus} cores, Python {platform.python_version()}"


def target(name: str, value: float, unit: str, op: str, bound: float) -> bool:
    ok = _OPS[op](value, bound)
    print(f"bench {name}: {value:.4g} {unit} (target {op} {bound:g}) {'ok' if ok else 'SHORT'}", flush=True)
    return ok


def best_of(runs: int, fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    """Fastest of ``runs`` timed calls: the least disturbed by other work on a shared machine.

    ``clock=time.process_time`` times CPU (user + system) instead of wall time: what load from
    other processes inflates least, for targets stated per core."""
    return best_of_each(runs, [fn], clock)[0]


def best_of_each(runs: int, fns: list[Callable[[], object]], clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """:func:`best_of` for several contenders taking turns within each round, so a slow spell on
    a shared machine hits all of them alike instead of whichever happened to run during it."""
    best = [float("inf")] * len(fns)
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t0 = clock()
            fn()
            best[i] = min(best[i], clock() - t0)
    return best


def pin_to_one_core() -> None:
    """Benchmarks that promise 'per core' run on one core, with pools of one thread."""
    os.environ.setdefault("POLARS_MAX_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
