"""A local OpenAI-compatible server for tests and benchmarks.

``POST /v1/chat/completions`` (plain JSON, or SSE with ``stream: true``) and
``POST /v1/embeddings``, on a free loopback port, in a background thread. Tests steer
it (``mode``: ok | fail | garbage | hang; ``delay`` before the first byte;
``chunk_delay`` between streamed chunks) and read what it was asked (``calls``).
Each request runs on its own thread, so slow answers overlap as they would upstream.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.fake_http import LoopbackServer, port_of, serve, shutdown


@dataclass
class Call:
    path: str
    model: str
    stream: bool
    messages: list[dict[str, Any]]
    at: float
    temperature: float | None = None
    max_tokens: int | None = None


@dataclass
class FakeOpenAI:
    mode: str = "ok"  # ok | fail | garbage | hang
    delay: float = 0.0
    chunk_delay: float = 0.0
    reply: str = ""  # fixed answer text; default: names the model
    calls: list[Call] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: LoopbackServer | None = None
    _release: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return port_of(self._server)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, port: int = 0) -> FakeOpenAI:
        fake = self

        class Handler(_Handler):
            server_state = fake

        self._server = serve(Handler, port)
        return self

    def stop(self) -> None:
        """Stop listening: from now on, connections are refused."""
        self._release.set()
        shutdown(self._server)

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.mode, self.delay, self.chunk_delay, self.reply = "ok", 0.0, 0.0, ""
            self.max_in_flight = self.in_flight

    def chat_calls(self) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.path.endswith("/chat/completions")]

    def answer_for(self, model: str, messages: list[dict[str, Any]]) -> str:
        if self.reply:
            return self.reply
        return f"[{model}] Thanks for asking. Here is what I found for you."


class _Handler(BaseHTTPRequestHandler):
    server_state: FakeOpenAI
    protocol_version = "HTTP/1.0"  # one request per connection: no framing to get wrong

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        fake = self.server_state
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._json(400, {"error": {"message": "bad JSON"}})
            return
        with fake._lock:
            fake.calls.append(
                Call(
                    self.path,
                    str(body.get("model", "")),
                    bool(body.get("stream")),
                    list(body.get("messages", [])),
                    time.monotonic(),
                    body.get("temperature"),
                    body.get("max_tokens"),
                )
            )
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            mode, delay, chunk_delay = fake.mode, fake.delay, fake.chunk_delay
        try:
            if mode == "hang":
                fake._release.wait(60)
                return
            if delay:
                time.sleep(delay)
            if mode == "fail":
                self._json(503, {"error": {"message": "upstream overloaded"}})
            elif self.path.endswith("/embeddings"):
                self._embeddings(body, mode)
            elif self.path.endswith("/chat/completions"):
                self._chat(body, mode, chunk_delay)
            else:
                self._json(404, {"error": {"message": "no such route"}})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): fine
        finally:
            with fake._lock:
                fake.in_flight -= 1

    def _json(self, status: int, data: Any) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _chat(self, body: dict[str, Any], mode: str, chunk_delay: float) -> None:
        model = str(body.get("model", ""))
        messages = list(body.get("messages", []))
        text = self.server_state.answer_for(model, messages)
        prompt_tokens = sum(len(str(m.get("content", ""))) // 4 + 1 for m in messages)
        words = [w + " " for w in text.split(" ")]
        words[-1] = words[-1].rstrip()
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        if mode == "garbage":
            if body.get("stream"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                self.wfile.write(b"data: {this is not json\n\ndata: [DONE]\n\n")
            else:
                payload = b"<html>502 bad gateway, but with status 200</html>"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            return
        created = int(time.time())
        if not body.get("stream"):
            self._json(
                200,
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def event(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()

        event([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
        for word in words:
            if chunk_delay:
                time.sleep(chunk_delay)
            event([{"index": 0, "delta": {"content": word}, "finish_reason": None}])
        event([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        if (body.get("stream_options") or {}).get("include_usage"):
            event([], usage=usage)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _embeddings(self, body: dict[str, Any], mode: str) -> None:
        inputs = body.get("input", [])
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        data = []
        for i, text in enumerate(inputs):
            vector = [0.0] * 16
            for ch in str(text):
                vector[ord(ch) % 16] += 1.0
            data.append({"object": "embedding", "index": i, "embedding": vector})
        self._json(
            200,
            {
                "object": "list",
                "data": data,
                "model": body.get("model", ""),
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
            },
        )


@contextmanager
def running(port: int = 0) -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI().start(port)
    try:
        yield fake
    finally:
        fake.stop()
