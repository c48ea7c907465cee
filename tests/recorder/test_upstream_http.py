"""The lean upstream HTTP/1.1 client (`engines/_http.py`) against real loopback servers.

Each server is a real asyncio TCP server that answers with scripted bytes, so the framings
a vLLM (uvicorn) or a proxy in front of it may use are all exercised on real sockets:
Content-Length, chunked (split into single bytes on the wire), until-close, gzip, interim
100 responses, keep-alive reuse, a keep-alive connection the server closed under us, and
servers that hang or refuse. The engine-level behaviour against a real vLLM is in
test_serve_onpolicy.py.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from recorder.serve.engines._http import HTTPClient, HTTPConnectionError, HTTPTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return lines[0], headers, body


def _response(body: bytes, *, status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


def _chunked(body: bytes, parts: int = 3) -> bytes:
    step = max(1, len(body) // parts)
    out = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    for i in range(0, len(body), step):
        piece = body[i:i + step]
        out += f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n"
    return out + b"0\r\nx-trailer: 1\r\n\r\n"


def run_with_server(handler: Handler, client_test: Callable[[HTTPClient, dict[str, Any]], Awaitable[None]],
                    **client_kw: Any) -> dict[str, Any]:
    """Start a loopback server whose connection ``n`` (0-based) is served by ``handler``, run the test."""
    stats: dict[str, Any] = {"connections": 0, "requests": []}

    async def main() -> None:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            n = stats["connections"]
            stats["connections"] += 1
            try:
                await handler(reader, writer, n)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = HTTPClient("127.0.0.1", port, headers={"Authorization": "Bearer k"}, **client_kw)
        try:
            await client_test(client, stats)
        finally:
            await client.aclose()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    return stats


def echo_handler(frame: Callable[[bytes], bytes], *, byte_by_byte: bool = False) -> Handler:
    """Answers every request on the connection with its own body echoed back inside JSON."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await _read_request(reader)) is not None:
            line, headers, body = req
            answer = frame(orjson.dumps({"line": line, "auth": headers.get("authorization"), "echo": body.decode(),
                                         "connection": n}))
            if byte_by_byte:
                for i in range(len(answer)):
                    writer.write(answer[i:i + 1])
                    await writer.drain()
            else:
                writer.write(answer)
                await writer.drain()
    return handle


@pytest.mark.parametrize("frame, byte_by_byte", [
    (_response, False),
    (_response, True),
    (_chunked, False),
    (_chunked, True),
    (lambda b: b"HTTP/1.1 100 Continue\r\n\r\n" + _response(b), True),
], ids=["content-length", "content-length-bytewise", "chunked", "chunked-bytewise", "interim-100"])
def test_framings_are_parsed_and_the_connection_is_kept_alive(frame: Callable[[bytes], bytes],
                                                              byte_by_byte: bool) -> None:
    async def check(client: HTTPClient, stats: dict[str, Any]) -> None:
        for i in range(3):
            r = await client.request("POST", "/prefix/v1/completions", b'{"i": %d}' % i)
            assert r.status == 200
            got = orjson.loads(r.content)
            assert got["line"] == "POST /prefix/v1/completions HTTP/1.1" and got["auth"] == "Bearer k"
            assert got["echo"] == '{"i": %d}' % i and got["connection"] == 0, "one keep-alive connection"
        r = await client.request("GET", "/v1/models")
        assert orjson.loads(r.content)["line"] == "GET /v1/models HTTP/1.1"

    stats = run_with_server(echo_handler(frame, byte_by_byte=byte_by_byte), check)
    assert stats["connections"] == 1


def test_concurrent_requests_each_get_their_own_answer() -> None:
    async def slow_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await _read_request(reader)) is not None:
            i = orjson.loads(req[2])["i"]
            await asyncio.sleep((i % 5) / 1000)
            writer.write(_response(orjson.dumps({"i": i})))
            await writer.drain()

    async def check(client: HTTPClient, stats: dict[str, Any]) -> None:
        rs = await asyncio.gather(*(client.request("POST", "/x", orjson.dumps({"i": i})) for i in range(40)))
        assert [orjson.loads(r.content)["i"] for r in rs] == list(range(40))
        assert stats["connections"] <= 8, "at most max_connections connections"

    run_with_server(slow_echo, check, max_connections=8)


def test_connection_close_and_until_close_bodies_are_not_reused() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if await _read_request(reader) is None:
            return
        if n == 0:
            writer.write(_response(b'{"n": 0}', extra="connection: close\r\n"))
        else:  # HTTP/1.0 style: no length, the body ends when the connection does
            writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n" + b'{"n": %d}' % n)
        await writer.drain()

    async def check(client: HTTPClient, stats: dict[str, Any]) -> None:
        for i in range(3):
            assert orjson.loads((await client.request("GET", "/")).content) == {"n": i}

    assert run_with_server(handle, check)["connections"] == 3


def test_gzip_body_is_decoded() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await _read_request(reader) is not None:
            writer.write(_response(gzip.compress(b'{"ok": true}'), extra="content-encoding: gzip\r\n"))
            await writer.drain()

    async def check(client: HTTPClient, stats: dict[str, Any]) -> None:
        assert orjson.loads((await client.request("GET", "/")).content) == {"ok": True}

    run_with_server(handle, check)


