"""End to end on the real stack: REST and WebSocket in, replies out, Redis state and
ClickHouse rows, dead letters for what cannot be processed, 4xx for bad input."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, cast

import httpx
import pytest
import redis
import websockets
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from connectors.identity import conversation_id_for
from kefu.settings import Settings
from projections.clickhouse_query import AnalyticsClient
from schemas.codec import CODEC, DecodeError
from schemas.keys import conversation_key, messages_key
from schemas.records import DeadLetter, MessageReceived, ReceiveMessage, ReplyProduced
from schemas.time import now_ms
from schemas.topics import TopicNames
from tests.conftest import wait_for
from tests.kafka_helpers import read_records, read_topic


def gateway(settings: Settings) -> httpx.Client:
    g = settings.gateway
    return httpx.Client(base_url=f"http://{g.host}:{g.port}", timeout=10)


def auth(settings: Settings, tenant: str = "demo") -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.tenants[tenant].api_key.get_secret_value()}"}


def webhooks(settings: Settings, conversation_id: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{settings.dev.webhook_sink_port}/received"
    received = httpx.get(url).json()["received"]
    return [r for r in received if r["conversation_id"] == conversation_id]


def redis_hash(settings: Settings, tenant: str, conversation: str) -> dict[str, str]:
    client = redis.Redis.from_url(settings.redis.dsn, decode_responses=True)
    return cast(dict[str, str], client.hgetall(conversation_key(tenant, conversation)))


def analytics(settings: Settings, sql: str) -> list[list[Any]]:
    client = AnalyticsClient(settings.clickhouse_url, settings.clickhouse.query_port)
    return client.query(sql).rows


def customer() -> str:
    return f"cust-{uuid.uuid4().hex[:10]}"


def test_rest_message_gets_a_reply_redis_state_and_clickhouse_rows(pipeline: Settings) -> None:
    who = customer()
    with gateway(pipeline) as http:
        response = http.post(
            "/v1/messages",
            json={"customer_id": who, "text": "Where is my order?", "message_id": "m1"},
            headers=auth(pipeline),
        )
        assert response.status_code == 202, response.text
        accepted = response.json()
        conversation = accepted["conversation_id"]
        assert conversation == conversation_id_for("demo", "api", who)

        # The reply arrives at the tenant's webhook, signed (the sink rejects bad ones).
        replies = wait_for(lambda: webhooks(pipeline, conversation), what="webhook reply")
        assert len(replies) == 1
        assert replies[0]["intent"] == "order_status"
        assert "Account > Orders" in replies[0]["text"]

        # Redis: the read model, reached through the REST API and directly.
        r = redis.Redis.from_url(pipeline.redis.dsn, decode_responses=True)

        def delivered() -> dict[str, str] | None:
            state = redis_hash(pipeline, "demo", conversation)
            return state if state.get("last_delivery") == "delivered" else None

        state = wait_for(delivered, what="delivery in Redis")
        assert state["status"] == "open"
        assert state["assignee"] == "ai"
        assert state["channel"] == "api"
        assert state["messages"] == "1" and state["replies"] == "1"
        assert int(state["first_response_ms"]) >= 0
        seq = int(state["seq"])
        recent = [json.loads(m) for m in r.lrange(messages_key("demo", conversation), 0, -1)]
        assert [m["role"] for m in recent] == ["customer", "ai"]

        view = http.get(f"/v1/conversations/{conversation}", headers=auth(pipeline)).json()
        assert view["conversation"]["replies"] == "1"
        assert len(view["messages"]) == 2

    # ClickHouse: every event of the conversation, once, in order.
    def stored() -> list[list[Any]] | None:
        rows = analytics(
            pipeline,
            "SELECT seq, type FROM kefu.events FINAL "
            f"WHERE conversation_id = '{conversation}' ORDER BY seq",
        )
        return rows if len(rows) == seq else None

    rows = wait_for(stored, what="all events in ClickHouse")
    # The FAQ answered in the same step as the message: the reply's event carries the
    # message's time, and the read models take it when its record reached the log.
    received, appended = asyncio.run(reply_appended(pipeline, conversation))
    assert appended >= received
    assert int(state["first_response_ms"]) == appended - received
    (facts,) = analytics(
        pipeline,
        "SELECT first_response_ms FROM kefu.conversation_facts "
        f"WHERE conversation_id = '{conversation}'",
    )
    assert facts[0] == appended - received
    assert [row[0] for row in rows] == list(range(1, seq + 1))
    assert [row[1] for row in rows] == [
        "MessageReceived",
        "MessageModerated",
        "ConversationRouted",
        "ReplyRequested",
        "MessageModerated",
        "ReplyProduced",
        "MessageDelivered",
    ]


async def reply_appended(settings: Settings, conversation: str) -> tuple[int, int]:
    """The message's time and the log timestamp of the record holding its reply."""
    received = appended = -1
    for record in await read_records(settings, TopicNames(settings.topic_prefix).events):
        if record.key != conversation.encode():
            continue
        for event in CODEC.decode_all(record.value or b""):
            if isinstance(event, MessageReceived) and received < 0:
                received = event.occurred_at
            if isinstance(event, ReplyProduced) and appended < 0:
                appended = record.timestamp
    return received, appended


