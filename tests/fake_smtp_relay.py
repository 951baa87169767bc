"""A local SMTP relay for tests (aiosmtpd in a thread on 127.0.0.1): records every mail
it accepts with its MIME parts, and can be told to answer the next N mails with a
4xx/5xx instead."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class Part:
    """A leaf MIME part of a received mail, decoded."""

    content_type: str
    disposition: str  # attachment, inline, or "" for the body
    filename: str
    data: bytes


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    parts: list[Part] = field(default_factory=list)

    @property
    def attachments(self) -> list[Part]:
        return [p for p in self.parts if p.disposition == "attachment"]


def parts_of(message: EmailMessage) -> list[Part]:
    out = []
    for part in message.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        out.append(
            Part(
                part.get_content_type(),
                part.get_content_disposition() or "",
                part.get_filename() or "",
                payload if isinstance(payload, bytes) else b"",
            )
        )
    return out


@dataclass
class _Handler:
    received: list[Received] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # replies for the next DATAs
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            if self.failures:
                return self.failures.pop(0)
            data = envelope.content
            raw = data if isinstance(data, bytes) else (data or "").encode()
            message = BytesParser(policy=policy.default).parsebytes(raw)
            assert isinstance(message, EmailMessage)
            self.received.append(
                Received(
                    str(envelope.mail_from), list(envelope.rcpt_tos), message, parts_of(message)
                )
            )
        return "250 OK"


class FakeSmtpRelay:
    def __init__(self, port: int) -> None:
        self.port = port
        self._handler = _Handler()
        self._controller = Controller(self._handler, hostname="127.0.0.1", port=port)

    def start(self) -> FakeSmtpRelay:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def fail_next(self, *replies: str) -> None:
        """Answer the next DATA commands with these replies (e.g. "451 4.3.0 busy")."""
        with self._handler.lock:
            self._handler.failures.extend(replies)

    def messages(self) -> list[Received]:
        with self._handler.lock:
            return list(self._handler.received)

    def to(self, address: str) -> list[EmailMessage]:
        return [r.message for r in self.messages() if address in r.rcpt_tos]

    def received_by(self, address: str) -> list[Received]:
        return [r for r in self.messages() if address in r.rcpt_tos]
