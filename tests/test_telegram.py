"""Telegram: update parsing as pure functions, the sender against the local fake Bot
API (text, then files as multipart uploads), and the webhook through the running
pipeline (reply via sendMessage, redelivered updates not duplicated, bad requests
refused with nothing published, customers' photos, documents and voice notes stored
as attachments, a file that is gone reported while its caption goes on)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis
from PIL import Image

from connectors.attachments import AttachmentPolicy, accept
from connectors.blobs import LocalBlobStore
from connectors.identity import command_id_for, conversation_id_for
from connectors.telegram import TelegramSender, chunks, notice_for, parse_update, send_method
from kefu.files import blob_store
from kefu.settings import Settings
from schemas.keys import conversation_key, messages_key
from schemas.records import Attachment, ReplyProduced
from tests.conftest import wait_for
from tests.fake_telegram import FakeTelegram
from tests.test_pipeline import customer_messages_published

SECRET = {"X-Telegram-Bot-Api-Secret-Token": "tg-secret"}


def update(update_id: int, chat_id: int, message_id: int, text: str | None) -> dict[str, Any]:
    message: dict[str, Any] = {
        "message_id": message_id,
        "date": 1700000000,
        "chat": {"id": chat_id, "type": "private"},
        "from": {"id": chat_id, "is_bot": False, "first_name": "Ann", "language_code": "en"},
    }
    if text is not None:
        message["text"] = text
    return {"update_id": update_id, "message": message}


# ---------------------------------------------------------------- pure


def test_parse_update_keys_by_chat_and_message() -> None:
    update_id, command, file = parse_update("t", json.dumps(update(5, 42, 7, "hi")).encode())
    assert update_id == 5 and command is not None and file is None
    assert command.customer_id == "42" and command.channel == "telegram"
    assert command.conversation_id == conversation_id_for("t", "telegram", "42")
    assert command.command_id == command_id_for("t", "telegram", "42/7")
    assert command.language == "en"
    # A redelivery (same update) is the same command; so is the same message id.
    _, again, _ = parse_update("t", json.dumps(update(5, 42, 7, "hi")).encode())
    assert again is not None and again.command_id == command.command_id


def test_parse_update_ignores_non_text_and_refuses_garbage() -> None:
    assert parse_update("t", json.dumps(update(6, 42, 8, None)).encode()) == (6, None, None)
    sticker = update(7, 42, 9, None)
    sticker["message"]["sticker"] = {"file_id": "s1", "width": 512, "height": 512}
    assert parse_update("t", json.dumps(sticker).encode()) == (7, None, None)
    assert parse_update("t", b'{"update_id": 9, "edited_message": {}}') == (9, None, None)
    for bad in (
        b"{nope",
        b"[]",
        b'{"update_id": "x"}',
        b'{"update_id": 1, "message": 3}',
        b'{"update_id": 1, "message": {"message_id": 1, "chat": {}, "text": "x"}}',
        json.dumps(update(1, 42, 1, "")).encode(),
        json.dumps(update(1, 42, 1, "x" * 8001)).encode(),
    ):
        with pytest.raises(ValueError):
            parse_update("t", bad)


def test_chunks_respect_the_limit() -> None:
    assert chunks("a" * 9000) == ["a" * 4096, "a" * 4096, "a" * 808]
    assert chunks("short") == ["short"]


def with_file(
    body: dict[str, Any], kind: str, media: Any, caption: str | None = None
) -> dict[str, Any]:
    """``body`` (an update without text) carrying a file, as Telegram sends one."""
    body["message"][kind] = media
    if caption is not None:
        body["message"]["caption"] = caption
    return body


def photo_sizes(file_id: str) -> list[dict[str, Any]]:
    """A photo as Telegram lists it: one size per resolution, the largest last."""
    return [
        {"file_id": f"{file_id}-s", "file_unique_id": "s", "width": 90, "height": 60},
        {"file_id": file_id, "file_unique_id": "l", "width": 1280, "height": 853},
        {"file_id": f"{file_id}-m", "file_unique_id": "m", "width": 320, "height": 213},
    ]


def test_parse_update_takes_files_with_the_caption_as_text() -> None:
    photo = with_file(update(1, 42, 2, None), "photo", photo_sizes("big"), "my receipt")
    _, command, file = parse_update("t", json.dumps(photo).encode())
    assert command is not None and command.text == "my receipt" and command.attachments == ()
    assert file is not None and (file.kind, file.file_id, file.name) == (
        "photo",
        "big",
        "photo.jpg",
    )

    voice = with_file(update(2, 42, 3, None), "voice", {"file_id": "v", "duration": 7})
    _, command, file = parse_update("t", json.dumps(voice).encode())
    assert command is not None and command.text == ""  # a voice note alone is a message
    assert file is not None and file.kind == "voice" and file.duration_ms == 7000

    doc = {"file_id": "d", "file_name": "invoice.pdf", "mime_type": "application/pdf"}
    body = with_file(update(3, 42, 4, None), "document", {**doc, "file_size": 1234}, "  ")
    _, command, file = parse_update("t", json.dumps(body).encode())
    assert command is not None and command.text == ""
    assert file is not None and (file.name, file.size) == ("invoice.pdf", 1234)

    audio = {"file_id": "a", "duration": 180, "title": "song", "performer": "x"}
    _, _, file = parse_update(
        "t", json.dumps(with_file(update(4, 42, 5, None), "audio", audio)).encode()
    )
    assert file is not None and (file.kind, file.name, file.duration_ms) == (
        "audio",
        "song",
        180000,
    )
    video = {"file_id": "m", "duration": 2, "width": 640, "height": 360}
    _, _, file = parse_update(
        "t", json.dumps(with_file(update(5, 42, 6, None), "video", video)).encode()
    )
    assert file is not None and file.kind == "video"

    for bad_media in (
        with_file(update(1, 42, 1, None), "photo", []),
        with_file(update(1, 42, 1, None), "document", {"file_name": "no id"}),
        with_file(update(1, 42, 1, None), "voice", "v"),
        with_file(update(1, 42, 1, None), "document", {"file_id": "d"}, "x" * 8001),
    ):
        with pytest.raises(ValueError):
            parse_update("t", json.dumps(bad_media).encode())


def _attachment(kind: str, mime: str, size: int = 100) -> Attachment:
    return Attachment(
        kind=kind, mime_type=mime, size=size, name="f", sha256="0" * 64, storage_key="k"
    )


def test_send_method_by_type() -> None:
    assert send_method(_attachment("image", "image/jpeg")) == ("sendPhoto", "photo")
    assert send_method(_attachment("image", "image/gif")) == ("sendDocument", "document")
    assert send_method(_attachment("image", "image/png", 11 * 1024 * 1024))[0] == "sendDocument"
    assert send_method(_attachment("audio", "audio/ogg")) == ("sendVoice", "voice")
    assert send_method(_attachment("audio", "audio/mpeg")) == ("sendAudio", "audio")
    assert send_method(_attachment("audio", "audio/amr"))[0] == "sendDocument"
    assert send_method(_attachment("video", "video/mp4")) == ("sendVideo", "video")
    assert send_method(_attachment("file", "application/pdf")) == ("sendDocument", "document")
    assert "too large" in notice_for(413) and "not accepted" in notice_for(415)
    assert "could not be downloaded" in notice_for(None)


def jpeg(width: int = 64, height: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
# Enough of an OGG page for the sniffer ("OggS" + an Opus head): a voice note's type.
OGG = b"OggS\x00\x02" + b"\x00" * 20 + b"\x01\x13OpusHead\x01\x01" + b"\x00" * 200


# ---------------------------------------------------------------- sender vs the fake API


def _reply(chat: str, text: str = "hello", tenant: str = "t") -> ReplyProduced:
    return ReplyProduced(
        event_id=str(uuid.uuid4()),
        conversation_id=conversation_id_for(tenant, "telegram", chat),
        tenant_id=tenant,
        seq=2,
        occurred_at=0,
        in_reply_to="m",
        channel="telegram",
        text=text,
        author="ai",
        responder="offline",
        confidence=1.0,
        customer_id=chat,
    )


@pytest.fixture
def lone_fake() -> Iterator[FakeTelegram]:
    fake = FakeTelegram(tokens={"1:abc"}).start()
    try:
        yield fake
    finally:
        fake.stop()


def test_sender_retries_splits_and_reports_failures(lone_fake: FakeTelegram) -> None:
    async def run() -> list[tuple[str, int]]:
        sender = TelegramSender(
            {"t": "1:abc", "bad": "2:nope"}, lone_fake.base_url, attempts=3, backoff=0.01
        )
        out = [await sender.send(_reply("100"))]
        lone_fake.fail_next, lone_fake.fail_with, lone_fake.retry_after = 2, 429, 0
        out.append(await sender.send(_reply("100", "after 429s")))
        out.append(await sender.send(_reply("100", "x" * 5000)))  # two messages
        lone_fake.fail_next, lone_fake.fail_with = 5, 500
        out.append(await sender.send(_reply("100", "never")))
        lone_fake.fail_next = 0
        out.append(await sender.send(_reply("100", tenant="bad")))  # 401: not retried
        out.append(await sender.send(_reply("100", tenant="nobody")))
        await sender.close()
        return [(o.status, o.attempts) for o in out]

    assert asyncio.run(run()) == [
        ("delivered", 1),
        ("delivered", 3),
        ("delivered", 2),
        ("failed", 3),
        ("failed", 1),
        ("failed", 0),
    ]
    texts = [s.text for s in lone_fake.sent_to(100)]
    assert texts == ["hello", "after 429s", "x" * 4096, "x" * 904]
    assert all(s.chat_id == 100 for s in lone_fake.sent)  # numeric chat ids stay numbers


def test_sender_uploads_attachments_after_the_text(lone_fake: FakeTelegram, tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    conversation = conversation_id_for("t", "telegram", "200")

    async def run() -> list[tuple[str, str]]:
        policy = AttachmentPolicy()
        kept = {
            name: await accept(
                store, data, name=name, tenant="t", conversation=conversation,
                channel="telegram", policy=policy, duration_ms=duration,
            )
            for name, data, duration in (
                ("receipt.jpg", jpeg(), 0),
                ("invoice.pdf", PDF, 0),
                ("note.ogg", OGG, 4000),
            )
        }  # fmt: skip
        sender = TelegramSender({"t": "1:abc"}, lone_fake.base_url, backoff=0.01, store=store)
        reply = dataclasses.replace(_reply("200", "Here you are"), attachments=tuple(kept.values()))
        first = await sender.send(reply)
        only_files = await sender.send(dataclasses.replace(reply, text="", event_id="e2"))
        missing = dataclasses.replace(
            kept["invoice.pdf"], storage_key=f"t/{conversation}/{'f' * 64}", name="gone.pdf"
        )
        gone = await sender.send(dataclasses.replace(reply, attachments=(missing,)))
        blobless = await TelegramSender({"t": "1:abc"}, lone_fake.base_url).send(reply)
        await sender.close()
        return [(o.status, o.detail) for o in (first, only_files, gone, blobless)]

    outcomes = asyncio.run(run())
    assert outcomes[0] == ("delivered", "sendMessage,sendPhoto,sendDocument,sendVoice")
    assert outcomes[1] == ("delivered", "sendPhoto,sendDocument,sendVoice")
    # A file that is gone fails the reply before anything is sent: never half a reply.
    assert outcomes[2] == ("failed", "attachment missing: gone.pdf")
    assert outcomes[3] == ("failed", "attachments need a blob store")
    assert [s.text for s in lone_fake.sent_to(200)] == ["Here you are"]
    sent = lone_fake.files_sent_to(200)
    assert [(s.method, s.field, s.content_type) for s in sent[:3]] == [
        ("sendPhoto", "photo", "image/jpeg"),
        ("sendDocument", "document", "application/pdf"),
        ("sendVoice", "voice", "audio/ogg"),
    ]
    assert len(sent) == 6
    assert sent[0].filename == "receipt.jpg" and sent[0].data[:2] == b"\xff\xd8"
    assert sent[1].data == PDF and sent[1].token == "1:abc"
    assert sent[2].params == {"duration": "4"}


# ---------------------------------------------------------------- through the pipeline


def gateway(settings: Settings) -> httpx.Client:
    g = settings.gateway
    return httpx.Client(base_url=f"http://{g.host}:{g.port}", timeout=15)


def state(settings: Settings, tenant: str, chat: int) -> dict[str, Any]:
    client = redis.Redis.from_url(settings.redis.dsn, decode_responses=True)
    key = conversation_key(tenant, conversation_id_for(tenant, "telegram", str(chat)))
    return cast(dict[str, Any], client.hgetall(key))


def chat_id() -> int:
    return random.randint(10**9, 10**10)


def uid() -> int:
    """A fresh update id (the gateway remembers the ones it has published)."""
    return random.randint(10**6, 10**12)


def test_text_update_gets_a_reply_through_send_message(
    pipeline: Settings, fake_telegram: FakeTelegram
) -> None:
    chat = chat_id()
    with gateway(pipeline) as http:
        response = http.post(
            "/v1/telegram/wx/webhook",
            json=update(uid(), chat, 1, "How do I get a refund?"),
            headers=SECRET,
        )
    assert response.status_code == 200, response.text
    assert response.json()["published"] is True
    sent = wait_for(lambda: fake_telegram.sent_to(chat), what="sendMessage")
    assert sent[0].token == "1001:wx-bot" and sent[0].text
    wait_for(lambda: state(pipeline, "wx", chat).get("last_delivery"), what="receipt")


def test_redelivered_update_is_not_a_second_message(
    pipeline: Settings, fake_telegram: FakeTelegram
) -> None:
    chat = chat_id()
    first = update(uid(), chat, 10, "where is my order")
    with gateway(pipeline) as http:
        answers = [
            http.post("/v1/telegram/wx/webhook", json=first, headers=SECRET).json()
            for _ in range(3)
        ]
        # Same message under a new update id (e.g. after our Redis lost the mark).
        http.post(
            "/v1/telegram/wx/webhook",
            json={**first, "update_id": first["update_id"] + 1},
            headers=SECRET,
        )
        http.post("/v1/telegram/wx/webhook", json=update(uid(), chat, 11, "thanks"), headers=SECRET)
    assert [a["published"] for a in answers] == [True, False, False]
    wait_for(lambda: state(pipeline, "wx", chat).get("messages") == "2", what="two messages")
    wait_for(lambda: len(fake_telegram.sent_to(chat)) >= 2, what="two replies")
    assert state(pipeline, "wx", chat)["messages"] == "2"


@pytest.mark.parametrize(
    ("path", "headers", "body", "status"),
    [
        ("/v1/telegram/wx/webhook", {}, b"{}", 401),
        ("/v1/telegram/wx/webhook", {"X-Telegram-Bot-Api-Secret-Token": "nope"}, b"{}", 403),
        ("/v1/telegram/wxh/webhook", SECRET, b"{}", 403),  # another tenant's secret
        ("/v1/telegram/demo/webhook", SECRET, b"{}", 404),  # no bot
        ("/v1/telegram/wx/webhook", SECRET, b"{not json", 400),
        ("/v1/telegram/wx/webhook", SECRET, b'{"update_id": "one"}', 400),
        ("/v1/telegram/wx/webhook", SECRET, b'{"update_id": 1, "message": []}', 400),
        ("/v1/telegram/wx/webhook", SECRET, b'{"pad": "' + b"x" * 20000 + b'"}', 413),
    ],
)
def test_bad_webhooks_are_refused_and_publish_nothing(
    pipeline: Settings, path: str, headers: dict[str, str], body: bytes, status: int
) -> None:
    before = asyncio.run(customer_messages_published(pipeline))
    with gateway(pipeline) as http:
        response = http.post(
            path, content=body, headers={**headers, "Content-Type": "application/json"}
        )
        health = http.get("/healthz")
    assert response.status_code == status, response.text
    assert response.json()["detail"]
    assert health.status_code == 200
    assert asyncio.run(customer_messages_published(pipeline)) == before


def test_non_text_update_is_acknowledged_not_published(pipeline: Settings) -> None:
    before = asyncio.run(customer_messages_published(pipeline))
    with gateway(pipeline) as http:
        response = http.post(
            "/v1/telegram/wx/webhook", json=update(uid(), chat_id(), 1, None), headers=SECRET
        )
    assert response.status_code == 200 and response.json()["published"] is False
    assert asyncio.run(customer_messages_published(pipeline)) == before


# ---------------------------------------------------------------- files through the pipeline

HUMAN = {"X-Telegram-Bot-Api-Secret-Token": "tg-secret-h"}  # wxh: no AI, nobody answers


def listed(settings: Settings, tenant: str, chat: int) -> list[dict[str, Any]]:
    """The conversation's messages as the Redis read model lists them."""
    client = redis.Redis.from_url(settings.redis.dsn, decode_responses=True)
    key = messages_key(tenant, conversation_id_for(tenant, "telegram", str(chat)))
    return [json.loads(m) for m in cast(list[str], client.lrange(key, 0, -1))]


