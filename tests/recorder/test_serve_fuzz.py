"""Schemathesis over every route of a real `gymtape serve --engine hf` on 127.0.0.1: requests
generated from the server's own OpenAPI schema, both fitting it (positive) and breaking it
(negative). The property: no answer is a server error (5xx), and every 4xx carries an
OpenAI-style error body. A 5xx here is a bug, to be fixed with a test of its own.

Bounded: a fixed number of examples per route, derandomized (the same requests every run, so
a failure reproduces), a small context so that generating completions stays cheap.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tests.servers import Server, start_gymtape_serve

pytestmark = pytest.mark.slow

API_KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
#: Examples per POST route and mode. A completion without max_tokens runs to the end of the
#: (small) context, up to a second or two on two busy CPU cores; everything else takes milliseconds.
EXAMPLES = {("POST /v1/chat/completions", "positive"): 20, ("POST /v1/chat/completions", "negative"): 25}
DEFAULT_EXAMPLES = 40


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz")
    s = start_gymtape_serve(tmp, "--engine", "hf", "--model", str(model_dir), "--api-key", API_KEY, "--openapi",
                            "--max-model-len", "48", "--tape", str(tmp / "tape"))
    yield s
    s.stop()


def assert_openai_error(status: int, content: bytes, what: str) -> None:
    """An error answer is JSON ``{"error": {"message": str, "type": str, "param": str|None, "code": str|None}}``."""
    try:
        body = json.loads(content)
    except ValueError:
        raise AssertionError(f"{what}: {status} with a body that is not JSON: {content[:300]!r}") from None
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict), f"{what}: {status} without an OpenAI-style error object: {body!r}"
    assert set(error) >= {"message", "type", "param", "code"}, f"{what}: error fields missing: {error!r}"
    assert isinstance(error["message"], str) and error["message"], f"{what}: no message: {error!r}"
    assert isinstance(error["type"], str), f"{what}: type is not a string: {error!r}"
    assert error["param"] is None or isinstance(error["param"], str), f"{what}: param: {error!r}"
    assert error["code"] is None or isinstance(error["code"], str), f"{what}: code: {error!r}"


def test_the_schema_is_served_behind_the_key_and_lists_every_route(server: Server) -> None:
    assert httpx.get(f"{server.url}/openapi.json").status_code == 401
    for page in ("/docs", "/redoc"):
        r = httpx.get(f"{server.url}{page}")
        assert r.status_code == 401, r.text
        assert_openai_error(r.status_code, r.content, page)
        assert httpx.get(f"{server.url}{page}", headers=AUTH).status_code == 200
    paths = httpx.get(f"{server.url}/openapi.json", headers=AUTH).json()["paths"]
    assert set(paths) == {"/v1/chat/completions", "/tokenize", "/v1/tokenize", "/v1/models", "/health",
                          "/gymtape/lookup", "/admin/weights"}


def test_no_generated_request_gets_a_server_error_or_an_error_without_an_openai_body(server: Server) -> None:
    schema = schemathesis.openapi.from_dict(httpx.get(f"{server.url}/openapi.json", headers=AUTH).json())
    seen: dict[str, dict[int, int]] = {}

    def check(case: Any, what: str) -> None:
        r = case.call(base_url=server.url, headers=AUTH, timeout=120)
        seen.setdefault(what, {})
        seen[what][r.status_code] = seen[what].get(r.status_code, 0) + 1
        sent = repr(case.body)[:300]
        assert r.status_code < 500, f"{what}: {r.status_code} for {sent}: {r.content[:500]!r}\n{server.log_tail()}"
        if r.status_code >= 400:
            assert_openai_error(r.status_code, r.content, f"{what} with {sent}")
        else:
            assert isinstance(r.json(), dict), f"{what}: a {r.status_code} that is not a JSON object"

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 7
    for op in operations:
        name = f"{op.method.upper()} {op.path}"
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
        for mode in modes:
            examples = EXAMPLES.get((name, mode.value), DEFAULT_EXAMPLES) if op.method.upper() == "POST" else 3

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate, Phase.shrink],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                check(case, f"{name} ({mode.value})")

            run()
    # every route of the schema, under every method it does not declare (405), and each POST
    # route's body sent as another media type (415): refused with the same error body
    document = httpx.get(f"{server.url}/openapi.json", headers=AUTH).json()
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        for path, declared in document["paths"].items():
            for method in {"GET", "POST", "PUT", "PATCH", "DELETE"} - {m.upper() for m in declared}:
                r = client.request(method, path, json={})
                assert r.status_code == 405, (method, path, r.status_code, r.text)
                assert_openai_error(r.status_code, r.content, f"{method} {path}")
            if "post" in declared:
                for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
                    r = client.post(path, content=b'{"messages": [], "calls": []}',
                                    headers={"content-type": media} if media else {})
                    assert r.status_code == 415, (path, media, r.status_code, r.text)
                    assert_openai_error(r.status_code, r.content, f"POST {path} as {media}")
    # the run reached the routes' real work, not only their validation
    assert seen["POST /v1/chat/completions (positive)"].get(200, 0) >= 1, seen
    assert seen["POST /tokenize (positive)"].get(200, 0) >= 1, seen
    assert seen["POST /gymtape/lookup (positive)"].get(200, 0) >= 1, seen
    assert httpx.get(f"{server.url}/health").status_code == 200