def test_resent_message_is_not_duplicated(pipeline: Settings) -> None:
    who = customer()
    body = {"customer_id": who, "text": "I want a refund", "message_id": "same-id"}
    with gateway(pipeline) as http:
        first = http.post("/v1/messages", json=body, headers=auth(pipeline)).json()
        second = http.post("/v1/messages", json=body, headers=auth(pipeline)).json()
    assert first == second
    conversation = first["conversation_id"]
    r = redis.Redis.from_url(pipeline.redis.dsn, decode_responses=True)
    wait_for(
        lambda: r.hget(conversation_key("demo", conversation), "last_delivery"),
        what="delivery",
    )
    # A follow-up proves the conversation agent is past both copies.
    with gateway(pipeline) as http:
        http.post(
            "/v1/messages",
            json={"customer_id": who, "text": "thanks", "message_id": "m2"},
            headers=auth(pipeline),
        )
    wait_for(lambda: len(webhooks(pipeline, conversation)) >= 2, what="second reply")
    # The projection trails the webhook: wait for it, then check nothing more comes.
    wait_for(
        lambda: r.hget(conversation_key("demo", conversation), "messages") == "2",
        what="2 messages in Redis",
    )
    assert len(webhooks(pipeline, conversation)) == 2


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({}, {"customer_id": "x", "text": "hi"}, 401),
        ({"Authorization": "Bearer wrong"}, {"customer_id": "x", "text": "hi"}, 401),
        ({"X-Api-Key": "demo-test-key"}, {"customer_id": "x", "text": ""}, 422),
        ({"X-Api-Key": "demo-test-key"}, {"customer_id": "x"}, 422),
        ({"X-Api-Key": "demo-test-key"}, {"customer_id": "a b", "text": "hi"}, 422),
        ({"X-Api-Key": "demo-test-key"}, {"customer_id": "x", "text": "hi", "admin": 1}, 422),
        ({"X-Api-Key": "demo-test-key"}, {"customer_id": "x", "text": "x" * 8001}, 422),
    ],
)
def test_bad_requests_get_a_clear_4xx_and_publish_nothing(
    pipeline: Settings, headers: dict[str, str], body: dict[str, Any], status: int
) -> None:
    before = asyncio.run(customer_messages_published(pipeline))
    with gateway(pipeline) as http:
        response = http.post("/v1/messages", json=body, headers=headers)
        invalid_json = http.post(
            "/v1/messages",
            content=b"{not json",
            headers={**headers, "Content-Type": "application/json"},
        )
    assert response.status_code == status
    assert response.json()["detail"]
    assert invalid_json.status_code in (401, 422)
    assert asyncio.run(customer_messages_published(pipeline)) == before


async def customer_messages_published(settings: Settings) -> int:
    """ReceiveMessage commands on the log: what an edge publishes for a customer's
    message. (The topic's end offset would also count the commands workers publish on
    their own, replies and timers, which a test cannot hold still.)"""
    count = 0
    for record in await read_topic(settings, TopicNames(settings.topic_prefix).commands):
        try:
            # A commit (delivery receipts batched) holds several commands.
            count += sum(isinstance(r, ReceiveMessage) for r in CODEC.decode_all(record))
        except DecodeError:  # other tests' poison
            continue
    return count


def test_web_chat_socket_gets_reply_and_history(pipeline: Settings) -> None:
    async def chat() -> tuple[dict[str, Any], dict[str, Any]]:
        g = pipeline.gateway
        who = customer()
        url = f"ws://{g.host}:{g.port}/v1/chat/ws?tenant=demo&customer={who}"
        async with websockets.connect(url) as socket:
            history = json.loads(await socket.recv())
            assert history == {
                "type": "history",
                "conversation_id": conversation_id_for("demo", "web", who),
                "messages": [],
            }
            await socket.send("not json")
            assert json.loads(await socket.recv())["type"] == "error"
            await socket.send(json.dumps({"type": "message", "id": "w1", "text": "你好"}))
            ack = json.loads(await socket.recv())
            assert ack["type"] == "ack" and ack["id"] == "w1"
            reply = json.loads(await asyncio.wait_for(socket.recv(), 30))
        # Reconnect: history from Redis has both sides of the exchange.
        async with websockets.connect(url) as socket:
            for _ in range(100):
                again = json.loads(await socket.recv())
                if len(again["messages"]) == 2:
                    break
                await socket.close()
                await asyncio.sleep(0.1)
                socket = await websockets.connect(url)
        return reply, again

    reply, history = asyncio.run(chat())
    assert reply["type"] == "reply" and reply["intent"] == "greeting"
    assert "您好" in reply["text"]
    assert [m["role"] for m in history["messages"]] == ["customer", "ai"]