def customer_files(settings: Settings, chat: int) -> list[dict[str, Any]] | None:
    for message in listed(settings, "wxh", chat):
        if message.get("role") == "customer" and message.get("attachments"):
            return [message]
    return None


def post_update(settings: Settings, body: dict[str, Any]) -> dict[str, Any]:
    with gateway(settings) as http:
        response = http.post("/v1/telegram/wxh/webhook", json=body, headers=HUMAN)
    assert response.status_code == 200, response.text
    return cast(dict[str, Any], response.json())


def test_photo_with_caption_becomes_an_image_attachment(
    pipeline: Settings, fake_telegram: FakeTelegram
) -> None:
    chat = chat_id()
    file_id = fake_telegram.add_file(jpeg(640, 480), "photos/file")
    body = with_file(update(uid(), chat, 1, None), "photo", photo_sizes(file_id), "my receipt")
    answer = post_update(pipeline, body)
    assert answer["published"] is True and "file_refused" not in answer
    message = wait_for(lambda: customer_files(pipeline, chat), what="the photo in Redis")[0]
    assert message["text"] == "my receipt"
    (image,) = message["attachments"]
    assert (image["kind"], image["mime_type"]) == ("image", "image/jpeg")
    assert (image["width"], image["height"]) == (640, 480) and image["thumbnail_key"]
    # The bytes are in the blob store, under the tenant and conversation.
    assert image["storage_key"].startswith(f"wxh/{answer['conversation_id']}/")
    assert asyncio.run(blob_store(pipeline).exists(image["storage_key"]))
    # The API shows it with a signed link.
    with gateway(pipeline) as http:
        shown = http.get(
            f"/v1/conversations/{answer['conversation_id']}",
            headers={"Authorization": "Bearer wxh-test-key"},
        )
    assert shown.status_code == 200, shown.text
    assert "/v1/files/" in shown.text


