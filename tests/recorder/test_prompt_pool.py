"""The prompt pool (gymtape serve's off-loop workers): results and exceptions reach the caller,
a failing job does not stop its worker, and work still queued at shutdown is cancelled, not run."""

from __future__ import annotations

import asyncio
import threading

import pytest

from recorder.serve._server import PromptPool


def test_results_and_exceptions_reach_the_caller_and_workers_survive() -> None:
    pool = PromptPool(2, "test-prompt")

    def boom(x: int) -> int:
        raise ValueError(f"bad {x}")

    async def main() -> None:
        assert await pool.run(lambda a, b: a + b, 2, 3) == 5
        for i in range(5):  # more failures than workers: none of them dies
            with pytest.raises(ValueError, match=f"bad {i}"):
                await pool.run(boom, i)
        assert await asyncio.gather(*(pool.run(lambda i=i: i * i) for i in range(20))) == [i * i for i in range(20)]
        assert {await pool.run(lambda: threading.current_thread().name) for _ in range(10)} <= {
            "test-prompt_0", "test-prompt_1"}

    try:
        asyncio.run(main())
    finally:
        pool.shutdown()


def test_shutdown_cancels_queued_work() -> None:
    pool = PromptPool(1, "test-prompt")
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def block() -> None:
        started.set()
        release.wait(30)

    async def main() -> None:
        first = asyncio.ensure_future(pool.run(block))
        queued = asyncio.ensure_future(pool.run(ran.append, 1))
        await asyncio.to_thread(started.wait, 30)
        pool.shutdown()
        release.set()
        await first  # what was running finishes
        with pytest.raises(asyncio.CancelledError):
            await queued
        with pytest.raises(RuntimeError, match="shut down"):
            await pool.run(ran.append, 2)

    asyncio.run(main())
    assert ran == []
