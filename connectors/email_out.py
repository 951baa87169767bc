"""Email out: the ``email`` channel's ``ChannelSender``, through an SMTP relay.

A reply answers the customer's latest mail of its conversation (the thread in Redis,
kept by ``email_in``): To its Reply-To/From, ``Re:`` its subject, In-Reply-To its
Message-ID and References the thread. Our Message-ID derives from the reply's event
id, so a redelivered reply is recognisably the same mail; it is remembered for the
conversation before sending, so the customer's answer threads back. A reply's
attachments are attached (multipart/mixed) with the blob store's bytes; one missing
from the store fails the delivery before anything is sent. 4xx and connection errors
are retried with exponential backoff; a 5xx is final. Failures come back as a failed
``DeliveryOutcome``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate

import aiosmtplib

from connectors.blobs import BlobMissing, BlobStore
from connectors.email_threads import ThreadStore
from schemas.outcomes import DeliveryOutcome
from schemas.records import Attachment, ReplyProduced

log = logging.getLogger(__name__)

_MAX_REFERENCES = 20  # the root and the latest matter; RFC 5322 lets us trim the middle


@dataclass(frozen=True, slots=True)
class RelayConfig:
    host: str
    port: int
    from_addresses: Mapping[str, str]  # tenant -> From address (kefu's is live)
    hostname: str = "kefu.localhost"  # the right-hand side of our Message-IDs
    username: str = ""
    password: str = ""
    starttls: bool = False
    timeout: float = 10.0
    attempts: int = 4
    backoff: float = 0.5


def reply_message_id(event_id: str, hostname: str) -> str:
    return f"{event_id}@{hostname}"


def build_reply(
    reply: ReplyProduced,
    from_address: str,
    to: str,
    subject: str,
    parent: str,
    references: tuple[str, ...],
    hostname: str,
    files: Sequence[tuple[Attachment, bytes]] = (),
) -> EmailMessage:
    """The reply mail; ``files`` (an attachment and its bytes) make it multipart/mixed."""
    msg = EmailMessage()
    msg["From"] = from_address
    msg["To"] = to
    base = subject or "Your message"
    msg["Subject"] = base if base.lower().startswith("re:") else f"Re: {base}"
    msg["Message-ID"] = f"<{reply_message_id(reply.event_id, hostname)}>"
    msg["Date"] = formatdate(reply.occurred_at / 1000, localtime=False, usegmt=True)
    if parent:
        chain = [*references, parent]
        if len(chain) > _MAX_REFERENCES:
            chain = [chain[0], *chain[-(_MAX_REFERENCES - 1) :]]
        msg["In-Reply-To"] = f"<{parent}>"
        msg["References"] = " ".join(f"<{r}>" for r in chain)
    if reply.author == "ai":
        msg["Auto-Submitted"] = "auto-replied"  # RFC 3834: auto-responders stay quiet
    msg["X-Kefu-Conversation"] = reply.conversation_id
    msg.set_content(reply.text)
    for attachment, data in files:
        maintype, _, subtype = attachment.mime_type.partition("/")
        msg.add_attachment(
            data,
            maintype=maintype or "application",
            subtype=subtype or "octet-stream",
            filename=attachment.name,
        )
    return msg


class EmailSender:
    def __init__(
        self, store: ThreadStore, config: RelayConfig, blobs: BlobStore | None = None
    ) -> None:
        self._store = store
        self._config = config
        self._blobs = blobs

    async def _files(self, reply: ReplyProduced) -> list[tuple[Attachment, bytes]] | str:
        """Each attachment with its bytes, or why they cannot all be had."""
        if reply.attachments and self._blobs is None:
            return "attachments need a blob store"
        files = []
        for attachment in reply.attachments:
            assert self._blobs is not None
            try:
                files.append((attachment, (await self._blobs.get(attachment.storage_key)).data))
            except BlobMissing:
                return f"attachment missing: {attachment.name}"
        return files

    async def send(self, reply: ReplyProduced) -> DeliveryOutcome:
        c = self._config
        thread = await self._store.thread(reply.tenant_id, reply.conversation_id)
        if thread is None or not thread.address:
            return DeliveryOutcome("failed", 0, "no email thread for this conversation")
        from_address = c.from_addresses.get(reply.tenant_id, "")
        if not from_address:
            return DeliveryOutcome("failed", 0, f"no From address for tenant {reply.tenant_id}")
        files = await self._files(reply)
        if isinstance(files, str):  # never a mail without the files it promises
            return DeliveryOutcome("failed", 0, files)
        msg = build_reply(
            reply,
            from_address,
            thread.address,
            thread.subject,
            thread.last_message_id,
            thread.references,
            c.hostname,
            files,
        )
        # Before sending: the customer may answer faster than we return.
        await self._store.remember_message(
            reply.tenant_id, reply_message_id(reply.event_id, c.hostname), reply.conversation_id
        )
        detail = ""
        attempt = 0
        for attempt in range(1, c.attempts + 1):
            try:
                await aiosmtplib.send(
                    msg,
                    hostname=c.host,
                    port=c.port,
                    username=c.username or None,
                    password=c.password or None,
                    start_tls=c.starttls,
                    use_tls=False,
                    timeout=c.timeout,
                )
                return DeliveryOutcome("delivered", attempt, "SMTP 250")
            except aiosmtplib.SMTPResponseException as exc:
                detail = f"SMTP {exc.code}"
                if 500 <= exc.code < 600:
                    break  # the relay refuses it for good
            except aiosmtplib.SMTPRecipientsRefused as exc:
                codes = [r.code for r in exc.recipients]
                detail = f"SMTP {codes[0] if codes else 550} (recipient refused)"
                if all(500 <= code < 600 for code in codes):
                    break
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                detail = type(exc).__name__
            if attempt < c.attempts:
                await asyncio.sleep(c.backoff * 2 ** (attempt - 1))
        log.warning(
            "email reply failed after %d attempts: %s (conversation %s)",
            attempt,
            detail,
            reply.conversation_id,
        )
        return DeliveryOutcome("failed", attempt, detail)