def test_document_and_voice_note_are_attachments(
    pipeline: Settings, fake_telegram: FakeTelegram
) -> None:
    chat = chat_id()
    doc_id = fake_telegram.add_file(PDF, "documents/file")
    document = {"file_id": doc_id, "file_name": "invoice.pdf", "file_size": len(PDF)}
    post_update(pipeline, with_file(update(uid(), chat, 1, None), "document", document))
    voice_id = fake_telegram.add_file(OGG, "voice/file")
    voice = {"file_id": voice_id, "duration": 9, "mime_type": "audio/ogg"}
    post_update(pipeline, with_file(update(uid(), chat, 2, None), "voice", voice))

    def both() -> list[dict[str, Any]] | None:
        found = [
            a
            for m in listed(pipeline, "wxh", chat)
            if m.get("role") == "customer"
            for a in m.get("attachments", [])
        ]
        return found if len(found) == 2 else None

    note, pdf = sorted(wait_for(both, what="document and voice in Redis"), key=lambda a: a["kind"])
    assert (pdf["kind"], pdf["mime_type"], pdf["name"]) == (
        "file",
        "application/pdf",
        "invoice.pdf",
    )
    assert (note["kind"], note["mime_type"], note["duration_ms"]) == ("audio", "audio/ogg", 9000)


