"""A local server speaking the Telegram Bot API calls kefu makes, on a loopback port in
a background thread: ``getMe``, ``sendMessage``; ``getFile`` and the file download
(``GET /file/bot<token>/<path>``); ``sendPhoto``, ``sendDocument``, ``sendVoice``,
``sendAudio``, ``sendVideo`` as multipart uploads.

Tests register bots (``tokens``) and customers' files (``add_file``), read what was
sent (``sent``, ``sent_files``) and steer failures: ``fail_next`` calls answer HTTP
``fail_with`` (429 carries ``retry_after``). An unknown ``file_id`` gets getFile's 400,
as an expired or deleted file does.
"""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fake_http import LoopbackServer, port_of, serve, shutdown


@dataclass
class Sent:
    token: str
    chat_id: int | str
    text: str


@dataclass
class SentFile:
    token: str
    chat_id: str  # as the form sent it
    method: str  # sendPhoto, sendDocument, ...
    field: str  # the form field of the file: photo, document, voice, ...
    filename: str
    content_type: str
    data: bytes
    params: dict[str, str]  # the other form fields (duration, ...)


_UPLOADS = {
    "sendPhoto": "photo",
    "sendDocument": "document",
    "sendVoice": "voice",
    "sendAudio": "audio",
    "sendVideo": "video",
}


@dataclass
class FakeTelegram:
    tokens: set[str] = field(default_factory=set)
    sent: list[Sent] = field(default_factory=list)
    sent_files: list[SentFile] = field(default_factory=list)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # file_id -> path, bytes
    downloads: int = 0
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

    def files_sent_to(self, chat_id: int | str) -> list[SentFile]:
        with self._lock:
            return [s for s in self.sent_files if s.chat_id == str(chat_id)]

    def add_file(self, data: bytes, path: str = "documents/file") -> str:
        """A customer's file as Telegram holds it; its new ``file_id``."""
        file_id = "F" + secrets.token_urlsafe(12)
        with self._lock:
            self.files[file_id] = (f"{path}_{file_id}", data)
        return file_id


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

    def _error(self, status: int, description: str) -> None:
        self._json(status, {"ok": False, "error_code": status, "description": description})

    def do_GET(self) -> None:
        fake = self.state
        url = urlsplit(self.path)
        parts = url.path.lstrip("/").split("/", 2)
        with fake._lock:
            fake.calls += 1
            if parts[0] == "file" and len(parts) == 3:  # /file/bot<token>/<file_path>
                token = parts[1][3:] if parts[1].startswith("bot") else ""
                found = [d for p, d in fake.files.values() if p == parts[2]]
                if token not in fake.tokens or not found:
                    self._error(404, "Not Found")
                    return
                fake.downloads += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(found[0])))
                self.end_headers()
                self.wfile.write(found[0])
                return
            token = parts[0][3:] if parts[0].startswith("bot") else ""
            if token not in fake.tokens:
                self._error(401, "Unauthorized")
                return
            if parts[1:] == ["getMe"]:
                bot = {"id": int(token.split(":")[0]), "is_bot": True, "username": "kefu_test_bot"}
                self._json(200, {"ok": True, "result": bot})
                return
            if parts[1:] != ["getFile"]:
                self._error(404, "Not Found")
                return
            file_id = parse_qs(url.query).get("file_id", [""])[0]
            if file_id not in fake.files:
                self._error(400, "Bad Request: invalid file_id")
                return
            path, data = fake.files[file_id]
            result = {"file_id": file_id, "file_size": len(data), "file_path": path}
        self._json(200, {"ok": True, "result": result})

    def _upload(self, fake: FakeTelegram, token: str, method: str, raw: bytes) -> None:
        """A multipart send* call, recorded (called with the lock held)."""
        head = f"Content-Type: {self.headers.get('Content-Type', '')}\r\n\r\n".encode()
        form = BytesParser(policy=policy.default).parsebytes(head + raw)
        assert isinstance(form, EmailMessage)
        params: dict[str, str] = {}
        upload: tuple[str, str, bytes] | None = None
        for part in form.iter_parts():
            name = str(part.get_param("name", header="content-disposition") or "")
            payload = part.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
            if name == _UPLOADS[method]:
                upload = (part.get_filename() or "", part.get_content_type(), data)
            else:
                params[name] = data.decode()
        if upload is None or "chat_id" not in params:
            self._error(400, f"Bad Request: there is no {_UPLOADS[method]} in the request")
            return
        chat_id = params.pop("chat_id")
        fake.sent_files.append(
            SentFile(
                token, chat_id, method, _UPLOADS[method], upload[0], upload[1], upload[2], params
            )
        )
        message_id = len(fake.sent) + len(fake.sent_files)
        self._json(200, {"ok": True, "result": {"message_id": message_id}})

    def do_POST(self) -> None:
        fake = self.state
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        prefix, _, method = self.path.lstrip("/").partition("/")
        token = prefix[3:] if prefix.startswith("bot") else ""
        with fake._lock:
            fake.calls += 1
            if token not in fake.tokens:
                self._error(401, "Unauthorized")
                return
            if method != "sendMessage" and method not in _UPLOADS:
                self._error(404, "Not Found")
                return
            if fake.fail_next > 0:
                fake.fail_next -= 1
                error: dict[str, Any] = {"ok": False, "error_code": fake.fail_with}
                if fake.fail_with == 429:
                    error["parameters"] = {"retry_after": fake.retry_after}
                self._json(fake.fail_with, error)
                return
            if method in _UPLOADS:
                self._upload(fake, token, method, raw)
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
