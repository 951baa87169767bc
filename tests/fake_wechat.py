"""A local server speaking the WeChat API calls kefu makes: ``GET /cgi-bin/token``,
``POST /cgi-bin/message/custom/send`` (text, image, voice, video and link messages),
``GET /cgi-bin/media/get`` and ``POST /cgi-bin/media/upload``, on a loopback port in a
background thread.

Media: ``add_media(data, content_type)`` registers bytes a customer "sent" and returns
their MediaId; media/get serves them (a video, as WeChat does, as JSON with a
``video_url`` on this server), and answers errcode 40007 for an id it does not know.
``media_busy_next`` calls of media/get answer errcode -1 (system busy).
media/upload records each file (``uploads``) and returns a new media_id; a message
naming a media_id nobody uploaded gets 40007.

Tests register apps (``apps``: app id -> secret), read what was sent (``sent``) and
steer failures: ``fail_next`` calls of custom/send answer ``fail_with`` (an HTTP status
>= 300, or a WeChat errcode with HTTP 200); ``revoke_tokens()`` makes every issued
token invalid (errcode 40001), as when another process fetched a new one.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fake_http import LoopbackServer, port_of, serve, shutdown


@dataclass
class Sent:
    app_id: str
    touser: str
    text: str  # "" for a message other than text
    body: dict[str, Any]

    @property
    def msgtype(self) -> str:
        return str(self.body.get("msgtype", ""))


@dataclass
class Upload:
    app_id: str
    type: str
    filename: str
    content_type: str
    data: bytes
    media_id: str


_UPLOAD_TYPES = {"image", "voice", "video", "thumb"}


@dataclass
class FakeWeChat:
    apps: dict[str, str] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)
    token_calls: int = 0
    send_calls: int = 0
    fail_next: int = 0
    fail_with: int = -1  # errcode -1: system busy (retryable); 500: HTTP error
    expires_in: int = 7200
    media: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # id -> bytes, type
    media_gets: int = 0
    media_busy_next: int = 0
    uploads: list[Upload] = field(default_factory=list)
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

    def add_media(self, data: bytes, content_type: str) -> str:
        """Register what a customer sent; its MediaId."""
        media_id = f"media-{uuid.uuid4().hex}"
        with self._lock:
            self.media[media_id] = (data, content_type)
        return media_id

    def uploaded(self, media_id: str) -> Upload | None:
        with self._lock:
            return next((u for u in self.uploads if u.media_id == media_id), None)


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

    def _bytes(self, data: bytes, content_type: str, filename: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Disposition", f'attachment; filename="{filename}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _media_get(self, query: dict[str, str], cdn: bool = False) -> None:
        fake = self.state
        with fake._lock:
            fake.media_gets += 1
            if not cdn and query.get("access_token", "") not in fake._tokens:
                self._json(200, {"errcode": 40001, "errmsg": "invalid credential"})
                return
            if fake.media_busy_next > 0:
                fake.media_busy_next -= 1
                self._json(200, {"errcode": -1, "errmsg": "system error"})
                return
            found = fake.media.get(query.get("media_id", ""))
        if found is None:
            self._json(200, {"errcode": 40007, "errmsg": "invalid media_id"})
            return
        data, content_type = found
        if content_type.startswith("video/") and not cdn:
            url = f"{fake.base_url}/cdn/video?media_id={query['media_id']}"
            self._json(200, {"video_url": url})
            return
        extension = content_type.rsplit("/", 1)[-1]
        self._bytes(data, content_type, f"{query['media_id']}.{extension}")

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        fake = self.state
        if url.path in ("/cgi-bin/media/get", "/cdn/video"):
            self._media_get(query, cdn=url.path == "/cdn/video")
            return
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
        if url.path == "/cgi-bin/media/upload":
            self._upload(query, body_raw)
            return
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
                touser = str(body["touser"])
                msgtype = body.get("msgtype", "text")
                text = ""
                if msgtype == "text":
                    text = str(body["text"]["content"])
                elif msgtype in ("image", "voice", "video"):
                    media_id = str(body[msgtype]["media_id"])
                    if not any(u.media_id == media_id for u in fake.uploads):
                        self._json(200, {"errcode": 40007, "errmsg": "invalid media_id"})
                        return
                elif msgtype == "link":
                    if not body["link"]["url"] or not body["link"]["title"]:
                        raise ValueError("link needs a url and a title")
                else:
                    self._json(200, {"errcode": 40008, "errmsg": "invalid message type"})
                    return
            except (ValueError, KeyError, TypeError):
                self._json(200, {"errcode": 44002, "errmsg": "empty post data"})
                return
            fake.sent.append(Sent(app_id, touser, text, body))
        self._json(200, {"errcode": 0, "errmsg": "ok"})

    def _upload(self, query: dict[str, str], body_raw: bytes) -> None:
        """multipart/form-data with the file in the field "media", as WeChat wants it."""
        fake = self.state
        head = f"Content-Type: {self.headers.get('Content-Type', '')}\r\n\r\n".encode()
        form = BytesParser(policy=HTTP).parsebytes(head + body_raw)
        part = (
            next(
                (
                    p
                    for p in form.iter_parts()
                    if p.get_param("name", header="content-disposition") == "media"
                ),
                None,
            )
            if form.is_multipart()
            else None
        )
        with fake._lock:
            app_id = fake._tokens.get(query.get("access_token", ""))
            if app_id is None:
                self._json(200, {"errcode": 40001, "errmsg": "invalid credential"})
                return
            media_type = query.get("type", "")
            if media_type not in _UPLOAD_TYPES:
                self._json(200, {"errcode": 40004, "errmsg": "invalid media type"})
                return
            if part is None:
                self._json(200, {"errcode": 41005, "errmsg": "media data missing"})
                return
            data = part.get_payload(decode=True)
            upload = Upload(
                app_id,
                media_type,
                str(part.get_filename() or ""),
                part.get_content_type(),
                data if isinstance(data, bytes) else b"",
                f"up-{uuid.uuid4().hex}",
            )
            fake.uploads.append(upload)
        self._json(200, {"type": media_type, "media_id": upload.media_id, "created_at": 1})
