"""A lean HTTP/1.1 keep-alive client for the engine's upstream calls (asyncio protocols, no httpx).

Why not httpx: on the request path of `gymtape serve --engine vllm`, one httpx call to vLLM
costs ~1 ms of CPU (client, transport, httpcore pool, anyio, h11: each layer re-checks and
re-wraps the same request), the largest part of what gymtape adds to a call. This client does
one thing: POST/GET a complete body to one plain-HTTP origin over pooled keep-alive
connections, and read back a complete response (Content-Length, chunked, or until close).
It writes each request in one ``write`` and parses the response with bytes operations in
``data_received``, so a call costs a few tens of microseconds of Python.

What it leaves to httpx (the caller picks): https, proxies from the environment, streaming.
A pooled connection the server closed while idle is detected by its EOF; a request that
fails on a reused connection before any response byte arrives is sent once more on a fresh
one (the server closed it under us: keep-alive race), as HTTP clients conventionally do.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

#: Longest response head (status line + headers) accepted.
_MAX_HEAD = 64 * 1024


class HTTPTimeout(Exception):
    """No (complete) answer within the time allowed."""


class HTTPConnectionError(Exception):
    """The connection could not be made, or broke before the response was complete."""


@dataclass(frozen=True)
class HTTPResponse:
    status: int
    headers: dict[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class _Connection(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time as its bytes arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self._buf = bytearray()
        self._waiter: asyncio.Future[HTTPResponse] | None = None
        self._head: tuple[int, dict[str, str]] | None = None
        self._length = -1  # body bytes expected; -1: chunked; -2: until the server closes
        self._chunks: list[bytes] = []  # decoded chunks so far (chunked bodies)
        self.received = False  # any byte of the current response arrived

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        self._buf += data
        if self._waiter is not None:
            self._parse()
        elif data:  # bytes nobody asked for: the connection is out of step, never reuse it
            self.abort()

    def eof_received(self) -> bool:
        self.closed = True
        if self._waiter is not None and self._head is not None and self._length == -2:
            self._finish(bytes(self._buf))
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self._waiter
        if w is not None and not w.done():
            if self._head is not None and self._length == -2:
                self._finish(bytes(self._buf))
            else:
                why = f"{type(exc).__name__}: {exc}" if exc else "the server closed the connection"
                w.set_exception(HTTPConnectionError(why))

    # -- one exchange
    def send(self, request: bytes, waiter: asyncio.Future[HTTPResponse]) -> None:
        self._waiter = waiter
        self._head = None
        self._chunks = []
        self.received = bool(self._buf)
        assert self.transport is not None
        self.transport.write(request)
        if self._buf:
            self._parse()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, why: str) -> None:
        self.abort()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(HTTPConnectionError(why))

    def _finish(self, body: bytes) -> None:
        status, headers = self._head  # type: ignore[misc]
        enc = headers.get("content-encoding")
        if enc in ("gzip", "deflate"):
            try:
                body = zlib.decompress(body, 47)  # 47: zlib or gzip header, detected
            except zlib.error as e:
                self._fail(f"undecodable {enc} body: {e}")
                return
        waiter, self._waiter = self._waiter, None
        self._head = None
        if waiter is not None and not waiter.done():
            waiter.set_result(HTTPResponse(status, headers, body))

    def _parse(self) -> None:
        buf = self._buf
        while self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._fail(f"response head longer than {_MAX_HEAD} bytes")
                return
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            del buf[: end + 4]
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                self._fail(f"not an HTTP/1.x response: {lines[0][:100]!r}")
                return
            status = int(parts[1])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    self._fail(f"malformed response header {line[:100]!r}")
                    return
                headers[name.strip().lower()] = value.strip()
            if 100 <= status < 200:  # interim (100 Continue, ...): the real response follows
                continue
            self._head = (status, headers)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._length = -1
            elif "content-length" in headers:
                try:
                    self._length = int(headers["content-length"])
                except ValueError:
                    self._fail(f"bad Content-Length {headers['content-length']!r}")
                    return
            elif status in (204, 304):
                self._length = 0
            else:
                self._length = -2
            if parts[0] == "HTTP/1.0" or self._length == -2:
                headers.setdefault("connection", "close")
        if self._length >= 0:
            if len(buf) >= self._length:
                body = bytes(buf[: self._length])
                del buf[: self._length]
                self._finish(body)
        elif self._length == -1:
            self._parse_chunks()

    def _parse_chunks(self) -> None:
        buf = self._buf
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                return
            size_text = bytes(buf[:eol]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                self._fail(f"bad chunk size {size_text[:20]!r}")
                return
            if size == 0:  # last chunk, then optional trailers, then an empty line
                end = buf.find(b"\r\n\r\n", eol)
                if end < 0:
                    return
                del buf[: end + 4]
                self._finish(b"".join(self._chunks))
                return
            if len(buf) < eol + 2 + size + 2:
                return
            self._chunks.append(bytes(buf[eol + 2: eol + 2 + size]))
            del buf[: eol + 2 + size + 2]


class HTTPClient:
    """Pooled keep-alive HTTP/1.1 to one ``http://host:port`` origin (requests may carry a path prefix)."""

    def __init__(self, host: str, port: int, *, headers: Mapping[str, str] | None = None, timeout: float = 600.0,
                 connect_timeout: float = 10.0, max_connections: int = 256) -> None:
        self.host, self.port = host, port
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        authority = host if port == 80 else f"{host}:{port}"
        if ":" in host and not host.startswith("["):  # an IPv6 literal
            authority = f"[{host}]" if port == 80 else f"[{host}]:{port}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        #: Every request's fixed headers, encoded once.
        self._fixed = f"Host: {authority}\r\nAccept: */*\r\nUser-Agent: gymtape\r\n{extra}".encode("latin-1")
        self._closed = False

    async def request(self, method: str, path: str, body: bytes | None = None,
                      content_type: str = "application/json") -> HTTPResponse:
        head = f"{method} {path} HTTP/1.1\r\n".encode("latin-1") + self._fixed
        if body is not None:
            head += b"Content-Type: " + content_type.encode("latin-1") + b"\r\nContent-Length: " + \
                str(len(body)).encode() + b"\r\n\r\n"
            message = head + body
        else:
            message = head + b"\r\n"
        async with self._slots:
            conn = await self._connection()
            try:
                return await self._exchange(conn, message)
            except HTTPConnectionError:
                if not (conn.reused and not conn.received):
                    raise
            # a reused connection the server had closed under us: once more on a fresh one
            return await self._exchange(await self._connect(), message)

    async def _exchange(self, conn: _Connection, message: bytes) -> HTTPResponse:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[HTTPResponse] = loop.create_future()
        timer = loop.call_later(self._timeout, _expire, waiter)
        try:
            conn.send(message, waiter)
            response = await waiter
        except BaseException:  # timeout, cancellation, broken connection: its state is unknown
            conn.abort()
            raise
        finally:
            timer.cancel()
        if conn.closed or self._closed or response.headers.get("connection", "").lower() == "close":
            conn.abort()
        else:
            conn.reused = True
            self._idle.append(conn)
        return response

    async def _connection(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: least likely to have timed out
            if not conn.closed:
                return conn
        return await self._connect()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(_Connection, self.host, self.port),
                                             self._connect_timeout)
        except asyncio.TimeoutError:
            raise HTTPTimeout(f"connecting to {self.host}:{self.port} took over {self._connect_timeout:g} s") from None
        except OSError as e:
            raise HTTPConnectionError(f"{type(e).__name__}: {e}") from e
        return conn

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().abort()


def _expire(waiter: asyncio.Future[HTTPResponse]) -> None:
    if not waiter.done():
        waiter.set_exception(HTTPTimeout("no complete answer in time"))