def test_a_file_that_is_gone_keeps_the_caption_and_is_reported(
    pipeline: Settings, fake_telegram: FakeTelegram
) -> None:
    chat = chat_id()
    before = asyncio.run(customer_messages_published(pipeline))
    body = with_file(update(uid(), chat, 1, None), "photo", photo_sizes("expired"), "see photo")
    answer = post_update(pipeline, body)  # 200: Telegram must not retry it forever
    assert answer["published"] is True
    assert "invalid file_id" in answer["file_refused"]
    # The customer is told, once.
    notice = wait_for(lambda: fake_telegram.sent_to(chat), what="the notice to the customer")
    assert "could not receive your file" in notice[0].text

    # Too big for the channel (declared by Telegram: not even downloaded), and a type not
    # allowed (sniffed from the bytes): refused, the text goes on; a file alone, nothing.
    downloads = fake_telegram.downloads
    big = {"file_id": fake_telegram.add_file(PDF), "file_size": 3 * 1024 * 1024}
    answer = post_update(pipeline, with_file(update(uid(), chat, 2, None), "document", big, "big"))
    assert answer["published"] is True and "over" in answer["file_refused"]
    assert fake_telegram.downloads == downloads
    exe = {"file_id": fake_telegram.add_file(b"MZ\x90\x00" + b"\x00" * 400), "file_name": "a.jpg"}
    answer = post_update(pipeline, with_file(update(uid(), chat, 3, None), "document", exe))
    assert answer["published"] is False and "not allowed" in answer["file_refused"]

    def texts() -> list[str]:
        return [m["text"] for m in listed(pipeline, "wxh", chat) if m["role"] == "customer"]

    wait_for(lambda: sorted(texts()) == ["big", "see photo"], what="the captions in Redis")
    assert all(not m.get("attachments") for m in listed(pipeline, "wxh", chat))
    assert asyncio.run(customer_messages_published(pipeline)) == before + 2
    wait_for(lambda: len(fake_telegram.sent_to(chat)) == 3, what="three notices")
    assert "not accepted" in fake_telegram.sent_to(chat)[2].text