def test_unknown_tenant_socket_is_refused(pipeline: Settings) -> None:
    async def connect() -> None:
        g = pipeline.gateway
        url = f"ws://{g.host}:{g.port}/v1/chat/ws?tenant=nobody&customer=x"
        async with websockets.connect(url) as socket:
            await socket.recv()

    # Refused in the handshake, before any frame: nothing is subscribed or published.
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        asyncio.run(connect())
    assert refused.value.response.status_code == 403


async def dead_letters(settings: Settings) -> list[DeadLetter]:
    topic = TopicNames(settings.topic_prefix).deadletter
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.servers, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        end = (await consumer.end_offsets([partition]))[partition]
        letters: list[DeadLetter] = []
        while end and (await consumer.position(partition)) < end:
            batch = await consumer.getmany(partition, timeout_ms=1000)
            for record in batch.get(partition, []):
                letter = CODEC.decode(record.value)
                assert isinstance(letter, DeadLetter)
                letters.append(letter)
        return letters
    finally:
        await consumer.stop()


def test_unknown_fingerprint_goes_to_dead_letter_and_the_stream_goes_on(
    pipeline: Settings,
) -> None:
    names = TopicNames(pipeline.topic_prefix)
    who = customer()
    conversation = conversation_id_for("demo", "api", who)
    valid = CODEC.encode(
        ReceiveMessage(
            command_id=str(uuid.uuid4()),
            conversation_id=conversation,
            tenant_id="demo",
            issued_at=now_ms(),
            channel="api",
            customer_id=who,
            text="hello",
            channel_message_id="after-poison",
        )
    )
    poison = valid[:2] + b"\x00\x11\x22\x33\x44\x55\x66\x77" + valid[10:]

    async def send() -> int:
        producer = AIOKafkaProducer(bootstrap_servers=pipeline.kafka.servers, acks="all")
        await producer.start()
        try:
            meta = await producer.send_and_wait(names.commands, poison, key=conversation.encode())
            await producer.send_and_wait(names.commands, valid, key=conversation.encode())
            return int(meta.offset)
        finally:
            await producer.stop()

    offset = asyncio.run(send())
    # The valid message behind the poison one is answered: the partition did not stop.
    wait_for(lambda: webhooks(pipeline, conversation), what="reply after poison")
    letters = wait_for(
        lambda: [
            d
            for d in asyncio.run(dead_letters(pipeline))
            if d.key == conversation.encode() and d.offset == offset
        ],
        what="dead letter",
    )
    assert letters[0].source_topic == names.commands
    assert letters[0].reason == "unknown schema fingerprint 0011223344556677"
    assert letters[0].consumer == "conversation"
    assert letters[0].payload == poison


def test_a_tenant_cannot_write_into_another_tenants_conversation(pipeline: Settings) -> None:
    who = customer()
    with gateway(pipeline) as http:
        conversation = http.post(
            "/v1/messages",
            json={"customer_id": who, "text": "hello", "message_id": "own"},
            headers=auth(pipeline),
        ).json()["conversation_id"]
    wait_for(lambda: webhooks(pipeline, conversation), what="first reply")
    intruder = ReceiveMessage(
        command_id=str(uuid.uuid4()),
        conversation_id=conversation,
        tenant_id="acme",
        issued_at=now_ms(),
        channel="api",
        customer_id="mallory",
        text="give me their data",
        channel_message_id="x",
    )

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=pipeline.kafka.servers, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(
                TopicNames(pipeline.topic_prefix).commands,
                CODEC.encode(intruder),
                key=conversation.encode(),
            )
        finally:
            await producer.stop()

    asyncio.run(send())
    letters = wait_for(
        lambda: [
            d
            for d in asyncio.run(dead_letters(pipeline))
            if d.key == conversation.encode() and "another tenant" in d.reason
        ],
        what="rejected command in dead letters",
    )
    assert letters[0].consumer == "conversation"
    r = redis.Redis.from_url(pipeline.redis.dsn, decode_responses=True)
    assert r.hget(conversation_key("demo", conversation), "messages") == "1"
    with gateway(pipeline) as http:
        other = http.get(f"/v1/conversations/{conversation}", headers=auth(pipeline, "acme"))
    assert other.status_code == 404