def test_a_keep_alive_connection_closed_under_the_client_is_retried_once_on_a_fresh_one() -> None:
    """The server takes the second request on the first connection and closes without answering
    (its keep-alive timeout fired as the request arrived): the client resends it, once."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        served = 0
        while (req := await _read_request(reader)) is not None:
            if n == 0 and served == 1:
                return  # close without a byte of answer
            served += 1
            writer.write(_response(req[2]))
            await writer.drain()

    async def check(client: HTTPClient, stats: dict[str, Any]) -> None:
        assert (await client.request("POST", "/", b"1")).content == b"1"
        assert (await client.request("POST", "/", b"2")).content == b"2"
        assert (await client.request("POST", "/", b"3")).content == b"3"

    assert run_with_server(handle, check)["connections"] == 2


def test_a_fresh_connection_dropped_without_answer_is_an_error_not_retried() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)

    async def check(client: HTTPClient, stats: dict[str, Any]) -> None:
        with pytest.raises(HTTPConnectionError, match="closed"):
            await client.request("POST", "/", b"{}")

    assert run_with_server(drop, check)["connections"] == 1


def test_an_answer_cut_short_is_an_error() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)
        writer.write(_response(b'{"long": "body"}')[:-5])
        await writer.drain()

    async def check(client: HTTPClient, stats: dict[str, Any]) -> None:
        with pytest.raises(HTTPConnectionError):
            await client.request("GET", "/")

    run_with_server(cut, check)


def test_a_server_that_never_answers_times_out_and_the_client_recovers() -> None:
    async def hang_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await _read_request(reader)) is not None:
            if n == 0:
                await reader.read()  # never answer; wait for the client to give up
                return
            writer.write(_response(req[2]))
            await writer.drain()

    async def check(client: HTTPClient, stats: dict[str, Any]) -> None:
        with pytest.raises(HTTPTimeout):
            await client.request("POST", "/", b"1")
        assert (await client.request("POST", "/", b"2")).content == b"2", "a timed-out connection is dropped"

    assert run_with_server(hang_first, check, timeout=0.3)["connections"] == 2


def test_nothing_listening_is_a_connection_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there

    async def main() -> None:
        client = HTTPClient("127.0.0.1", port)
        with pytest.raises(HTTPConnectionError, match="ConnectionRefused"):
            await client.request("GET", "/")
        await client.aclose()

    asyncio.run(main())


def test_vllm_engine_uses_the_lean_client_for_plain_http_and_httpx_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from recorder.serve.engines._vllm import VLLMEngine

    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    e = VLLMEngine("http://127.0.0.1:8000/gw/v1")
    assert e._lean is not None and e._client is None and e._prefix == "/gw"
    assert VLLMEngine("https://vllm.example:443")._client is not None, "https stays on httpx"
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert VLLMEngine("http://10.0.0.5:8000")._client is not None, "a proxied upstream stays on httpx"
    monkeypatch.setenv("NO_PROXY", "10.0.0.5")
    assert VLLMEngine("http://10.0.0.5:8000")._lean is not None


def test_vllm_engine_over_the_lean_client_maps_answers_and_errors() -> None:
    """Engine level, against a scripted vLLM: the request body it sends, what it makes of the answer,
    and how upstream errors become EngineErrors (vLLM's own message kept)."""
    from recorder.serve.engines._protocol import EngineError, SamplingParams
    from recorder.serve.engines._vllm import VLLMEngine

    sent: list[dict[str, Any]] = []
    answers = [
        _response(orjson.dumps({"data": [{"id": "smol", "max_model_len": 2048}]})),
        _response(orjson.dumps({"choices": [{"token_ids": [5, 2], "finish_reason": "stop",
                                             "logprobs": {"token_logprobs": [-0.25, -1.5]}}]})),
        _response(orjson.dumps({"error": {"message": "seed out of range"}}), status="400 Bad Request"),
        _response(b"Internal Server Error", status="500 Internal Server Error"),
        _response(b"<html>not json</html>"),
        _response(orjson.dumps({"choices": [{"token_ids": [5], "logprobs": {"token_logprobs": []}}]})),
    ]

    async def vllm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await _read_request(reader)) is not None:
            if req[2]:
                sent.append(orjson.loads(req[2]))
            writer.write(answers.pop(0))
            await writer.drain()

    async def check(client: HTTPClient, stats: dict[str, Any]) -> None:
        engine = VLLMEngine(f"http://{client.host}:{client.port}/v1", model="smol")
        try:
            await engine.start()
            assert engine.max_model_len == 2048
            params = SamplingParams(max_tokens=4, top_k=0, seed=-5, stop_token_ids=(2,))
            gen = await engine.generate([1, 2, 3], params)
            assert (gen.token_ids, gen.logprobs, gen.finish_reason) == ([5, 2], [-0.25, -1.5], "stop")
            assert sent[-1] == {"model": "smol", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 1.0,
                                "top_p": 1.0, "top_k": -1, "logprobs": 0, "return_token_ids": True,
                                "skip_special_tokens": False, "seed": -5, "stop_token_ids": [2]}
            for status, needle in ((400, "vLLM answered 400: seed out of range"),
                                   (502, "vLLM answered 500: Internal Server Error"),
                                   (502, "answered non-JSON"),
                                   (502, "1 token IDs but 0 logprobs")):
                with pytest.raises(EngineError) as e:
                    await engine.generate([1], params)
                assert e.value.status == status and needle in str(e.value)
        finally:
            await engine.aclose()
        assert stats["connections"] == 1, "every call on one keep-alive connection"

    run_with_server(vllm, check)
