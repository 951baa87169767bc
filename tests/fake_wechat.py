"""A local server speaking the WeChat API calls kefu makes: ``GET /cgi-bin/token`` and
``POST /cgi-bin/message/custom/send``, on a loopback port in a background thread.

Tests register apps (``apps``: app id -> secret), read what was sent (``sent``) and
steer failures: ``fail_next`` calls of custom/send answer ``fail_with`` (an HTTP status
>= 300, or a WeChat errcode with HTTP 200); ``revoke_tokens()`` makes every issued
token invalid (errcode 40001), as when another process fetched a new one.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fake_http import LoopbackServer, port_of, serve, shutdown


@dataclass
class Sent:
    app_id: str
    touser: str
    text: str
    body: dict[str, Any]


@dataclass
class FakeWeChat:
    apps: dict[str, str] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)
    token_calls: int = 0
    send_calls: int = 0
    fail_next: int = 0
    fail_with: int = -1  # errcode -1: system busy (retryable); 500: HTTP error
    expires_in: int = 7200
    _tokens: dict[str, str] = field(default_factory=dict)  # token -> app id
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: LoopbackServer | None = None

    @property
    def port(self) -> int:
        return port_of(self._server)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> FakeWeChat:
        fake = self

        class Handler(_Handler):
            state = fake

        self._server = serve(Handler, port)
        return self

    def stop(self) -> None:
        shutdown(self._server)

    def revoke_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    def sent_to(self, touser: str) -> list[Sent]:
        with self._lock:
            return [s for s in self.sent if s.touser == touser]


class _Handler(BaseHTTPRequestHandler):
    state: FakeWeChat
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

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        fake = self.state
        if url.path != "/cgi-bin/token":
            self._json(404, {"errcode": 404, "errmsg": "no such API"})
            return
        with fake._lock:
            fake.token_calls += 1
            app_id = query.get("appid", "")
            if query.get("grant_type") != "client_credential":
                self._json(200, {"errcode": 40002, "errmsg": "invalid grant_type"})
                return
            if fake.apps.get(app_id) != query.get("secret") or app_id not in fake.apps:
                self._json(200, {"errcode": 40013, "errmsg": "invalid appid or secret"})
                return
            token = f"token-{app_id}-{fake.token_calls}"
            fake._tokens[token] = app_id
        self._json(200, {"access_token": token, "expires_in": fake.expires_in})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        fake = self.state
        body_raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if url.path != "/cgi-bin/message/custom/send":
            self._json(404, {"errcode": 404, "errmsg": "no such API"})
            return
        with fake._lock:
            fake.send_calls += 1
            app_id = fake._tokens.get(query.get("access_token", ""))
            if app_id is None:
                self._json(200, {"errcode": 40001, "errmsg": "invalid credential"})
                return
            if fake.fail_next > 0:
                fake.fail_next -= 1
                if 300 <= fake.fail_with < 600:
                    self._json(fake.fail_with, {"errcode": -1, "errmsg": "http failure"})
                else:
                    self._json(200, {"errcode": fake.fail_with, "errmsg": "told to fail"})
                return
            try:
                body = json.loads(body_raw)
                text = str(body["text"]["content"])
                touser = str(body["touser"])
            except (ValueError, KeyError, TypeError):
                self._json(200, {"errcode": 44002, "errmsg": "empty post data"})
                return
            fake.sent.append(Sent(app_id, touser, text, body))
        self._json(200, {"errcode": 0, "errmsg": "ok"})
