"""The email channel: MIME parsing and threading (pure), then end to end on the real
stack: a mail to the SMTP listener gets a threaded reply at a local fake relay; files
(attached, inline, the whole mail) become attachments, refused ones are dropped with
their reason, and a reply's attachments reach the relay as MIME attachments."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import smtplib
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import hypothesis
import hypothesis.strategies as st
import pytest
import redis
import redis.asyncio as aioredis
from aiosmtpd.smtp import Envelope
from PIL import Image

from connectors.attachments import AttachmentPolicy, accept
from connectors.blobs import LocalBlobStore
from connectors.email_in import (
    EmailHandler,
    Mailboxes,
    MailRejected,
    html_to_text,
    parse_mail,
    strip_quoted,
)
from connectors.email_out import EmailSender, RelayConfig, build_reply
from connectors.email_threads import Thread, ThreadStore
from connectors.identity import conversation_id_for
from kefu.cli_email import from_address
from kefu.files import blob_store
from kefu.settings import Settings
from schemas.keys import messages_key
from schemas.records import Attachment, Command, ReceiveMessage, ReplyProduced
from tests.conftest import wait_for
from tests.fake_smtp_relay import FakeSmtpRelay
from tests.samples import SAMPLES
from tests.test_pipeline import customer_messages_published

# ---------------------------------------------------------------------------- pure


def sample_reply() -> ReplyProduced:
    return next(s for s in SAMPLES if isinstance(s, ReplyProduced))


def mail(
    text: str = "Where is my order?",
    *,
    sender: str = "alice@example.com",
    to: str = "help@demo.test",
    message_id: str | None = "m1@example.com",
    in_reply_to: str = "",
    references: str = "",
    html: str = "",
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Alice <{sender}>"
    msg["To"] = to
    msg["Subject"] = "My order"
    if message_id:
        msg["Message-ID"] = f"<{message_id}>"
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = references
    if text:
        msg.set_content(text)
    if html:
        if text:
            msg.add_alternative(html, subtype="html")
        else:
            msg.set_content(html, subtype="html")
    return msg


def test_plain_text_is_preferred_and_threading_headers_are_read() -> None:
    raw = mail(
        "Hello there",
        html="<p>HTML version</p>",
        in_reply_to="<b@x>",
        references="<a@x> <b@x>",
    ).as_bytes()
    parsed = parse_mail(raw)
    assert parsed.text == "Hello there"
    assert parsed.message_id == "m1@example.com"
    assert parsed.sender == "alice@example.com"
    assert parsed.references == ("a@x", "b@x")
    assert not parsed.auto_submitted


def test_html_only_mail_is_stripped_to_text() -> None:
    html = (
        "<html><head><style>p {color: red}</style></head><body>"
        "<p>Where is&nbsp;my <b>order</b>?</p><script>alert(1)</script><div>Thanks</div>"
        "</body></html>"
    )
    assert parse_mail(mail("", html=html).as_bytes()).text == "Where is my order?\nThanks"
    assert html_to_text("a<br>b") == "a\nb"


def test_quoted_history_is_cut() -> None:
    text = "Still waiting.\n\nOn Mon, 1 Jan 2026, Kefu wrote:\n> We are on it.\n> Regards"
    assert strip_quoted(text) == "Still waiting."


def test_missing_message_id_is_a_digest_of_the_bytes() -> None:
    raw = mail(message_id=None).as_bytes()
    assert parse_mail(raw).message_id == parse_mail(raw).message_id
    assert parse_mail(raw).message_id.startswith("sha256-")


@pytest.mark.parametrize(
    "raw",
    [
        # multipart without a boundary
        b"From: a@x.com\r\nMessage-ID: <z@x>\r\nContent-Type: multipart/mixed\r\n\r\nhi\r\n",
        # a boundary that never starts
        b"From: a@x.com\r\nContent-Type: multipart/mixed; boundary=XYZ\r\n\r\nno parts\r\n",
        # no From address
        b"Subject: hi\r\nMessage-ID: <y@x>\r\n\r\nhello\r\n",
        # only an empty attachment-less multipart
        b"From: a@x.com\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B--\r\n",
        # nothing to read
        b"From: a@x.com\r\n\r\n   \r\n",
    ],
)
def test_malformed_mail_is_rejected_with_a_5xx(raw: bytes) -> None:
    with pytest.raises(MailRejected) as rejected:
        parse_mail(raw)
    assert rejected.value.reply.startswith("55")


def test_recipients_map_to_tenants() -> None:
    boxes = Mailboxes(frozenset({"demo", "acme"}), {"help@demo.test": "demo"}, "support")
    assert boxes.tenant_of("Help@Demo.test") == "demo"
    assert boxes.tenant_of("support+acme@anything.example") == "acme"
    assert boxes.tenant_of("support+nobody@x") is None
    assert boxes.tenant_of("sales+acme@x") is None
    assert boxes.tenant_of("random@x") is None


def test_addresses_from_the_config_replace_the_seed_live() -> None:
    """A tenant's ``email`` channel entity (/admin) replaces its environment addresses
    at the next look; other tenants keep theirs; a taken address stays with its first
    owner; a tenant an operator disabled is refused."""
    from connectors.config_log import config_record
    from schemas.config import ConfigState

    live = ConfigState()
    boxes = Mailboxes(
        frozenset({"demo", "acme"}), {"help@demo.test": "demo", "a@acme.test": "acme"}, config=live
    )
    assert boxes.tenant_of("help@new.example") is None
    live.apply(config_record("acme", "channel", "email", {"addresses": ["Help@New.example"]}, "a"))
    assert boxes.tenant_of("help@new.example") == "acme"
    assert boxes.tenant_of("a@acme.test") is None  # replaced, not added to
    assert boxes.tenant_of("help@demo.test") == "demo"  # the seed, untouched
    live.apply(config_record("t9", "channel", "email", {"addresses": ["help@demo.test"]}, "x"))
    assert boxes.tenant_of("help@demo.test") == "demo"  # never taken over
    assert boxes.tenant_of("support+t9@x.example") is None  # no such tenant yet
    live.apply(config_record("t9", "tenant", "-", {"name": "T9"}, "ops"))
    assert boxes.tenant_of("support+t9@x.example") == "t9"  # made in /admin: live
    live.apply(config_record("acme", "tenant", "-", {"disabled": True}, "ops"))
    assert boxes.tenant_of("help@new.example") is None
    assert boxes.tenant_of("support+acme@x.example") is None


def test_from_addresses_follow_the_config() -> None:
    from connectors.config_log import config_record
    from kefu.cli_email import FromAddresses
    from kefu.settings import EmailSettings, TenantSettings
    from schemas.config import ConfigState

    settings = Settings(
        tenants={"demo": TenantSettings(email_addresses=["help@demo.test"]), "b": TenantSettings()},
        email=EmailSettings(from_address="support@kefu.example"),
    )
    live = ConfigState()
    froms = FromAddresses(settings, live)
    assert (froms["demo"], froms["b"]) == ("help@demo.test", "support+b@kefu.example")
    assert froms.get("new") is None
    entity = {"addresses": ["in@demo.example"], "from_address": ""}
    live.apply(config_record("demo", "channel", "email", entity, "admin"))
    assert froms["demo"] == "in@demo.example"
    entity["from_address"] = "reply@demo.example"
    live.apply(config_record("demo", "channel", "email", entity, "admin", 10**13))
    assert froms["demo"] == "reply@demo.example"
    live.apply(config_record("new", "tenant", "-", {"name": "New"}, "ops"))
    assert froms["new"] == "support+new@kefu.example"


def test_reply_headers_thread_to_the_customer_message() -> None:
    reply = sample_reply()
    msg = build_reply(reply, "help@demo.test", "alice@x", "My order", "m2@x", ("m1@x",), "h.test")
    assert msg["Message-ID"] == f"<{reply.event_id}@h.test>"
    assert msg["In-Reply-To"] == "<m2@x>"
    assert msg["References"] == "<m1@x> <m2@x>"
    assert msg["Subject"] == "Re: My order"
    assert msg.get_content().strip() == reply.text.strip()


def png(width: int = 40, height: int = 30) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(out, "PNG")
    return out.getvalue()


PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
EXE = b"MZ\x90\x00" + b"\x00" * 400


def with_files(msg: EmailMessage, *files: tuple[str, bytes, str]) -> EmailMessage:
    for name, data, mime in files:
        maintype, _, subtype = mime.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg


def inline_image_mail(message_id: str, sender: str = "alice@example.com") -> EmailMessage:
    """An HTML mail showing an image by ``cid:`` (multipart/related), as mail apps send a
    pasted screenshot."""
    msg = mail("", html='<p>This error:</p><img src="cid:shot1@x">', message_id=message_id)
    msg.replace_header("From", f"Alice <{sender}>")
    html_part = msg.get_body(preferencelist=("html",))
    assert isinstance(html_part, EmailMessage)
    html_part.add_related(png(), maintype="image", subtype="png", cid="<shot1@x>")
    return msg


def test_files_of_a_mail_are_its_non_text_parts() -> None:
    # A photo alone is a message: no text, one file.
    photo_only = with_files(mail(""), ("IMG_1.png", png(), "image/png"))
    parsed = parse_mail(photo_only.as_bytes())
    assert parsed.text == "" and [(f.name, f.inline) for f in parsed.files] == [
        ("IMG_1.png", False)
    ]
    # A bare PDF as the whole mail (no multipart) too.
    bare = parse_mail(b"From: a@x.com\r\nContent-Type: application/pdf\r\n\r\n" + PDF)
    assert bare.text == "" and bare.files[0].data.startswith(b"%PDF")
    # Text with an HTML alternative and a PDF: the alternative is not a file.
    both = with_files(
        mail("See attached", html="<p>See attached</p>"), ("a.pdf", PDF, "application/pdf")
    )
    parsed = parse_mail(both.as_bytes())
    assert parsed.text == "See attached" and [f.name for f in parsed.files] == ["a.pdf"]
    # A text file attached is a file, not the body.
    notes = with_files(mail("hi"), ("notes.txt", b"line 1\n", "text/plain"))
    assert [f.name for f in parse_mail(notes.as_bytes()).files] == ["notes.txt"]
    # An inline cid: image of an HTML mail, the HTML's text kept.
    parsed = parse_mail(inline_image_mail("i@x").as_bytes())
    assert parsed.text == "This error:"
    assert [(f.inline, f.data[:4]) for f in parsed.files] == [(True, b"\x89PNG")]


class _Publisher:
    def __init__(self) -> None:
        self.published: list[Command] = []

    async def publish(self, command: Command) -> None:
        self.published.append(command)


def test_handler_drops_refused_files_and_refuses_a_mail_with_nothing_left(
    pipeline: Settings, tmp_path: Path
) -> None:
    """The listener's DATA step with the email channel's own size limit."""

    async def run() -> tuple[list[str], list[Command]]:
        client = aioredis.Redis.from_url(pipeline.redis.dsn)
        publisher = _Publisher()
        handler = EmailHandler(
            publisher,
            ThreadStore(client),
            Mailboxes(frozenset({"demo"}), {"help@demo.test": "demo"}),
            blobs=LocalBlobStore(tmp_path / "blobs"),
            policy=AttachmentPolicy(max_bytes={"*": 10 * 1024 * 1024, "email": 2000}),
        )
        big_pdf = PDF + b"%" * 3000
        mails = [
            with_files(mail("text and a pdf"), ("ok.pdf", PDF, "application/pdf")),
            with_files(
                mail("text stays"),
                ("setup.exe", EXE, "application/octet-stream"),
                ("big.pdf", big_pdf, "application/pdf"),
            ),
            with_files(mail(""), ("photo.jpg", EXE, "image/jpeg")),  # an .exe in disguise
        ]
        replies = []
        for n, msg in enumerate(mails):
            msg.replace_header("Message-ID", f"<h{n}-{uuid.uuid4().hex}@example.com>")
            envelope = Envelope()
            envelope.content = msg.as_bytes()
            envelope.rcpt_tos = ["help@demo.test"]
            replies.append(await handler.handle_DATA(None, None, envelope))  # type: ignore[arg-type]
        await client.aclose()
        return replies, publisher.published

    replies, published = asyncio.run(run())
    assert replies[0] == "250 OK"
    assert replies[1].startswith("250 OK; attachments not accepted: setup.exe: file type")
    assert "big.pdf: attachment over 2000 bytes (the email limit)" in replies[1]
    assert replies[2].startswith("550 5.6.1 ") and "photo.jpg: file type not allowed" in replies[2]
    messages = [c for c in published if isinstance(c, ReceiveMessage)]
    assert [(m.text, [a.name for a in m.attachments]) for m in messages] == [
        ("text and a pdf", ["ok.pdf"]),
        ("text stays", []),
    ]
    assert messages[0].attachments[0].mime_type == "application/pdf"


def test_reply_attachments_are_mime_attachments() -> None:
    reply = dataclasses.replace(sample_reply(), attachments=())
    listed = [(_att("r.pdf", "application/pdf"), PDF), (_att("p.png", "image/png"), png())]
    msg = build_reply(reply, "help@demo.test", "a@x", "Hi", "", (), "h.test", listed)
    assert msg.get_content_type() == "multipart/mixed"
    parts = [(p.get_filename(), p.get_content_type()) for p in msg.iter_attachments()]
    assert parts == [("r.pdf", "application/pdf"), ("p.png", "image/png")]
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None and body.get_content().strip() == reply.text.strip()


def _att(name: str, mime: str) -> Attachment:
    return Attachment(
        kind="file", mime_type=mime, size=1, name=name, sha256="0" * 64, storage_key="k"
    )


_HEADERS = st.sampled_from(
    [
        b"From: a@x.com\r\n",
        b"From: =?utf-8?b?5a6i5oi3?= <k@x.cn>\r\n",
        b"From: <>\r\n",
        b"Message-ID: <id@x>\r\n",
        b"In-Reply-To: <p@x>\r\n",
        b"References: <a@x> junk <b@x\r\n",
        b"Content-Type: multipart/alternative; boundary=B\r\n",
        b"Content-Type: text/html; charset=no-such-charset\r\n",
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n",
        b"Auto-Submitted: auto-replied\r\n",
        b"Subject: \xff\xfe bad bytes\r\n",
    ]
)
_BODIES = st.sampled_from(
    [
        b"hello\r\n",
        b"--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n--B--\r\n",
        b"--B\r\n\r\n",
        b"aGVsbG8=\r\n",
        b"not base64 !!!\r\n",
        b"<p>x</p><script>y\r\n",
        b"=E4=BD=A0=E5=A5=BD=\r\n",
        b"> quoted only\r\n",
    ]
)


@hypothesis.settings(max_examples=300, deadline=None, database=None)
@hypothesis.given(
    headers=st.lists(_HEADERS, max_size=8),
    separator=st.sampled_from([b"\r\n", b"", b"\n"]),
    body=st.lists(_BODIES | st.binary(max_size=64), max_size=4),
)
def test_any_mail_is_parsed_or_rejected_with_a_5xx(
    headers: list[bytes], separator: bytes, body: list[bytes]
) -> None:
    raw = b"".join(headers) + separator + b"".join(body)
    try:
        parsed = parse_mail(raw)
    except MailRejected as rejected:
        assert rejected.reply[:3] in ("550", "554"), rejected.reply
        return
    assert (parsed.text.strip() or parsed.files) and "@" in parsed.sender and parsed.message_id


# --------------------------------------------------------------------- integration


@pytest.fixture(scope="module")
def relay(pipeline: Settings) -> Iterator[FakeSmtpRelay]:
    fake = FakeSmtpRelay(pipeline.email.relay_port).start()
    try:
        yield fake
    finally:
        fake.stop()


def send(settings: Settings, message: EmailMessage) -> None:
    with smtplib.SMTP("127.0.0.1", settings.email.port, timeout=30) as client:
        client.send_message(message)


def history(settings: Settings, tenant: str, conversation: str) -> list[dict[str, object]]:
    client = redis.Redis.from_url(settings.redis.dsn, decode_responses=True)
    return [json.loads(m) for m in client.lrange(messages_key(tenant, conversation), 0, -1)]


def customer_messages(settings: Settings, conversation: str) -> int:
    return sum(1 for m in history(settings, "demo", conversation) if m["role"] == "customer")


def test_mail_gets_a_threaded_reply_and_replies_stay_in_the_conversation(
    pipeline: Settings, relay: FakeSmtpRelay
) -> None:
    who = f"c-{uuid.uuid4().hex[:8]}@example.com"
    first = f"{uuid.uuid4().hex}@example.com"
    send(pipeline, mail("Where is my order?", sender=who, message_id=first))
    conversation = conversation_id_for("demo", "email", who)

    replies = wait_for(lambda: relay.to(who), timeout=60, what="email reply at the relay")
    answer = replies[0]
    assert answer["In-Reply-To"] == f"<{first}>"
    assert answer["References"] == f"<{first}>"
    assert answer["Subject"] == "Re: My order"
    assert answer["From"] == "help@demo.test"
    assert answer["Message-ID"].endswith("@kefu.localhost>")
    assert "Account > Orders" in answer.get_content()

    # The customer answers our reply: a new thread root for the sender fallback, so
    # only the Message-ID map can put it in the same conversation.
    second = f"{uuid.uuid4().hex}@example.com"
    follow_up = mail(
        "Thanks! And how do I get a refund?",
        sender=who,
        message_id=second,
        in_reply_to=answer["Message-ID"],
        references=f"{answer['Message-ID']}",
    )
    send(pipeline, follow_up)
    replies = wait_for(
        lambda: relay.to(who) if len(relay.to(who)) >= 2 else None, timeout=60, what="reply 2"
    )
    assert replies[1]["In-Reply-To"] == f"<{second}>"
    assert replies[1]["References"] == f"{answer['Message-ID']} <{second}>"
    # The Redis projection runs beside delivery: wait for it, not for the mail.
    wait_for(lambda: customer_messages(pipeline, conversation) >= 2, what="2 in Redis")

    # A redelivered mail is not a second message: after a marker mail is answered,
    # the conversation still has one customer message per distinct Message-ID.
    send(pipeline, mail("Where is my order?", sender=who, message_id=first))
    third = f"{uuid.uuid4().hex}@example.com"
    send(pipeline, mail("hello", sender=who, message_id=third, in_reply_to=f"<{second}>"))
    wait_for(lambda: len(relay.to(who)) >= 3, timeout=60, what="third reply")
    # One partition per conversation: the copy of the first mail came before the third.
    wait_for(lambda: customer_messages(pipeline, conversation) >= 3, what="3 in Redis")
    assert customer_messages(pipeline, conversation) == 3
    assert len(relay.to(who)) == 3


def test_bad_mail_is_refused_and_nothing_is_published(pipeline: Settings) -> None:
    before = asyncio.run(customer_messages_published(pipeline))
    with smtplib.SMTP("127.0.0.1", pipeline.email.port, timeout=30) as client:
        malformed = b"From: a@x.com\r\nContent-Type: multipart/mixed\r\n\r\nhi\r\n"
        with pytest.raises(smtplib.SMTPDataError) as bad:
            client.sendmail("a@x.com", ["help@demo.test"], malformed)
        assert bad.value.smtp_code == 550
        assert b"malformed MIME" in bad.value.smtp_error

        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("a@x.com", ["nobody@demo.test"], mail().as_bytes())
        assert refused.value.recipients["nobody@demo.test"][0] == 550

        client.rset()
        huge = mail("x" * (pipeline.email.max_message_bytes + 1000)).as_bytes()
        with pytest.raises(smtplib.SMTPException) as too_big:
            client.sendmail("a@x.com", ["help@demo.test"], huge)
        assert "552" in str(too_big.value)
    assert asyncio.run(customer_messages_published(pipeline)) == before


def test_an_address_added_in_the_config_routes_mail_without_a_restart(
    pipeline: Settings,
) -> None:
    """The running ``kefu smtp`` follows the config topic: an address saved for a tenant
    (here written onto the topic as /admin writes it) is accepted at the next RCPT and
    its mail is that tenant's; an address nobody configured is refused as before."""
    from aiokafka import AIOKafkaProducer

    from connectors.config_log import config_record, publish_config
    from schemas.topics import TopicNames

    tenant = f"mail{uuid.uuid4().hex[:6]}"
    address = f"help@{tenant}.example"

    def accepted(recipient: str) -> bool:
        with smtplib.SMTP("127.0.0.1", pipeline.email.port, timeout=30) as client:
            client.ehlo()
            client.mail("who@example.com")
            code, _ = client.rcpt(recipient)
            return code == 250

    assert not accepted(address)

    async def publish() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=pipeline.kafka.servers, acks="all")
        await producer.start()
        topic = TopicNames(pipeline.topic_prefix).config
        try:
            await publish_config(producer, topic, config_record(tenant, "tenant", "-", {}, "t"))
            entity = config_record(tenant, "channel", "email", {"addresses": [address]}, "t")
            await publish_config(producer, topic, entity)
        finally:
            await producer.stop()

    asyncio.run(publish())
    wait_for(lambda: accepted(address), 10, "the new address live in kefu smtp")
    who = f"c-{uuid.uuid4().hex[:8]}@example.com"
    message = mail("Do you ship to Hangzhou?", sender=who, to=address, message_id=f"{who}.1")
    send(pipeline, message)
    conversation = conversation_id_for(tenant, "email", who)
    wait_for(
        lambda: any(m["role"] == "customer" for m in history(pipeline, tenant, conversation)),
        60,
        "the mail as the tenant's message",
    )
    assert not accepted(f"sales@{tenant}.example")  # unknown: refused as before
    assert accepted("help@demo.test")  # the environment's seed still routes


