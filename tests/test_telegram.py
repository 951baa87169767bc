"""Telegram: update parsing as pure functions, the sender against the local fake Bot
API, and the webhook through the running pipeline (reply via sendMessage, redelivered
updates not duplicated, bad requests refused with nothing published)."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
import redis

from connectors.identity import command_id_for, conversation_id_for
from connectors.telegram import TelegramSender, chunks, parse_update
from kefu.settings import Settings
from schemas.keys import conversation_key
from schemas.records import ReplyProduced
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
    update_id, command = parse_update("t", json.dumps(update(5, 42, 7, "hi")).encode())
    assert update_id == 5 and command is not None
    assert command.customer_id == "42" and command.channel == "telegram"
    assert command.conversation_id == conversation_id_for("t", "telegram", "42")
    assert command.command_id == command_id_for("t", "telegram", "42/7")
    assert command.language == "en"
    # A redelivery (same update) is the same command; so is the same message id.
    _, again = parse_update("t", json.dumps(update(5, 42, 7, "hi")).encode())
    assert again is not None and again.command_id == command.command_id


def test_parse_update_ignores_non_text_and_refuses_garbage() -> None:
    assert parse_update("t", json.dumps(update(6, 42, 8, None)).encode()) == (6, None)
    assert parse_update("t", b'{"update_id": 9, "edited_message": {}}') == (9, None)
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
