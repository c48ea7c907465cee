"""`gymtape serve` against hostile and careless requests (issue 13): it cannot be stalled by one
request, cannot be driven cross-site, and answers every bad input with an OpenAI-style 4xx.

One real server (embedded hf engine, no API key: the default set-up) for the HTTP tests; the
front door's origin rule and the last-resort error handler are also checked in-process.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from recorder import ServeConfig
from recorder.serve._guard import RequestGuard
from tests.conftest import wait_until
from tests.recorder.test_serve_fuzz import assert_openai_error
from tests.servers import Server, start_gymtape_serve

JSON = {"content-type": "application/json"}
HELLO = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, "temperature": 0.0}


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hardening")
    s = start_gymtape_serve(tmp, "--engine", "hf", "--model", str(model_dir), "--max-model-len", "512",
                            "--max-requests-in-flight", "1")
    yield s
    s.stop()


def _post(server: Server, path: str, body: Any, headers: dict[str, str] | None = None,
          timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, headers={**JSON, **(headers or {})}, timeout=timeout)


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert_openai_error(r.status_code, r.content, f"{r.request.method} {r.request.url.path}")
    return r.json()["error"]


def _policy_version(server: Server) -> int:
    return httpx.get(f"{server.url}/health").json()["policy_version"]


def _health_while(server: Server, action: Callable[[], Any], samples_wanted: int = 150) -> tuple[list[Any], list[float]]:
    """Run ``action`` again and again while another client times GET /health back to back, until
    ``samples_wanted`` /health requests have run during it (enough for a p99 that is not just the
    worst sample); returns what each action returned and the latency of every /health request
    that overlapped them."""
    samples: list[tuple[float, float]] = []  # (sent at, seconds)
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                assert client.get(f"{server.url}/health").status_code == 200
                samples.append((t0, time.perf_counter() - t0))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    results = []
    try:
        wait_until(lambda: len(samples) >= 5, what="/health polling to start")  # connection warm
        began = time.perf_counter()
        while not results or sum(t0 >= began for t0, _ in samples) < samples_wanted:
            results.append(action())
        ended = time.perf_counter()
    finally:
        stop.set()
        poller.join(30)
    return results, [s for t0, s in samples if t0 <= ended and t0 + s >= began]


def _p99(latencies: list[float]) -> float:
    """Nearest-rank 99th percentile."""
    ordered = sorted(latencies)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


# ---------------------------------------------------------------- "the server can be stalled by one request"

def _post_raw(server: Server, path: str, body: Iterable[bytes], *,
              length: int | None) -> tuple[httpx.Response, float]:
    """POST on a bare socket, reading the answer while the body is still being sent (as curl does);
    returns it with how soon it came, then finishes sending the body (the server must drain it).
    ``length`` None sends the body chunked."""
    host, port = server.url.removeprefix("http://").split(":")
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    sock = socket.create_connection((host, int(port)), timeout=30)

    def upload() -> None:
        try:
            sock.sendall(head.encode())
            for piece in body:
                sock.sendall(piece if length is not None else b"%x\r\n%s\r\n" % (len(piece), piece))
            if length is None:
                sock.sendall(b"0\r\n\r\n")
        except OSError:  # the test closed the socket once it had its answer
            pass

    uploader = threading.Thread(target=upload, daemon=True)
    began = time.perf_counter()
    uploader.start()
    try:
        def read(data: bytes) -> bytes:
            more = sock.recv(65536)
            if not more:
                raise ConnectionError(f"the server closed the connection after {data[:300]!r}")
            return data + more

        data = b""
        while b"\r\n\r\n" not in data:
            data = read(data)
        head_bytes, rest = data.split(b"\r\n\r\n", 1)
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        size = int({k.lower(): v for k, v in headers.items()}["content-length"])
        while len(rest) < size:
            rest = read(rest)
        answered = time.perf_counter() - began
        uploader.join(60)  # the rest of the body: discarded by the server, never parsed
    finally:
        sock.close()
        uploader.join(30)
    request = httpx.Request("POST", f"{server.url}{path}")
    return httpx.Response(int(lines[0].split()[1]), headers=headers, content=rest[:size], request=request), answered


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_40_mb_body_is_413_within_a_second_while_health_answers_in_milliseconds(server: Server, chunked: bool) -> None:
    """With a Content-Length the 413 comes before a byte of the body is read; a chunked body is
    counted as it arrives and refused once it passes the limit (32 MiB read, never 40 MB)."""
    size = 40 * 10**6
    piece = b"x" * 2**16
    body = [piece] * (size // len(piece))
    answers, latencies = _health_while(server, lambda: _post_raw(
        server, "/v1/chat/completions", body, length=None if chunked else size))
    for r, took in answers:
        error = _error(r, 413)
        assert error["code"] == "request_too_large" and str(32 * 2**20) in error["message"]
        assert took < 1.0, f"413 took {took:.2f} s"
    assert _p99(latencies) < 0.1, f"/health p99 {_p99(latencies) * 1000:.0f} ms during the uploads: {latencies}"
    assert httpx.get(f"{server.url}/v1/models").status_code == 200  # and the server serves on


def test_a_prompt_that_cannot_fit_the_context_is_refused_from_its_length_without_stalling(server: Server) -> None:
    """2 MB of text, far under the size limit: refused from its length alone (templating and
    tokenizing it would take seconds of CPU), while /health keeps answering."""
    body = json.dumps({"messages": [{"role": "user", "content": "hello world, this is a test. " * 70_000}]}).encode()
    answers, latencies = _health_while(server, lambda: _post_raw(
        server, "/v1/chat/completions", [body], length=len(body)))
    for r, took in answers:
        error = _error(r, 400)
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert "512 tokens" in error["message"], error
        assert took < 1.0, f"the refusal took {took:.2f} s"
    assert _p99(latencies) < 0.1, f"/health p99 {_p99(latencies) * 1000:.0f} ms: {latencies}"
    # /tokenize too: a prompt string that cannot fit is refused before it is tokenized
    r = _post(server, "/tokenize", {"prompt": "word " * 2_000_000}, timeout=30)  # 10 MB
    assert _error(r, 400)["code"] == "context_length_exceeded"


def test_token_ids_longer_than_the_context_are_refused_before_templating(server: Server) -> None:
    echoed = {"role": "assistant", "content": "hi", "prompt_token_ids": [1] * 400, "generation_token_ids": [2] * 200,
              "generation_log_probs": [-0.5] * 200}
    r = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, echoed,
                                                            {"role": "user", "content": "b"}]})
    error = _error(r, 400)
    assert error["code"] == "context_length_exceeded" and "600 token IDs" in error["message"], error


def test_requests_past_the_in_flight_bound_get_429_with_retry_after_and_health_still_answers(server: Server) -> None:
    """The server runs with --max-requests-in-flight 1; a request whose body is still arriving holds the slot."""
    release = threading.Event()
    done: list[httpx.Response] = []

    def slow_body() -> Iterator[bytes]:
        yield b'{"prompt": '
        release.wait(60)
        yield b'"hello"}'

    held = threading.Thread(target=lambda: done.append(httpx.post(
        f"{server.url}/tokenize", content=slow_body(), headers=JSON, timeout=60)))
    held.start()
    try:
        wait_until(lambda: httpx.get(f"{server.url}/health").json()["in_flight"] == 1,
                   what="the held request to be in flight")
        r = httpx.get(f"{server.url}/v1/models")
        error = _error(r, 429)
        assert r.headers["retry-after"] == "1" and error["code"] == "too_many_requests"
        assert "--max-requests-in-flight 1" in error["message"]
        assert httpx.get(f"{server.url}/health").status_code == 200  # the probe is not counted
    finally:
        release.set()
        held.join(60)
    assert done and done[0].status_code == 200 and done[0].json()["count"] >= 1, done
    assert httpx.get(f"{server.url}/v1/models").status_code == 200  # the slot is free again
    assert httpx.get(f"{server.url}/health").json()["in_flight"] == 0


# ---------------------------------------------------------------- "cross-site requests are accepted"

@pytest.mark.parametrize("path", ["/admin/weights", "/v1/chat/completions"])
def test_a_cross_site_text_plain_post_is_refused_and_the_policy_version_is_unchanged(server: Server, path: str) -> None:
    before = _policy_version(server)
    body = json.dumps({"version": before + 7, **HELLO}).encode()
    r = httpx.post(f"{server.url}{path}", content=body, timeout=60,
                   headers={"content-type": "text/plain", "origin": "http://evil.example"})
    assert _error(r, 403)["code"] == "cross_origin_refused"
    # the same body with no Origin (a local process): still refused, for its type
    r = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "text/plain"}, timeout=60)
    assert _error(r, 415)["code"] == "unsupported_media_type"
    # a cross-site page cannot send JSON either (it would need a preflight, and the Origin is refused)
    r = httpx.post(f"{server.url}{path}", content=body, timeout=60,
                   headers={**JSON, "origin": f"http://evil.example:{server.url.rsplit(':', 1)[1]}"})
    assert _error(r, 403)["code"] == "cross_origin_refused"
    assert _policy_version(server) == before


def test_json_with_a_charset_and_the_servers_own_origin_are_accepted(server: Server) -> None:
    port = server.url.rsplit(":", 1)[1]
    before = _policy_version(server)
    r = _post(server, "/admin/weights", {"version": before + 1},
              headers={"content-type": "application/json; charset=utf-8", "origin": f"http://127.0.0.1:{port}"})
    assert r.status_code == 200 and r.json()["policy_version"] == before + 1, r.text
    r = _post(server, "/admin/weights", {"version": before}, headers={"origin": f"http://localhost:{port}"})
    assert r.status_code == 200 and _policy_version(server) == before, r.text
    r = _post(server, "/admin/weights", {"version": before}, headers={"content-type": "application/json; charset=latin-1"})
    assert _error(r, 415)["code"] == "unsupported_media_type"


@pytest.mark.parametrize("page", ["/docs", "/redoc", "/openapi.json"])
def test_the_framework_docs_are_off_by_default(server: Server, page: str) -> None:
    assert _error(httpx.get(f"{server.url}{page}"), 404)["code"] == "not_found"


@pytest.mark.parametrize(("origin", "allowed"), [
    ("http://127.0.0.1:8000", True), ("http://localhost:8000", True), ("http://[::1]:8000", True),
    ("http://LOCALHOST:8000/", True), ("http://127.0.0.1:8001", False), ("https://127.0.0.1:8000", False),
    ("http://evil.example:8000", False), ("null", False), ("http://ui.example:3000", True),
    ("http://ui.example:3001", False), ("file://", False)])
def test_only_the_servers_own_origin_loopback_and_allowed_origins_pass(origin: str, allowed: bool) -> None:
    guard = RequestGuard(lambda *a: None, max_request_bytes=1, max_requests_in_flight=1,  # type: ignore[arg-type]
                         allow_origin=("http://ui.example:3000",))
    scope = {"type": "http", "scheme": "http", "server": ("127.0.0.1", 8000)}
    assert guard.origin_allowed(origin, scope) is allowed


def test_a_server_bound_to_every_interface_accepts_its_own_address_and_star_allows_any() -> None:
    guard = RequestGuard(lambda *a: None, max_request_bytes=1, max_requests_in_flight=1,  # type: ignore[arg-type]
                         bound_host="0.0.0.0")
    scope = {"type": "http", "scheme": "http", "server": ("10.1.2.3", 8000)}
    assert guard.origin_allowed("http://10.1.2.3:8000", scope) and not guard.origin_allowed("http://10.1.2.4:8000", scope)
    anyone = RequestGuard(lambda *a: None, max_request_bytes=1, max_requests_in_flight=1,  # type: ignore[arg-type]
                          allow_origin=("*",))
    assert anyone.origin_allowed("http://evil.example", scope)


# ---------------------------------------------------------------- "unhandled 500s with plain-text bodies"

@pytest.mark.parametrize("ids", ["abc", [2**40], [[1, 2], [3]], {"a": 1}, [1.5], [True], [-1]],
                         ids=["string", "2**40", "nested", "object", "float", "bool", "negative"])
@pytest.mark.parametrize("field", ["prompt_token_ids", "generation_token_ids"])
def test_lookup_with_bad_token_ids_is_a_400_naming_the_field(server: Server, ids: Any, field: str) -> None:
    call = {"prompt_token_ids": [1, 2], "generation_token_ids": [3], field: ids}
    r = _post(server, "/gymtape/lookup", {"calls": [{"prompt_token_ids": [1], "generation_token_ids": [2]}, call]})
    assert _error(r, 400)["param"] == f"calls[1].{field}"


def test_lookup_with_a_call_that_is_not_an_object_is_a_400_naming_it(server: Server) -> None:
    assert _error(_post(server, "/gymtape/lookup", {"calls": [[1, 2]]}), 400)["param"] == "calls[0]"
    assert _post(server, "/gymtape/lookup", {"calls": [{"prompt_token_ids": [1], "generation_token_ids": [2]}]}
                 ).json() == {"calls": [None], "recording": False}


@pytest.mark.parametrize(("index", "says"), [
    ("{not json", "not a readable JSON index"),
    ('{"weight_map": ["model.safetensors"]}', "weight_map must be an object"),
    ('{"weight_map": {"a": 1}}', "weight_map must be an object"),
    ("[1]", "weight_map must be an object"),
    (b"\xff\xfe", "not a readable JSON index"),
], ids=["invalid-json", "list", "non-string-file", "not-an-object", "not-utf8"])
def test_a_broken_checkpoint_index_is_a_400(server: Server, tmp_path: Path, index: str | bytes, says: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_bytes(index if isinstance(index, bytes) else index.encode())
    before = _policy_version(server)
    error = _error(_post(server, "/admin/weights", {"path": str(tmp_path)}), 400)
    assert says in error["message"] and "model.safetensors.index.json" in error["message"], error
    assert _policy_version(server) == before


def test_an_index_pointing_outside_the_checkpoint_is_refused_before_the_file_is_opened(
        server: Server, model_dir: Path, tmp_path: Path) -> None:
    """The outside file holds the model's real weights: were it opened, the load would succeed."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "model.safetensors").symlink_to(model_dir / "model.safetensors")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    before = _policy_version(server)
    for name in ("../outside/model.safetensors", str(tmp_path / "outside" / "model.safetensors"),
                 "sub/../../outside/model.safetensors"):
        (checkpoint / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"model.embed_tokens.weight": name}}))
        error = _error(_post(server, "/admin/weights", {"path": str(checkpoint)}), 400)
        assert f"names the file {name!r}, which is outside the checkpoint directory" in error["message"], error
    # a linked directory inside the checkpoint is a way out too
    (checkpoint / "linked").symlink_to(tmp_path / "outside")
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "linked/model.safetensors"}}))
    assert "outside the checkpoint directory" in _error(_post(server, "/admin/weights", {"path": str(checkpoint)}),
                                                        400)["message"]
    assert _policy_version(server) == before


