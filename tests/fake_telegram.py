"""A local server speaking the Telegram Bot API call kefu makes
(``POST /bot<token>/sendMessage``), on a loopback port in a background thread.

Tests register bots (``tokens``), read what was sent (``sent``) and steer failures:
``fail_next`` calls answer HTTP ``fail_with`` (429 carries ``retry_after``).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.fake_http import LoopbackServer, port_of, serve, shutdown


@dataclass
class Sent:
    token: str
    chat_id: int | str
    text: str


@dataclass
class FakeTelegram:
    tokens: set[str] = field(default_factory=set)
    sent: list[Sent] = field(default_factory=list)
    calls: int = 0
    fail_next: int = 0
    fail_with: int = 500
    retry_after: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: LoopbackServer | None = None

    @property
    def port(self) -> int:
        return port_of(self._server)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> FakeTelegram:
        fake = self

        class Handler(_Handler):
            state = fake

        self._server = serve(Handler, port)
        return self

    def stop(self) -> None:
        shutdown(self._server)

    def sent_to(self, chat_id: int | str) -> list[Sent]:
        with self._lock:
            return [s for s in self.sent if str(s.chat_id) == str(chat_id)]


class _Handler(BaseHTTPRequestHandler):
    state: FakeTelegram
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, data: Any) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:
        fake = self.state
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        prefix, _, method = self.path.lstrip("/").partition("/")
        token = prefix[3:] if prefix.startswith("bot") else ""
        with fake._lock:
            fake.calls += 1
            if token not in fake.tokens:
                self._json(401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
                return
            if method != "sendMessage":
                self._json(404, {"ok": False, "error_code": 404, "description": "Not Found"})
                return
            if fake.fail_next > 0:
                fake.fail_next -= 1
                error: dict[str, Any] = {"ok": False, "error_code": fake.fail_with}
                if fake.fail_with == 429:
                    error["parameters"] = {"retry_after": fake.retry_after}
                self._json(fake.fail_with, error)
                return
            try:
                body = json.loads(raw)
                chat_id, text = body["chat_id"], str(body["text"])
            except (ValueError, KeyError, TypeError):
                self._json(400, {"ok": False, "error_code": 400, "description": "Bad Request"})
                return
            if not text:
                self._json(400, {"ok": False, "error_code": 400, "description": "text is empty"})
                return
            fake.sent.append(Sent(token, chat_id, text))
            message_id = len(fake.sent)
        self._json(200, {"ok": True, "result": {"message_id": message_id, "text": text}})