def test_relay_failures_are_retried_then_reported(pipeline: Settings, relay: FakeSmtpRelay) -> None:
    async def run() -> tuple[str, int, str, int]:
        client = aioredis.Redis.from_url(pipeline.redis.dsn)
        store = ThreadStore(client)
        conversation = str(uuid.uuid4())
        reply = dataclasses.replace(
            sample_reply(),
            conversation_id=conversation,
            tenant_id="demo",
            channel="email",
            event_id=str(uuid.uuid4()),
            attachments=(),  # the sample's file is in no store: the retries are the point
        )
        who = f"r-{uuid.uuid4().hex[:8]}@example.com"
        await store.remember_inbound("demo", conversation, "q1@x", Thread(who, "Help", "q1@x", ()))
        sender = EmailSender(
            store,
            RelayConfig(
                "127.0.0.1",
                pipeline.email.relay_port,
                {"demo": from_address(pipeline, "demo")},
                attempts=3,
                backoff=0.01,
            ),
        )
        relay.fail_next("451 4.3.0 try later")
        ok = await sender.send(reply)
        relay.fail_next("554 5.7.1 rejected")
        bad = await sender.send(reply)
        # Our Message-ID is remembered for the conversation before sending.
        assert await store.conversation_of("demo", [f"{reply.event_id}@kefu.localhost"]) == (
            conversation
        )
        await client.aclose()
        return ok.status, ok.attempts, bad.status, bad.attempts

    assert asyncio.run(run()) == ("delivered", 2, "failed", 1)


