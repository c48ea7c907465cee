"""`gymtape serve` against what NeMo Gym sends and reads, and against bad input (embedded hf engine)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import Server, start_gymtape_serve

API_KEY = "gym-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    s = start_gymtape_serve(tmp, "--engine", "hf", "--model", str(model_dir), "--api-key", API_KEY,
                            "--served-model-name", "policy", "--max-model-len", "512", "--tape", str(tmp / "tape"))
    yield s
    s.stop()


def _post(server: Server, path: str, body: Any, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers={**AUTH, "content-type": "application/json"},
                      timeout=120, **kw)


def gym_request(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The body Gym's vllm_model (vllm_model_for_training.yaml) sends upstream."""
    return {"model": "policy", "messages": messages, "tools": TOOLS, "temperature": 1.0, "top_p": 1.0,
            "max_tokens": 16, "logprobs": True, "top_logprobs": 0, "return_tokens_as_token_ids": True,
            "return_token_ids": True}


def test_gym_training_request_sequence_gets_every_field_gym_reads(server: Server) -> None:
    messages = [{"role": "developer", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    r = _post(server, "/v1/chat/completions", gym_request(messages))
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    msg = choice["message"]
    # 1. the three fields on the message
    assert all(isinstance(t, int) for t in msg["prompt_token_ids"] + msg["generation_token_ids"])
    assert len(msg["generation_log_probs"]) == len(msg["generation_token_ids"]) > 0
    assert all(lp <= 0 for lp in msg["generation_log_probs"])
    # 2. vLLM-style top-level prompt IDs and choice token IDs
    assert body["prompt_token_ids"] == msg["prompt_token_ids"] and choice["token_ids"] == msg["generation_token_ids"]
    # 3. logprobs.content with token_id:<id> tokens
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{t}" for t in msg["generation_token_ids"]]
    assert [c["logprob"] for c in content] == msg["generation_log_probs"]
    assert choice["finish_reason"] in ("stop", "length") and body["model"] == "policy"
    # /tokenize at the root, as Gym calls it, gives the chat endpoint's prompt for the same messages
    tok = _post(server, "/tokenize", {"model": "policy", "messages": messages, "tools": TOOLS}).json()
    assert tok["tokens"] == msg["prompt_token_ids"] and tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    # Second call: Gym echoes the assistant message with the three fields next to role/content/tool_calls
    echoed = {"role": "assistant", "content": msg["content"], "tool_calls": msg.get("tool_calls"),
              **{k: msg[k] for k in ("prompt_token_ids", "generation_token_ids", "generation_log_probs")}}
    messages2 = messages + [echoed, {"role": "user", "content": "Again."}]
    r2 = _post(server, "/v1/chat/completions", gym_request(messages2)).json()
    prefix = msg["prompt_token_ids"] + msg["generation_token_ids"]
    assert r2["prompt_token_ids"][: len(prefix)] == prefix
    assert _post(server, "/tokenize", {"model": "policy", "messages": messages2, "tools": TOOLS}).json()["tokens"] == \
        r2["prompt_token_ids"]
    assert r2["gymtape"]["rollout_id"] == body["gymtape"]["rollout_id"] and r2["gymtape"]["call_index"] == 1


def test_models_and_health(server: Server) -> None:
    models = httpx.get(f"{server.url}/v1/models", headers=AUTH).json()
    assert models["data"][0]["id"] == "policy"
    health = httpx.get(f"{server.url}/health").json()  # no key needed
    assert health["status"] == "ok" and health["engine"] == "hf"


def _assert_error(r: httpx.Response, status: int, *needles: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    for n in needles:
        assert n in err["message"], f"error message should name {n!r}: {err['message']}"


GOOD = [{"role": "user", "content": "hi"}]


def _assistant(**fields: Any) -> dict[str, Any]:
    base = {"role": "assistant", "content": "x", "prompt_token_ids": [1, 2], "generation_token_ids": [3],
            "generation_log_probs": [-0.5]}
    return {**base, **fields}


@pytest.mark.parametrize("body, status, needles", [
    (b"{not json", 400, ["not valid JSON"]),
    (b"[1, 2]", 400, ["JSON object"]),
    ({"model": "policy"}, 400, ["messages is required"]),
    ({"messages": []}, 400, ["non-empty"]),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, ["messages[0].role", "wizard"]),
    # found by schemathesis (tests/recorder/test_serve_fuzz.py): was a 500 (TypeError in templating)
    ({"messages": [{"role": "tool", "tool_calls": True}]}, 400, ["messages[0]", "only assistant messages carry tool_calls"]),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": True}]}, 400, ["tool_calls must be a list"]),
    ({"messages": [_assistant(generation_token_ids=[10**9])]}, 400, ["10000000", "vocabulary"]),
    ({"messages": [_assistant(generation_log_probs=[-0.5, -0.1])]}, 400, ["generation_token_ids has 1", "generation_log_probs has 2"]),
    ({"messages": [_assistant(prompt_token_ids=None)]}, 400, ["prompt_token_ids"]),
    ({"messages": GOOD, "n": 2}, 400, ["n must be 1"]),
    ({"messages": GOOD, "temperature": -1}, 400, ["temperature"]),
    ({"messages": GOOD, "max_tokens": 0}, 400, ["max_tokens"]),
    ({"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 4}, 400, ["maximum context length is 512"]),
    ({"messages": GOOD, "max_tokens": 600}, 400, ["maximum context length"]),
])
def test_bad_input_gets_openai_error_and_server_keeps_serving(server: Server, body: Any, status: int,
                                                              needles: list[str]) -> None:
    _assert_error(_post(server, "/v1/chat/completions", body), status, *needles)
    ok = _post(server, "/v1/chat/completions", {"messages": GOOD, "max_tokens": 2})
    assert ok.status_code == 200, "the server must keep serving after a bad request"


def test_missing_or_wrong_api_key_is_401(server: Server) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": GOOD}, headers={"Authorization": "Bearer no"})
    _assert_error(r, 401, "API key")
    _assert_error(httpx.get(f"{server.url}/v1/models"), 401, "API key")


def test_admin_weights_bumps_policy_version_stamped_on_calls(server: Server, model_dir: Path) -> None:
    before = httpx.get(f"{server.url}/health").json()["policy_version"]
    r = _post(server, "/admin/weights", {"path": str(model_dir), "version": before + 3})
    assert r.status_code == 200 and r.json()["policy_version"] == before + 3
    call = _post(server, "/v1/chat/completions", {"messages": GOOD, "max_tokens": 2}).json()
    assert call["gymtape"]["policy_version"] == before + 3
    _assert_error(_post(server, "/admin/weights", {"path": "/nonexistent"}), 400, "/nonexistent")
    assert httpx.post(f"{server.url}/admin/weights", json={"version": 1}).status_code == 401


class BrokenUpstream:
    """A deliberately broken 'vLLM': lists a model, then hangs or drops connections on completions."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            data = conn.recv(65536)
            if data.startswith(b"GET /v1/models") or data.startswith(b"GET /health"):
                body = json.dumps({"data": [{"id": "broken", "max_model_len": 512}]}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (len(body), body))
                conn.close()
            elif self.mode == "hang":
                self.held.append(conn)  # never answer
            else:
                conn.close()  # drop the connection

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.mark.parametrize("mode, status, needle", [("hang", 504, "did not answer"), ("drop", 502, "unreachable")])
def test_upstream_failures_map_to_clear_errors(model_dir: Path, tmp_path: Path, mode: str, status: int,
                                               needle: str) -> None:
    upstream = BrokenUpstream(mode)
    server = start_gymtape_serve(tmp_path, "--engine", "vllm", "--upstream", f"http://127.0.0.1:{upstream.port}",
                                 "--tokenizer", str(model_dir), "--upstream-timeout", "2")
    try:
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": GOOD, "max_tokens": 2}, timeout=60)
        _assert_error(r, status, needle)
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()
        upstream.close()


def test_upstream_down_entirely_is_502(model_dir: Path, tmp_path: Path) -> None:
    upstream = BrokenUpstream("drop")
    server = start_gymtape_serve(tmp_path, "--engine", "vllm", "--upstream", f"http://127.0.0.1:{upstream.port}",
                                 "--tokenizer", str(model_dir))
    upstream.close()  # now nothing listens there
    try:
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": GOOD, "max_tokens": 2}, timeout=60)
        _assert_error(r, 502, "unreachable")
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()




def test_identical_calls_in_concurrent_rollouts_continue_separate_rollouts() -> None:
    from recorder.serve._call_log import CallLog

    log = CallLog(None)
    a, b = log.assign(None), log.assign(None)
    for rid, _ in (a, b):  # greedy repeats: both rollouts produced the very same first call
        log.remember([1, 2], [3], rid, 0)
    first, second = log.assign(([1, 2], [3])), log.assign(([1, 2], [3]))
    assert {first[0], second[0]} == {a[0], b[0]} and first[1] == second[1] == 1
    assert log.assign(([1, 2], [3]))[0] == b[0], "a retry of the same continuation reuses the latest"
    assert log.assign(([9], [9]))[1] == 0, "unknown IDs start a new rollout"


# ---------------------------------------------------------------- range checks at the request boundary
# Every value that lands in a tape column is checked against that column's type when the request
# arrives: a 400 naming the field, never a 200 whose row then cannot be written.

INT32_MAX, INT64_MIN, INT64_MAX = 2**31 - 1, -(2**63), 2**63 - 1


def _recorded_call_ids(server: Server) -> set[str]:
    import polars as pl

    from recorder import Tape

    tape = server.log.parent / "tape"  # the module fixture's --tape, next to its log
    return set(Tape(tape).calls().select(pl.col("call_id")).collect()["call_id"])


def _assert_still_serving_and_recording(server: Server) -> None:
    ok = _post(server, "/v1/chat/completions", {"messages": GOOD, "max_tokens": 2, "seed": 7})
    assert ok.status_code == 200, f"a valid call after a refused one must be answered: {ok.text}"
    assert ok.json()["id"] in _recorded_call_ids(server), "an answered call must be on the tape"
    health = httpx.get(f"{server.url}/health").json()
    assert health["recording"]["errors"] == 0 and health["recording"]["ok"], health


def _chat(**fields: Any) -> dict[str, Any]:
    return {"messages": GOOD, "max_tokens": 2, **fields}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", _chat(seed=INT64_MAX + 1), "seed"),
    ("/v1/chat/completions", _chat(seed=INT64_MIN - 1), "seed"),
    ("/v1/chat/completions", _chat(seed=2**64), "seed"),  # beyond 64 bits: JSON parsers turn it into a float
    ("/v1/chat/completions", _chat(seed=1.5), "seed"),
    ("/v1/chat/completions", _chat(top_k=INT32_MAX + 1), "top_k"),
    ("/v1/chat/completions", _chat(top_k=-2), "top_k"),
    ("/v1/chat/completions", _chat(max_tokens=INT32_MAX + 1), "max_tokens"),
    ("/v1/chat/completions", _chat(max_completion_tokens=INT32_MAX + 1), "max_completion_tokens"),
    ("/v1/chat/completions", _chat(max_completion_tokens=2, max_tokens=INT64_MAX + 1), "max_tokens"),
    ("/v1/chat/completions", _chat(n=True), "n"),
    ("/v1/chat/completions", _chat(temperature=101), "temperature"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}',
     "temperature"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -1e400}', "top_p"),
    ("/v1/chat/completions", _chat(logprobs=2), "logprobs"),
    ("/v1/chat/completions", _chat(top_logprobs=INT64_MAX + 1), "top_logprobs"),
    ("/v1/chat/completions", _chat(stop_token_ids=[INT32_MAX + 1]), "stop_token_ids"),
    ("/v1/chat/completions", {"messages": [_assistant(generation_token_ids=[2**31])]},
     "messages[0].generation_token_ids"),
    ("/v1/chat/completions", {"messages": [_assistant(prompt_token_ids=[1, -1])]}, "messages[0].prompt_token_ids"),
    ("/v1/chat/completions", {"messages": [_assistant(prompt_token_ids=[1, True])]}, "messages[0].prompt_token_ids"),
    ("/v1/chat/completions", {"messages": [_assistant(generation_log_probs=[-1e39])]},
     "messages[0].generation_log_probs"),
    ("/v1/chat/completions", b'{"messages": [{"role": "assistant", "content": "x", "prompt_token_ids": [1], '
     b'"generation_token_ids": [3], "generation_log_probs": [-1e400]}]}', "messages[0].generation_log_probs"),
    ("/admin/weights", {"version": INT64_MAX + 1}, "version"),
    ("/admin/weights", {"version": 2**64}, "version"),
    ("/admin/weights", {"version": -1}, "version"),
])
def test_out_of_range_value_is_400_naming_the_field_and_later_calls_are_recorded(
        server: Server, path: str, body: Any, param: str) -> None:
    r = _post(server, path, body)
    _assert_error(r, 400, param)
    assert r.json()["error"]["param"].startswith(param)  # an element of a list is named by its index
    _assert_still_serving_and_recording(server)


def test_policy_version_at_int64_max_is_recorded_and_never_bumped_past(server: Server) -> None:
    before = httpx.get(f"{server.url}/health").json()["policy_version"]
    try:
        assert _post(server, "/admin/weights", {"version": INT64_MAX}).json()["policy_version"] == INT64_MAX
        call = _post(server, "/v1/chat/completions", _chat(seed=INT64_MIN, top_k=INT32_MAX)).json()
        assert call["gymtape"]["policy_version"] == INT64_MAX
        import polars as pl

        from recorder import Tape

        row = Tape(server.log.parent / "tape").calls().filter(pl.col("call_id") == call["id"]).collect().row(
            0, named=True)
        assert (row["policy_version"], row["seed"], row["top_k"]) == (INT64_MAX, INT64_MIN, INT32_MAX)
        # a bump without a version would overflow the column: refused before any weights are loaded
        _assert_error(_post(server, "/admin/weights", {"path": str(server.log.parent)}), 400, "cannot be bumped")
        assert httpx.get(f"{server.url}/health").json()["policy_version"] == INT64_MAX
    finally:
        assert _post(server, "/admin/weights", {"version": before}).status_code == 200
    _assert_still_serving_and_recording(server)


# (field, lowest accepted, highest accepted, tape column type or None when the field is not stored)
INT_FIELDS = [
    ("seed", INT64_MIN, INT64_MAX, "int64"),
    ("top_k", -1, INT32_MAX, "int32"),
    ("max_tokens", 1, INT32_MAX, "int32"),
    ("max_completion_tokens", 1, INT32_MAX, "int32"),
    ("top_logprobs", 0, 0, None),  # 1..20 are valid OpenAI but unsupported here: also a 400 naming it
    ("n", 1, 1, None),
]


def _near_limits(lo: int, hi: int) -> Any:
    from hypothesis import strategies as st

    return st.one_of(st.integers(lo - 3, lo + 3), st.integers(hi - 3, hi + 3), st.integers(-(2**70), 2**70))


def test_integer_fields_accept_exactly_what_fits_their_tape_column() -> None:
    import pyarrow as pa
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from recorder.serve._openai import APIError, parse_chat

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(INT_FIELDS).flatmap(lambda f: st.tuples(st.just(f), _near_limits(f[1], f[2]))))
    def check(case: tuple[tuple[str, int, int, str | None], int]) -> None:
        (name, lo, hi, column), value = case
        try:
            req = parse_chat({"messages": GOOD, name: value}, vocab_size=1000)
        except APIError as e:
            assert not lo <= value <= hi, f"{name}={value} is in range but was refused: {e}"
            assert e.param == name and name in str(e) and e.status == 400
            return
        assert lo <= value <= hi, f"{name}={value} does not fit but was accepted"
        stored = {"seed": req.seed, "top_k": req.top_k, "max_tokens": req.max_tokens,
                  "max_completion_tokens": req.max_tokens}.get(name)
        if column is not None:
            assert stored == value
            assert pa.array([stored], type=getattr(pa, column)()).to_pylist() == [value]

    check()


def test_out_of_range_integers_near_the_limits_are_refused_by_the_server(server: Server) -> None:
    """The same property over HTTP (only refusals: each is answered before any generation)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    fields = INT_FIELDS + [("version", 0, INT64_MAX, "int64")]

    @settings(max_examples=60, deadline=None)
    @given(st.sampled_from(fields).flatmap(
        lambda f: st.tuples(st.just(f), _near_limits(f[1], f[2]).filter(lambda v: not f[1] <= v <= f[2]))))
    def check(case: tuple[tuple[str, int, int, str | None], int]) -> None:
        (name, _, _, _), value = case
        path, body = ("/admin/weights", {"version": value}) if name == "version" else \
            ("/v1/chat/completions", _chat(**{name: value}))
        r = _post(server, path, body)
        _assert_error(r, 400, name)
        assert r.json()["error"]["param"] == name

    check()
    _assert_still_serving_and_recording(server)
