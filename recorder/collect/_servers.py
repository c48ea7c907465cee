"""Waiting for a model or agent server that went away, instead of failing the work meanwhile.

A model server that dies mid-record (killed, restarted, redeployed) refuses connections, drops
them, or answers 5xx for a while. If every rollout simply used up its retries, the run would turn
its whole remaining work into ``failed`` rows within seconds, for what was a restart. So each
server has a :class:`ServerGate`: after a transient failure, the rollout probes the server
(``GET /health``; any answer below 500 means it is there). If the server answers, the failure was
the rollout's own and counts as a retry. If not, the gate closes: every rollout that needs the
server waits at it, one watcher probes with bounded exponential backoff (0.25 s doubling to
5 s) and opens the gate when the server answers again; the waiting rollouts then run again
without using up a retry. A server that stays away longer than ``wait`` seconds is *gone*: the
gate keeps the reason and every remaining rollout that needs it is written as failed with it at
once (``gymtape record --resume --retry-failed`` runs them later).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Literal

import httpx

#: Seconds one probe may take (a hung server counts as away).
PROBE_TIMEOUT = 5.0
#: Longest pause between two probes while waiting.
MAX_PROBE_DELAY = 5.0

Verdict = Literal["up", "back", "gone"]


def server_root(url: str) -> str:
    """``http://host:port/v1`` -> ``http://host:port`` (where /health and /gymtape/* live)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class ServerGate:
    """One server's availability, shared by every rollout of a run that needs it.

    Args:
        url: the server's base URL as configured (model ``.../v1``, agent, gymtape serve).
        role: how messages name it (``model``, ``agent``).
        wait: seconds to wait for it to come back before it is gone (0: gone at once).
        say: where messages go (the CLI prints them).
    """

    def __init__(self, url: str, role: str, wait: float, say: Callable[[str], None]) -> None:
        self.url = url
        self.role = role
        self.wait = wait
        self.say = say
        #: Why the server is considered gone (it stayed away past ``wait``), else None.
        self.gone: str | None = None
        #: Seconds spent waiting for it, over the run.
        self.waited_s = 0.0
        self._open = asyncio.Event()
        self._open.set()
        self._watcher: asyncio.Task[None] | None = None

    async def probe(self, client: httpx.AsyncClient) -> str | None:
        """None when the server answers; else what went wrong."""
        try:
            r = await client.get(f"{server_root(self.url)}/health", timeout=PROBE_TIMEOUT)
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}".rstrip(": ")
        return None if r.status_code < 500 else f"GET /health answered {r.status_code}"

    async def after_failure(self, client: httpx.AsyncClient, error: str) -> Verdict:
        """Called after a transient failure of a request that needed this server.

        ``up``: the server answers (the failure counts as an attempt); ``back``: it was away and
        answers again (try again, the attempt does not count); ``gone``: it stayed away past
        ``wait`` (:attr:`gone` says why).
        """
        if self.gone is not None:
            return "gone"
        if self._open.is_set():
            if await self.probe(client) is None:
                return "up"
            if self._open.is_set() and self.gone is None:  # the first to notice starts the watch
                self._open.clear()
                self._watcher = asyncio.create_task(self._watch(client, error))
        await self._open.wait()
        return "gone" if self.gone is not None else "back"

    async def _watch(self, client: httpx.AsyncClient, error: str) -> None:
        t0 = time.monotonic()
        last = error[:300]
        self.say(f"{self.role} server {self.url} unreachable ({last}); waiting up to {self.wait:g} s for it to "
                 "come back")
        delay = 0.25
        try:
            while True:
                left = self.wait - (time.monotonic() - t0)
                if left <= 0:
                    self.gone = (f"{self.role} server {self.url} unreachable for {self.wait:g} s (last error: {last}); "
                                 "not run: gymtape record --resume --retry-failed runs it again")
                    self.say(f"{self.role} server {self.url} did not come back within {self.wait:g} s: the remaining "
                             "rollouts that need it are recorded as failed (gymtape record --resume --retry-failed "
                             "runs them again)")
                    return
                await asyncio.sleep(min(delay, left))
                delay = min(2 * delay, MAX_PROBE_DELAY)
                problem = await self.probe(client)
                if problem is None:
                    self.say(f"{self.role} server {self.url} is back after {time.monotonic() - t0:.1f} s; going on")
                    return
                last = problem
        finally:
            self.waited_s += time.monotonic() - t0
            self._open.set()
