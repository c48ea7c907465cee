"""The server's front door: checks that cost nothing and run before any route reads a byte.

Why a pure ASGI middleware (not Starlette's ``BaseHTTPMiddleware``): it must see the request
before the body is read and count the body as it arrives, without buffering it or running the
app in another task. Every refusal is an OpenAI-style JSON error, like every route's.

In order:

1. **Origin.** A browser page on another site may POST to a loopback server (a "simple"
   request needs no CORS preflight), and the default set-up has no key. A request carrying an
   ``Origin`` that is not the server's own (its bound host, or loopback, on its port) nor
   allowed by ``--allow-origin`` is refused 403. The port and bound host come from the
   listening socket, never from the ``Host`` header (which a DNS-rebinding page controls).
   Clients that are not browsers (Gym, httpx, curl) send no ``Origin`` and are not affected.
2. **In-flight bound.** Past ``max_requests_in_flight`` concurrent requests (``/health`` not
   counted, so it keeps answering), 429 with ``Retry-After``: a flood gets a fast refusal
   instead of queueing without bound.
3. **Body size.** A ``Content-Length`` over ``max_request_bytes`` is 413 before the app runs; a
   body without one (chunked) is counted as it arrives and is 413 the moment it passes the
   limit, so at most the limit is ever buffered. The unread rest is discarded by the HTTP
   server (uvicorn skips the body of an answered request), so the client reads the 413.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from ._config import normalize_origin
from ._openai import APIError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Host names that always mean this machine's loopback.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
#: Bound addresses that are every interface: the own-origin check falls back to the socket's address.
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
#: Paths outside the in-flight bound: the liveness probe must answer while the server is busy.
UNBOUNDED_PATHS = frozenset({"/health"})
#: Seconds a client refused for load is told to wait.
RETRY_AFTER_S = 1


class InFlight:
    """How many requests the guard is letting through now; shared with /health, which reports it."""

    def __init__(self) -> None:
        self.count = 0


def too_large(limit: int, size: int | None = None) -> APIError:
    got = f"of {size} bytes " if size is not None else ""
    return APIError(f"the request body {got}exceeds this server's limit of {limit} bytes "
                    "(gymtape serve --max-request-bytes)", status=413, code="request_too_large")


async def send_error(send: Send, error: APIError, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer ``error`` as an OpenAI-style JSON response."""
    body = orjson.dumps(error.body())
    await send({"type": "http.response.start", "status": error.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Origin check, in-flight bound and body-size limit in front of the app (see the module doc)."""

    def __init__(self, app: ASGIApp, *, max_request_bytes: int, max_requests_in_flight: int,
                 allow_origin: tuple[str, ...] = (), bound_host: str = "127.0.0.1",
                 load: InFlight | None = None) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.max_requests_in_flight = max_requests_in_flight
        self.any_origin = "*" in allow_origin
        self.allowed = {o for o in map(normalize_origin, allow_origin) if o is not None}
        host = bound_host.strip("[]").lower()
        self.own_hosts = LOOPBACK_HOSTS | ({host} if host not in _WILDCARD_HOSTS else set())
        #: Requests being handled now (not counting /health); read by /health.
        self.load = load if load is not None else InFlight()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = length = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"content-length":
                length = value
        if origin is not None and not self.origin_allowed(origin, scope):
            await send_error(send, APIError(
                f"cross-origin request from {origin!r} refused: this server answers its own origin and loopback "
                "only; allow a browser origin with gymtape serve --allow-origin", status=403,
                type="permission_error", code="cross_origin_refused"))
            return
        bounded = scope["path"] not in UNBOUNDED_PATHS
        if bounded and self.load.count >= self.max_requests_in_flight:
            await send_error(send, APIError(
                f"the server is handling {self.load.count} requests, its limit (gymtape serve "
                f"--max-requests-in-flight {self.max_requests_in_flight}); retry after {RETRY_AFTER_S} s",
                status=429, type="rate_limit_error", code="too_many_requests"),
                headers=[(b"retry-after", str(RETRY_AFTER_S).encode())])
            return
        if length is not None:
            try:
                size = int(length)
            except ValueError:  # the HTTP server rejects most of these first
                size = None
            if size is not None and size > self.max_request_bytes:
                await send_error(send, too_large(self.max_request_bytes, size))
                return
        if bounded:
            self.load.count += 1
        try:
            await self.app(scope, self._counting(receive), send)
        finally:
            if bounded:
                self.load.count -= 1

    def _counting(self, receive: Receive) -> Receive:
        """``receive``, refusing the body (413, through the app's APIError handler) once it passes the limit."""
        limit = self.max_request_bytes
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(limit)
            return message

        return counted

    def origin_allowed(self, origin: str, scope: Scope) -> bool:
        """The server's own origin (bound host or loopback, on its port) or an allowed one."""
        if self.any_origin:
            return True
        parsed = normalize_origin(origin)
        if parsed is None:  # "null" (sandboxed frames, file://) and anything else unparsable
            return False
        if parsed in self.allowed:
            return True
        server = scope.get("server")
        if not server or parsed[2] != server[1] or parsed[0] != scope.get("scheme", "http"):
            return False
        return parsed[1] in self.own_hosts or parsed[1] == str(server[0]).lower()
