"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for the judge tests (stdlib only).

It reads the reference (Assistant 1) and the response (Assistant 2) out of the LLaVA-Bench prompt and
answers ``"<ref> <model>\\n<explanation>"`` with :func:`rule_scores`: the reference gets a fixed
:data:`REF_SCORE`, the response ``round(10 × recall of the reference's words)`` clipped to 1..10, so a
response that keeps the reference's words wins and a degraded one loses. ``faults`` (a callable of
(prompt, attempt number of that prompt)) injects failures: ``"429"``, ``"500"``, ``"timeout"`` (sleeps past
the client's timeout), ``"malformed"`` (an answer without scores) or None (answer normally). A 429 or 500
carries ``retry-after-ms: <retry_after_ms>``, which the ``openai`` client honours instead of its own backoff
(0.5 s, 1 s, ...): the tests' retries wait milliseconds.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REF_SCORE = 8
MODEL = "judge-test-1"
API_KEY = "sk-test"
_BLOCK = re.compile(
    r"\[Assistant 1\]\n(.*?)\n\n\[End of Assistant 1\].*?\[Assistant 2\]\n(.*?)\n\n\[End of", re.S
)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def rule_scores(reference: str, response: str) -> tuple[int, int]:
    """(reference score, response score) of the server's rule."""
    ref = words(reference)
    recall = len(ref & words(response)) / len(ref) if ref else 0.0
    return REF_SCORE, min(10, max(1, round(10 * recall)))


def split_prompt(prompt: str) -> tuple[str, str]:
    m = _BLOCK.search(prompt)
    if m is None:
        raise ValueError("not a LLaVA-Bench judge prompt")
    return m.group(1), m.group(2)


class JudgeServer:
    """``with JudgeServer() as s: s.url`` -> ``http://127.0.0.1:<port>/v1``; ``s.calls`` counts chat calls."""

    def __init__(
        self,
        *,
        model: str = MODEL,
        api_key: str = API_KEY,
        faults: Callable[[str, int], str | None] | None = None,
        usage: bool = True,
        list_models: bool = True,
        sleep: float = 2.0,
        retry_after_ms: int = 10,
    ) -> None:
        self.model, self.api_key, self.faults = model, api_key, faults
        self.usage, self.list_models, self.sleep = usage, list_models, sleep
        self.retry_after = {"retry-after-ms": str(retry_after_ms)}
        self.calls = 0
        self.attempts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
                self._send(status, {"error": {"message": message, "type": "test", "code": status}}, headers)

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._error(401, "invalid api key")
                    return False
                return True

            def do_GET(self) -> None:
                if not self._authorised():
                    return
                if self.path.rstrip("/").endswith("/models") and server.list_models:
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._error(404, "no such route")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self._authorised():
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._error(404, "no such route")
                    return
                if body.get("model") != server.model:
                    self._error(404, f"model {body.get('model')!r} does not exist")
                    return
                prompt = body["messages"][-1]["content"]
                with server.lock:
                    server.calls += 1
                    server.attempts[prompt] += 1
                    attempt = server.attempts[prompt]
                fault = server.faults(prompt, attempt) if server.faults else None
                if fault == "429":
                    self._error(429, "rate limited", server.retry_after)
                    return
                if fault == "500":
                    self._error(500, "server error", server.retry_after)
                    return
                if fault == "timeout":
                    time.sleep(server.sleep)
                try:
                    reference, response = split_prompt(prompt)
                    ref, model = rule_scores(reference, response)
                    text = f"{ref} {model}\nThe second assistant recalls the reference's words."
                except ValueError:
                    text = "1"
                if fault == "malformed":
                    text = "Both answers are fine, I cannot decide."
                reply: dict[str, Any] = {
                    "id": f"chatcmpl-{server.calls}",
                    "object": "chat.completion",
                    "created": 0,
                    "model": server.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                }
                if server.usage:
                    n_in, n_out = len(prompt.split()), len(text.split())
                    reply["usage"] = {
                        "prompt_tokens": n_in,
                        "completion_tokens": n_out,
                        "total_tokens": n_in + n_out,
                    }
                try:
                    self._send(200, reply)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

        return Handler