def test_a_flooding_sender_is_told_to_retry_and_its_retry_is_accepted(
    pipeline: Settings,
) -> None:
    limits = pipeline.email.rate_limits
    who = f"flood-{uuid.uuid4().hex[:8]}@example.com"
    to = "support+acme@kefu.test"  # inbound_local+tenant: acme, a human-only tenant
    accepted: list[str] = []
    refused: smtplib.SMTPDataError | None = None
    with smtplib.SMTP("127.0.0.1", pipeline.email.port, timeout=30) as client:
        for n in range(int(limits.client_burst) + 15):  # bounded: the burst and some
            message_id = f"flood-{n}-{who}"
            try:
                client.send_message(mail(f"mail {n}", sender=who, to=to, message_id=message_id))
            except smtplib.SMTPDataError as exc:
                refused = exc
                break
            accepted.append(message_id)
        assert refused is not None, "the sender's bucket never ran out"
        assert refused.smtp_code == 451 and b"4.7.1" in refused.smtp_error, refused
        assert len(accepted) >= limits.client_burst
        # Another sender is not held back by this one.
        other = f"other-{uuid.uuid4().hex[:8]}@example.com"
        client.send_message(mail("hello", sender=other, to=to, message_id=f"o-{other}"))
    # The refused mail, sent again once the bucket has a token, goes through.
    refused_id = f"flood-{len(accepted)}-{who}"
    deadline = 1.5 / limits.client_per_second + 10
    wait_for(lambda: _sent(pipeline, who, to, refused_id), deadline, "the retry accepted")
    accepted.append(refused_id)

    conversation = conversation_id_for("acme", "email", who)

    def projected() -> list[dict[str, object]]:
        return [m for m in history(pipeline, "acme", conversation) if m["role"] == "customer"]

    wait_for(lambda: len(projected()) >= len(accepted), 60, "every accepted mail projected")
    # Each accepted mail once, the refused one too (after its retry).
    texts = sorted(str(m["text"]) for m in projected())
    assert texts == sorted(f"mail {i.split('-')[1]}" for i in accepted)
    # Mail's buckets are its own, never the gateway's (one key, one refill rate).
    with redis.Redis.from_url(pipeline.redis.dsn) as client:
        assert client.exists("kefu-rl-mail:acme:tenant", f"kefu-rl-mail:acme:client:{who}") == 2
        assert not client.exists(f"kefu-rl:acme:client:{who}")