def test_an_index_naming_a_file_of_the_checkpoint_loads_even_when_that_file_is_a_link(
        server: Server, model_dir: Path, tmp_path: Path) -> None:
    """The Hugging Face cache layout: each file of a snapshot folder is a link to its blob."""
    (tmp_path / "model.safetensors").symlink_to(model_dir / "model.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model.safetensors"}}))
    before = _policy_version(server)
    r = _post(server, "/admin/weights", {"path": str(tmp_path)}, timeout=300)
    assert r.status_code == 200 and r.json()["policy_version"] == before + 1, r.text


@pytest.mark.parametrize("path", ["", "a\u0000b", "a" * 5000, "/definitely/not/here"])
def test_an_unusable_weights_path_is_a_400(server: Server, path: str) -> None:
    assert _error(_post(server, "/admin/weights", {"path": path}), 400)["param"] == "path"


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/nope", 404, "not_found"), ("POST", "/v1/completions", 404, "not_found"),
    ("GET", "/v1/chat/completions", 405, "method_not_allowed"), ("DELETE", "/health", 405, "method_not_allowed"),
    ("PUT", "/admin/weights", 405, "method_not_allowed")])
def test_404_and_405_are_openai_style(server: Server, method: str, path: str, status: int, code: str) -> None:
    r = httpx.request(method, f"{server.url}{path}")
    assert _error(r, status)["code"] == code
    if status == 405:
        assert r.headers["allow"]


