"""Email in: an SMTP listener (aiosmtpd) that turns each accepted mail into a
``ReceiveMessage`` command. ``250`` means the command is durable in Kafka.

- Tenant: each recipient, by the tenant's addresses or as
  ``<inbound_local>+<tenant>@…``; unknown recipients (and a tenant an operator
  disabled) get ``550`` at RCPT. The addresses are live: the ``addresses`` of the
  tenant's ``email`` channel entity (/admin) replace its ``email_addresses`` from the
  environment (the seed) at the next RCPT, with no restart (:func:`live_addresses`).
- Conversation: a mail that refers to a known Message-ID (In-Reply-To / References,
  ours included) joins that Message-ID's conversation; one that refers only to unknown
  mail starts the conversation of its thread root (the first References id); a mail
  with no thread headers joins the sender's conversation (one per address, like the
  other channels).
- Dedupe: the channel message id is the Message-ID (a hash of the raw bytes when there
  is none), so a redelivered mail is the same command and dropped downstream.
- Text: text/plain preferred, else HTML stripped to text; quoted history ("> " lines
  and their "On … wrote:" line) is cut; at most ``max_text_chars``.
- Files: every part that is not the text (Content-Disposition attachment or inline,
  ``cid:`` images of the HTML, a bare image or PDF as the whole mail) goes through
  :func:`connectors.attachments.accept` with channel "email" (its size limit, the
  type sniffed from the bytes). A refused file is dropped, named with its reason in
  the ``250`` reply (the log has the reason, not the name); the text still counts. A
  mail with a file and no text is a message; one with nothing left (no text, every
  file refused) gets ``550 5.6.1`` with the reasons.
- Malformed MIME, no From address, or neither text nor file: ``550`` with the reason,
  nothing published. Too large: ``552`` (SMTP SIZE). Kafka, Redis or the blob store
  down: ``451`` (the sender retries; dedupe makes that safe). Auto-submitted mail
  (auto-replies) is accepted and ignored, so two robots never talk to each other
  forever.
- Rate limits per tenant and per sender address (``email.rate_limits``, buckets in
  Redis under ``kefu-rl-mail:``): over them ``451 4.7.1``, so a flood or a loop with
  a robot that does not mark its mail is slowed down by the sender's own retries,
  and no real mail is lost. Redis unreachable: the limiter lets mail through.
"""

from __future__ import annotations

import asyncio
import email.errors
import hashlib
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import getaddresses, parseaddr
from html.parser import HTMLParser
from typing import Any, Protocol

import redis.asyncio as aioredis
from aiosmtpd.smtp import SMTP, Envelope, Session

from connectors.attachments import AttachmentPolicy, AttachmentRejected, Quota, accept, safe_name
from connectors.blobs import BlobStore
from connectors.config_log import ConfigFollower
from connectors.email_threads import Thread, ThreadStore
from connectors.identity import command_id_for, conversation_id_for
from connectors.publisher import CommandPublisher
from connectors.rate_limit import Limits, RateLimiter
from connectors.uploads import MAX_ATTACHMENTS
from schemas.config import ConfigState
from schemas.records import Attachment, Command, ReceiveMessage
from schemas.time import now_ms

log = logging.getLogger(__name__)

CHANNEL = "email"
_MSGID = re.compile(r"<([^<>\s]{1,900})>")
_STRUCTURAL_DEFECTS = (
    email.errors.NoBoundaryInMultipartDefect,
    email.errors.StartBoundaryNotFoundDefect,
    email.errors.MultipartInvariantViolationDefect,
    email.errors.MissingHeaderBodySeparatorDefect,
    email.errors.InvalidMultipartContentTransferEncodingDefect,
)