def _sent(settings: Settings, sender: str, to: str, message_id: str) -> bool:
    n = message_id.split("-")[1]
    try:
        send(settings, mail(f"mail {n}", sender=sender, to=to, message_id=message_id))
    except smtplib.SMTPDataError as exc:
        assert exc.smtp_code == 451, exc
        return False
    return True


def attachments_in(settings: Settings, conversation: str) -> list[dict[str, Any]] | None:
    found = [
        a
        for m in history(settings, "demo", conversation)
        if m["role"] == "customer"
        for a in cast(list[dict[str, Any]], m.get("attachments", []))
    ]
    return found or None


def test_a_mail_whose_only_content_is_a_photo_is_accepted(pipeline: Settings) -> None:
    who = f"p-{uuid.uuid4().hex[:8]}@example.com"
    photo = with_files(
        mail("", sender=who, message_id=f"{uuid.uuid4().hex}@example.com"),
        ("IMG_0042.png", png(200, 100), "image/png"),
    )
    send(pipeline, photo)  # 250: smtplib raises on anything else
    conversation = conversation_id_for("demo", "email", who)
    (image,) = wait_for(lambda: attachments_in(pipeline, conversation), what="the photo")
    assert (image["kind"], image["mime_type"], image["name"]) == (
        "image",
        "image/png",
        "IMG_0042.png",
    )
    assert (image["width"], image["height"]) == (200, 100)
    assert image["storage_key"].startswith(f"demo/{conversation}/")
    store = blob_store(pipeline)
    assert asyncio.run(store.exists(image["storage_key"]))
    # The thumbnail is the worker's, made once the message is on the log.
    thumbnail = image["thumbnail_key"]
    wait_for(lambda: asyncio.run(store.exists(thumbnail)) or None, what="the thumbnail")