@pytest.mark.parametrize("value", ["no", "false", 0, 1, [], {}])
def test_tokenize_add_special_tokens_must_be_a_boolean(server: Server, value: Any) -> None:
    r = _post(server, "/tokenize", {"prompt": "hi", "add_special_tokens": value})
    assert _error(r, 400)["param"] == "add_special_tokens"
    yes, no = (_post(server, "/tokenize", {"prompt": "hi", "add_special_tokens": v}) for v in (True, False))
    assert yes.status_code == no.status_code == 200, (yes.text, no.text)
    assert yes.json()["tokens"] == _post(server, "/tokenize", {"prompt": "hi"}).json()["tokens"]


@pytest.mark.parametrize("field", ["add_generation_prompt", "return_tokens_as_token_ids"])
def test_other_boolean_fields_refuse_strings_too(server: Server, field: str) -> None:
    path = "/tokenize" if field == "add_generation_prompt" else "/v1/chat/completions"
    assert _error(_post(server, path, {**HELLO, field: "no"}), 400)["param"] == field


def test_an_unexpected_exception_is_still_an_openai_style_500() -> None:
    """The last-resort handler, driven by a real bug: the app used before its lifespan started it."""
    from fastapi.testclient import TestClient

    from recorder.serve._server import create_app

    client = TestClient(create_app(ServeConfig()), raise_server_exceptions=False)  # no `with`: no lifespan
    r = client.post("/v1/chat/completions", json=HELLO)
    assert r.status_code == 500
    assert_openai_error(r.status_code, r.content, "500")
    assert r.json()["error"]["code"] == "internal_error" and "KeyError" in r.json()["error"]["message"]
    # the front door answers without the app: size, type and origin refusals are JSON too
    assert client.post("/v1/chat/completions", content=b"x" * 64, headers={"content-length": str(2**30)}
                       ).status_code == 413
    assert client.post("/admin/weights", json={}, headers={"origin": "http://evil.example"}).status_code == 403