class MailRejected(Exception):
    """The mail cannot be accepted; ``reply`` is the SMTP answer."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class MailFile:
    """A part of the mail that is not its text: bytes as decoded from the MIME part."""

    name: str  # the part's file name, "" when it has none
    data: bytes
    inline: bool  # shown in the body (Content-Disposition inline, or a cid: image)


@dataclass(frozen=True, slots=True)
class InboundMail:
    message_id: str  # without angle brackets
    sender: str  # From address, lower case: the customer id
    reply_to: str  # where replies go
    subject: str
    references: tuple[str, ...]  # References then In-Reply-To, oldest first, unique
    text: str
    auto_submitted: bool
    files: tuple[MailFile, ...] = ()


# ------------------------------------------------------------------------- parsing


class _TextExtractor(HTMLParser):
    _BLOCK = frozenset(
        {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre"}
    )
    _SKIP = frozenset({"script", "style", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    lines = (" ".join(line.split()) for line in "".join(extractor.parts).splitlines())
    return "\n".join(line for line in lines if line)


_WROTE = re.compile(r"^(on\b.*\bwrote:|.*写道[:：])\s*$", re.IGNORECASE)


def strip_quoted(text: str) -> str:
    """Drop quoted history: "> " lines and the "On … wrote:" line that introduces them."""
    kept: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith(">"):
            if kept and _WROTE.match(kept[-1].strip()):
                kept.pop()
            continue
        kept.append(line.rstrip())
    while kept and (not kept[-1] or _WROTE.match(kept[-1].strip())):
        kept.pop()
    return "\n".join(kept).strip()


def _message_ids(value: str | None) -> list[str]:
    return _MSGID.findall(str(value or ""))


def _text_of(part: Message) -> str:
    try:
        content = part.get_content()  # type: ignore[attr-defined]
    except (LookupError, UnicodeError):  # an unknown or lying charset
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    return content if isinstance(content, str) else ""


def _files_of(msg: EmailMessage, body: Message | None) -> list[MailFile]:
    """Every leaf part but the text: a text part without a file name that is not an
    attachment is another rendering of the body (the HTML of a text/plain mail)."""
    files: list[MailFile] = []

    def visit(part: Message) -> None:
        content_type = part.get_content_type()
        if content_type == "message/rfc822":  # a forwarded mail: one file, not its parts
            try:
                inner = part.get_payload(0)
                data = inner.as_bytes() if isinstance(inner, Message) else b""
            except Exception:  # a broken forwarded mail: an empty file, refused
                data = b""
            files.append(MailFile(part.get_filename() or "forwarded.eml", data, False))
            return
        if part.is_multipart():
            for child in part.get_payload():
                if isinstance(child, Message):
                    visit(child)
            return
        if part is body:
            return
        disposition = part.get_content_disposition()
        name = part.get_filename() or ""
        if part.get_content_maintype() == "text" and not name and disposition != "attachment":
            return
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        inline = disposition == "inline" or (disposition is None and bool(part["Content-ID"]))
        files.append(MailFile(name, data, inline))

    visit(msg)
    return files


def parse_mail(data: bytes, max_text_chars: int = 8000) -> InboundMail:
    """Parse raw mail bytes; raises :class:`MailRejected` with a 5xx reply."""
    try:
        msg = BytesParser(policy=policy.default).parsebytes(data)
        assert isinstance(msg, EmailMessage)
        for part in msg.walk():
            for defect in part.defects:
                if isinstance(defect, _STRUCTURAL_DEFECTS):
                    raise MailRejected(f"550 5.6.0 malformed MIME: {type(defect).__name__}")
        sender = parseaddr(str(msg.get("From", "")))[1].strip().lower()
        subject = " ".join(str(msg.get("Subject", "")).split())[:200]
        reply_to = [a for _, a in getaddresses([str(v) for v in msg.get_all("Reply-To", [])])]
        message_ids = _message_ids(msg.get("Message-ID"))
        references = _message_ids(msg.get("References"))
        for parent in _message_ids(msg.get("In-Reply-To")):
            if parent not in references:
                references.append(parent)
        auto = str(msg.get("Auto-Submitted", "no")).strip().lower() not in ("", "no")
        body = msg.get_body(preferencelist=("plain", "html"))
        raw_text = _text_of(body) if body is not None else ""
        is_html = body is not None and body.get_content_subtype() == "html"
        files = _files_of(msg, body)
    except MailRejected:
        raise
    except Exception as exc:  # the email package raises many things on garbage
        raise MailRejected(f"554 5.6.0 malformed message: {type(exc).__name__}") from exc
    if "@" not in sender or len(sender) > 254:
        raise MailRejected("550 5.6.0 malformed message: no valid From address")
    if body is None and not files:
        raise MailRejected("550 5.6.0 no text/plain or text/html part and no attachment")
    text = strip_quoted(html_to_text(raw_text) if is_html else raw_text)[:max_text_chars]
    if not text.strip() and not files:
        raise MailRejected("550 5.6.0 the message has no text and no attachment")
    # No Message-ID: a digest of the bytes, so a redelivery still dedupes.
    message_id = message_ids[0] if message_ids else "sha256-" + hashlib.sha256(data).hexdigest()
    return InboundMail(
        message_id=message_id,
        sender=sender,
        reply_to=(reply_to[0] if reply_to and "@" in reply_to[0] else sender).lower(),
        subject=subject,
        references=tuple(r for r in references if r != message_id),
        text=text if text.strip() else "",
        auto_submitted=auto,
        files=tuple(files),
    )


# -------------------------------------------------------------------------- routing


def live_addresses(seed: Mapping[str, str], config: ConfigState) -> dict[str, str]:
    """address -> tenant: a tenant's ``email`` channel entity with ``addresses`` replaces
    its seed addresses (the environment's); the other tenants keep theirs. An address
    two tenants claim stays with the first claim (the seed, then the older entity):
    /admin refuses a taken address, so this only guards against a race."""
    configured = sorted(
        (
            (entity.changed_at, tenant, entity.data.get("addresses") or [])
            for (tenant, kind, entity_id), entity in config.entities.items()
            if kind == "channel" and entity_id == "email" and "addresses" in entity.data
        ),
        key=lambda found: (found[0], found[1]),
    )
    replaced = {tenant for _, tenant, _ in configured}
    out = {a: t for a, t in seed.items() if t not in replaced}
    for _, tenant, addresses in configured:
        for address in addresses:
            if isinstance(address, str) and address.strip():
                out.setdefault(address.strip().lower(), tenant)
    return out


@dataclass(frozen=True, slots=True)
class Mailboxes:
    """Recipient address → tenant. With ``config`` (the process follows the config
    topic) the addresses and tenants are the live configuration's over the seed."""

    tenants: frozenset[str]
    addresses: Mapping[str, str]  # exact address (lower case) -> tenant
    inbound_local: str = "support"
    config: ConfigState | None = None
    _built: dict[int, dict[str, str]] = field(default_factory=dict, compare=False, repr=False)

    def current(self) -> Mapping[str, str]:
        """The address map now (rebuilt when the configuration changed)."""
        if self.config is None:
            return self.addresses
        applied = self.config.applied
        built = self._built.get(applied)
        if built is None:
            built = live_addresses(self.addresses, self.config)
            self._built.clear()
            self._built[applied] = built
        return built

    def _disabled(self, tenant: str) -> bool:
        """An operator disabled it: refused, as at every other customer edge."""
        live = self.config.get(tenant, "tenant") if self.config is not None else None
        return bool(live and live.get("disabled"))

    def tenant_of(self, address: str) -> str | None:
        address = address.strip().lower()
        addresses = self.current()
        tenant: str | None = addresses.get(address)
        if tenant is None:
            local, at, _domain = address.rpartition("@")
            base, plus, tag = local.partition("+")
            known = tag in self.tenants or (
                self.config is not None and self.config.get(tag, "tenant") is not None
            )
            if at and plus and base == self.inbound_local and known:
                tenant = tag
        return None if tenant is None or self._disabled(tenant) else tenant


class Publisher(Protocol):
    async def publish(self, command: Command) -> None: ...


async def conversation_for(store: ThreadStore, tenant: str, mail: InboundMail) -> str:
    refs = list(mail.references)
    if refs:
        known = await store.conversation_of(tenant, refs)
        return known or conversation_id_for(tenant, CHANNEL, f"thread:{refs[0]}")
    return conversation_id_for(tenant, CHANNEL, mail.sender)


class Refused(Exception):
    """Nothing of the mail is left to accept; ``reasons`` say why each file was refused."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


def _smtp_list(reasons: list[str], limit: int = 300) -> str:
    """Reasons fit for one SMTP reply line (RFC 5321: 512 octets with the code)."""
    # ASCII only: the client may not speak SMTPUTF8, and a file name may be Chinese.
    joined = "; ".join(reasons).encode("ascii", "replace").decode()
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


class EmailHandler:
    """aiosmtpd handler: RCPT checks the mailbox, DATA parses, stores files, publishes.
    Without a blob store (``blobs``) every file is refused and the text still counts."""

    def __init__(
        self,
        publisher: Publisher,
        store: ThreadStore,
        mailboxes: Mailboxes,
        max_text_chars: int = 8000,
        limiter: RateLimiter | None = None,
        blobs: BlobStore | None = None,
        policy: AttachmentPolicy | None = None,
        quota: Quota | None = None,
    ) -> None:
        self._publisher = publisher
        self._store = store
        self._mailboxes = mailboxes
        self._max_text = max_text_chars
        self._limiter = limiter
        self._blobs = blobs
        self._policy = policy or AttachmentPolicy()
        self._quota = quota

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self._mailboxes.tenant_of(address) is None:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.content
        raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data or b""
        try:
            mail = parse_mail(raw, self._max_text)
        except MailRejected as rejected:
            log.info("email rejected: %s", rejected.reply)
            return rejected.reply
        if mail.auto_submitted:
            return "250 OK: auto-submitted mail is not answered"
        tenants = dict.fromkeys(
            t for t in (self._mailboxes.tenant_of(a) for a in envelope.rcpt_tos) if t
        )
        for tenant in tenants:
            limited = await self._limiter.check(tenant, mail.sender) if self._limiter else None
            if limited is not None:
                log.info("email rate limited: tenant=%s scope=%s", tenant, limited.scope)
                wait = math.ceil(limited.retry_after)
                return f"451 4.7.1 too many messages from this {limited.scope}; retry in {wait} s"
        refused: dict[str, None] = {}
        accepted = False
        try:
            for tenant in tenants:
                try:
                    refused.update(dict.fromkeys(await self._accept(tenant, mail)))
                    accepted = True
                except Refused as nothing_left:
                    refused.update(dict.fromkeys(nothing_left.reasons))
        except Exception as exc:  # Kafka, Redis, the blob store: the sender retries
            log.warning("email not accepted, sender will retry: %s", type(exc).__name__)
            return "451 4.3.0 temporarily unable to accept the message"
        if not accepted:
            return f"550 5.6.1 no text and no acceptable attachment: {_smtp_list(list(refused))}"
        if refused:
            return f"250 OK; attachments not accepted: {_smtp_list(list(refused))}"
        return "250 OK"

    async def _attachments(
        self, tenant: str, conversation: str, files: tuple[MailFile, ...], customer: str = ""
    ) -> tuple[tuple[Attachment, ...], list[str]]:
        """The files that pass :func:`accept`, stored; and a reason for each refused."""
        kept: list[Attachment] = []
        refused: list[str] = []
        for number, file in enumerate(files):
            name = safe_name(file.name) if file.name else f"part {number + 1}"
            if self._blobs is None:
                refused.append(f"{name}: attachments are not accepted here")
                continue
            if len(kept) >= MAX_ATTACHMENTS:
                refused.append(f"{name}: more than {MAX_ATTACHMENTS} attachments")
                continue
            try:
                attachment = await accept(
                    self._blobs,
                    file.data,
                    name=file.name,
                    tenant=tenant,
                    conversation=conversation,
                    channel=CHANNEL,
                    policy=self._policy,
                    quota=self._quota,
                    customer=customer,
                )
            except AttachmentRejected as exc:
                # The status and reason only: a file name is the customer's data.
                log.info(
                    "email attachment refused: tenant=%s conversation=%s status=%d reason=%s",
                    tenant,
                    conversation,
                    exc.status,
                    exc.reason,
                )
                refused.append(f"{name}: {exc.reason}")
                continue
            if attachment.sha256 not in {a.sha256 for a in kept}:  # a logo twice: once
                kept.append(attachment)
        return tuple(kept), refused

    async def _accept(self, tenant: str, mail: InboundMail) -> list[str]:
        """Publish the mail for ``tenant``; the reasons of refused files, or
        :class:`Refused` when nothing is left to publish."""
        conversation = await conversation_for(self._store, tenant, mail)
        attachments, refused = await self._attachments(
            tenant, conversation, mail.files, mail.sender
        )
        if not mail.text and not attachments:
            raise Refused(refused)
        # Thread state first: a redelivery after a failed publish rewrites the same.
        thread = Thread(mail.reply_to, mail.subject, mail.message_id, mail.references)
        await self._store.remember_inbound(tenant, conversation, mail.message_id, thread)
        command = ReceiveMessage(
            command_id=command_id_for(tenant, CHANNEL, mail.message_id),
            conversation_id=conversation,
            tenant_id=tenant,
            issued_at=now_ms(),
            channel=CHANNEL,
            customer_id=mail.sender,
            text=mail.text,
            channel_message_id=mail.message_id,
            attachments=attachments,
        )
        await self._publisher.publish(command)
        log.info(
            "email accepted: tenant=%s conversation=%s attachments=%d refused=%d",
            tenant,
            conversation,
            len(attachments),
            len(refused),
        )
        return refused


# -------------------------------------------------------------------------- process


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    bootstrap: str
    commands_topic: str
    redis_url: str
    mailboxes: Mailboxes
    port: int
    hostname: str = "kefu.localhost"
    max_message_bytes: int = 10 * 1024 * 1024
    max_text_chars: int = 8000
    host: str = "127.0.0.1"
    kafka_options: Mapping[str, Any] = field(default_factory=dict)  # SASL/TLS
    limits: Limits | None = None  # None: no limits (kefu passes ``email.rate_limits``)
    # The config topic: followed (into ``mailboxes.config``) while the listener runs.
    config_topic: str = ""
    blobs: BlobStore | None = None  # None: attachments refused, the text still accepted
    policy: AttachmentPolicy = field(default_factory=AttachmentPolicy)


async def serve(config: ListenerConfig, stop: asyncio.Event | None = None) -> None:
    """Listen until ``stop`` is set (or forever)."""
    publisher = CommandPublisher(
        config.bootstrap, config.commands_topic, kafka_options=config.kafka_options
    )
    await publisher.start()
    follower = None
    if config.config_topic and config.mailboxes.config is not None:
        follower = ConfigFollower(
            config.bootstrap, config.config_topic, config.mailboxes.config, config.kafka_options
        )
        await follower.start()  # read whole before the first RCPT is answered
    redis = aioredis.Redis.from_url(config.redis_url)
    limiter = RateLimiter(redis, config.limits, namespace="kefu-rl-mail") if config.limits else None
    quota_bytes = config.policy.tenant_quota_bytes
    quota = Quota(redis, config.blobs, quota_bytes) if config.blobs and quota_bytes else None
    handler = EmailHandler(
        publisher,
        ThreadStore(redis),
        config.mailboxes,
        config.max_text_chars,
        limiter,
        blobs=config.blobs,
        policy=config.policy,
        quota=quota,
    )

    def factory() -> SMTP:
        kwargs: dict[str, Any] = {
            "hostname": config.hostname,
            "data_size_limit": config.max_message_bytes,
            "enable_SMTPUTF8": True,
            "ident": "kefu",
        }
        return SMTP(handler, **kwargs)

    server = await asyncio.get_running_loop().create_server(factory, config.host, config.port)
    log.info("smtp listening on %s:%d", config.host, config.port)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        server.close()
        await server.wait_closed()
        if follower is not None:
            await follower.stop()
        await publisher.stop()
        await redis.aclose()