def test_an_inline_image_is_an_attachment_beside_the_text(pipeline: Settings) -> None:
    who = f"i-{uuid.uuid4().hex[:8]}@example.com"
    send(pipeline, inline_image_mail(f"{uuid.uuid4().hex}@example.com", sender=who))
    conversation = conversation_id_for("demo", "email", who)
    (image,) = wait_for(lambda: attachments_in(pipeline, conversation), what="the inline image")
    assert image["kind"] == "image" and image["mime_type"] == "image/png"
    texts = [m["text"] for m in history(pipeline, "demo", conversation) if m["role"] == "customer"]
    assert texts == ["This error:"]


def test_a_mail_with_nothing_acceptable_is_refused(pipeline: Settings) -> None:
    before = asyncio.run(customer_messages_published(pipeline))
    exe_only = with_files(mail(""), ("invoice.pdf", EXE, "application/pdf"))
    with (
        smtplib.SMTP("127.0.0.1", pipeline.email.port, timeout=30) as client,
        pytest.raises(smtplib.SMTPDataError) as refused,
    ):
        client.send_message(exe_only)
    assert refused.value.smtp_code == 550
    assert (
        b"5.6.1" in refused.value.smtp_error
        and b"file type not allowed" in refused.value.smtp_error
    )
    assert asyncio.run(customer_messages_published(pipeline)) == before