def test_the_guard_passes_other_scopes_through() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    guard = RequestGuard(app, max_request_bytes=1, max_requests_in_flight=1)  # type: ignore[arg-type]
    asyncio.run(guard({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert seen == ["lifespan"]


def test_an_answer_that_cannot_be_built_is_a_500_its_row_still_settles_and_the_server_goes_on(
        model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The row is handed to the committer before the answer is built (so building overlaps the
    fsync). If building fails, the commit is still awaited (the call is recorded, as when a
    client hangs up after its call was committed), the client gets an OpenAI-style 500, and the
    next call is answered and recorded."""
    from fastapi.testclient import TestClient

    from recorder import Tape
    from recorder.serve._server import GymtapeServer, create_app

    real = GymtapeServer._answer
    failures = iter([RuntimeError("answer building failed")])

    def flaky(self: GymtapeServer, *args: Any) -> bytes:
        error = next(failures, None)
        if error is not None:
            raise error
        return real(self, *args)

    monkeypatch.setattr(GymtapeServer, "_answer", flaky)
    config = ServeConfig(model=str(model_dir), max_model_len=512, tape=tmp_path / "tape")
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        r = client.post("/v1/chat/completions", json=HELLO)
        assert r.status_code == 500, r.text
        assert_openai_error(r.status_code, r.content, "chat")
        assert r.json()["error"]["code"] == "internal_error" and "RuntimeError" in r.json()["error"]["message"]
        ok = client.post("/v1/chat/completions", json=HELLO)
        assert ok.status_code == 200, ok.text
        health = client.get("/health").json()["recording"]
        assert health["errors"] == 0 and health["ok"] is True and health["recorded"] == 2
    calls = Tape(tmp_path / "tape").read("calls", ["call_id", "rollout_id"])
    assert calls.num_rows == 2  # the failed answer's call was committed; the next one too
    assert ok.json()["id"] in calls["call_id"].to_pylist()
