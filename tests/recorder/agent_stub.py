"""A minimal HTTP agent server for the recorder's waiting tests: ``python -m tests.recorder.agent_stub PORT``.

Speaks the two routes `gymtape record` uses of a Gym agent server: ``GET /health`` and
``POST /run`` (answers a Gym rollout line with one model call's token fields, reward 1). It
stands in for an agent only where what matters is whether a server answers at all; the real
model path is tested against `gymtape serve` (test_record_server_death.py).
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(200 if self.path == "/health" else 404, {"status": "ok"})

    def do_POST(self) -> None:  # noqa: N802
        task = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        item = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "4", "annotations": []}],
                "prompt_token_ids": [1, 2, 3], "generation_token_ids": [4, 5], "generation_log_probs": [-0.1, -0.2]}
        self._answer(200, {**task, "response": {"id": "resp_1", "object": "response", "output": [item],
                                                "status": "completed"}, "reward": 1.0})

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