def test_a_reply_with_an_attachment_reaches_the_relay_as_mime(
    pipeline: Settings, relay: FakeSmtpRelay, tmp_path: Path
) -> None:
    async def run() -> list[str]:
        client = aioredis.Redis.from_url(pipeline.redis.dsn)
        store = ThreadStore(client)
        blobs = LocalBlobStore(tmp_path / "blobs")
        conversation = str(uuid.uuid4())
        kept = [
            await accept(
                blobs, data, name=name, tenant="demo", conversation=conversation,
                channel="console", policy=AttachmentPolicy(),
            )
            for name, data in (("label.pdf", PDF), ("map.png", png()))
        ]  # fmt: skip
        who = f"o-{uuid.uuid4().hex[:8]}@example.com"
        await store.remember_inbound("demo", conversation, "q@x", Thread(who, "Help", "q@x", ()))
        config = RelayConfig(
            "127.0.0.1", pipeline.email.relay_port, {"demo": "help@demo.test"}, backoff=0.01
        )
        sender = EmailSender(store, config, blobs=blobs)
        reply = dataclasses.replace(
            sample_reply(),
            conversation_id=conversation,
            tenant_id="demo",
            channel="email",
            event_id=str(uuid.uuid4()),
            attachments=tuple(kept),
        )
        outcomes = [await sender.send(reply)]
        gone = dataclasses.replace(kept[0], storage_key=f"demo/{conversation}/{'e' * 64}")
        missing = dataclasses.replace(reply, event_id=str(uuid.uuid4()), attachments=(gone,))
        outcomes.append(await sender.send(missing))
        outcomes.append(await EmailSender(store, config).send(reply))
        await client.aclose()
        assert len(relay.received_by(who)) == 1  # the failed ones sent nothing
        (received,) = relay.received_by(who)
        files = [(p.filename, p.content_type, p.data) for p in received.attachments]
        assert files == [
            ("label.pdf", "application/pdf", PDF),
            ("map.png", "image/png", (await blobs.get(kept[1].storage_key)).data),
        ]
        assert received.message.get_content_type() == "multipart/mixed"
        return [f"{o.status}: {o.detail}" for o in outcomes]

    assert asyncio.run(run()) == [
        "delivered: SMTP 250",
        "failed: attachment missing: label.pdf",
        "failed: attachments need a blob store",
    ]
