"""The AI responder in a real worker: a second worker and gateway with models
configured (pointing at the local fake server), on their own topics and consumer group
next to the session pipeline, sharing its Kafka and Redis. Streamed tokens reach the
web-chat socket before the reply; the cache is shared through Redis; an outage still
gets every customer an answer; the accounting is on the event."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import websockets
from aiokafka import AIOKafkaConsumer

from connectors.ai_store import RedisCacheStore, RedisRateLimiter, cache_key
from kefu.data_keys import install_for, uninstall_for
from kefu.processes import free_ports
from kefu.services import Services
from kefu.settings import (
    AIModelSettings,
    AISettings,
    GatewaySettings,
    Settings,
    WorkerSettings,
)
from kefu.topics import ensure_topics
from projections.clickhouse_events import COLUMNS, row_for
from schemas.codec import CODEC, DecodeError
from schemas.records import RecordReply, ReplyProduced, ReplyRequested
from schemas.topics import TopicNames
from tests.conftest import wait_for
from tests.fake_openai import FakeOpenAI
from tests.test_tracing import read_spans

WATERPROOF = "is this jacket waterproof?"


@pytest.fixture(scope="module")
def ai_stack(
    pipeline: Settings, fake_openai: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    gateway_port, web_port = free_ports(2)
    model: dict[str, Any] = {
        "base_url": fake_openai.base_url,
        "first_token_timeout": 0.5,
        "timeout": 5.0,
    }
    settings = pipeline.model_copy(
        update={
            "state_dir": tmp_path_factory.mktemp("kefu-ai-state"),
            "app_id": "kefu-ai",
            "topic_prefix": "kefuai",
            "gateway": GatewaySettings(port=gateway_port),
            "worker": WorkerSettings(web_port=web_port),
            "ai": AISettings(
                models={
                    "gpt-en": AIModelSettings(
                        **model, languages=["en"], cost_in_per_1k=0.5, cost_out_per_1k=1.5
                    ),
                    "qwen-zh": AIModelSettings(**model, languages=["zh"]),
                },
                breaker_failures=2,
                breaker_reset_seconds=1.0,
                backoff_seconds=0.01,
            ),
        }
    )
    asyncio.run(ensure_topics(settings))
    services = Services(settings)
    started = [services.worker(0), services.gateway()]
    install_for(settings)  # this process reads the stack's sealed events too
    try:
        services.start(started)
        yield settings
    finally:
        services.stop(started)
        uninstall_for(settings)


@pytest.fixture
def fake(fake_openai: FakeOpenAI) -> FakeOpenAI:
    fake_openai.reset()
    return fake_openai


def customer() -> str:
    return f"ai-{uuid.uuid4().hex[:10]}"


async def chat(settings: Settings, who: str, text: str) -> list[dict[str, Any]]:
    """Send one message over the web-chat socket; every frame until the reply."""
    g = settings.gateway
    url = f"ws://{g.host}:{g.port}/v1/chat/ws?tenant=demo&customer={who}"
    frames = []
    async with websockets.connect(url) as socket:
        assert json.loads(await socket.recv())["type"] == "history"
        await socket.send(json.dumps({"type": "message", "id": "m1", "text": text}))
        while True:
            frame = json.loads(await asyncio.wait_for(socket.recv(), 30))
            frames.append(frame)
            if frame["type"] == "reply":
                return frames


async def reply_event(settings: Settings, conversation_id: str) -> ReplyProduced:
    consumer = AIOKafkaConsumer(
        TopicNames(settings.topic_prefix).events,
        bootstrap_servers=settings.kafka.servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            async for message in consumer:
                try:
                    records = CODEC.decode_all(message.value)  # one event, or a commit's
                except DecodeError:
                    continue
                for record in records:
                    if (
                        isinstance(record, ReplyProduced)
                        and record.conversation_id == conversation_id
                    ):
                        return record
    finally:
        await consumer.stop()
    raise AssertionError("no reply event")


def converse(settings: Settings, text: str) -> tuple[list[dict[str, Any]], ReplyProduced]:
    async def run() -> tuple[list[dict[str, Any]], ReplyProduced]:
        frames = await chat(settings, customer(), text)
        return frames, await reply_event(settings, frames[-1]["conversation_id"])

    return asyncio.run(run())


def test_tokens_reach_the_socket_before_the_reply_event(
    ai_stack: Settings, fake: FakeOpenAI
) -> None:
    fake.chunk_delay = 0.02
    frames, event = converse(ai_stack, WATERPROOF)
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "ack" and kinds[-1] == "reply"
    tokens = [f for f in frames if f["type"] == "token"]
    assert len(tokens) > 3, kinds
    assert "".join(t["text"] for t in tokens) == frames[-1]["text"]
    assert {t["in_reply_to"] for t in tokens} == {event.in_reply_to}
    # One event for the reply, with the accounting.
    assert event.responder == "llm" and event.model == "gpt-en" and not event.cache_hit
    assert event.prompt_tokens > 0 and event.completion_tokens == len(event.text.split(" "))
    assert event.cost == pytest.approx(
        event.prompt_tokens * 0.5 / 1000 + event.completion_tokens * 1.5 / 1000
    )
    assert event.latency_ms > 0  # the responder's round trip: a model answer is not inline
    # ClickHouse keeps every field of the event in its payload column.
    payload = json.loads(row_for(event, 0, 0)[COLUMNS.index("payload")])
    assert payload["cost"] == event.cost and payload["model"] == "gpt-en"
    # One trace through the responder: conversation → responder → conversation.
    conversation = frames[-1]["conversation_id"]

    def reply_hop() -> dict[str, Any] | None:
        mine = [
            s
            for s in read_spans(ai_stack)
            if s["attributes"].get("kefu.conversation_id") == conversation
        ]
        by_id = {s["span_id"]: s for s in mine}
        for span in mine:
            parent = by_id.get(span["parent_id"] or "")
            if span["name"] == "conversation" and parent and parent["name"] == "responder":
                return parent
        return None

    hop = wait_for(reply_hop, timeout=30, what="the responder's span")
    assert hop["service"] == "kefu-worker" and hop["kind"] == "CONSUMER"


async def _records_of(settings: Settings, topic: str, conversation_id: str) -> list[Any]:
    """Every record of one conversation on ``topic``, up to its current end."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka.servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        partitions = consumer.assignment() or set()
        async with asyncio.timeout(30):
            while not partitions:
                await asyncio.sleep(0.05)
                partitions = consumer.assignment()
            ends = await consumer.end_offsets(list(partitions))
            found = []
            while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                batches = await consumer.getmany(timeout_ms=500)
                for message in (m for batch in batches.values() for m in batch):
                    # By each event's conversation, not the record's key: a commit may
                    # hold another conversation's receipts. Bytes without the id hold
                    # none of its events.
                    if conversation_id.encode() in message.value:
                        found += [
                            e
                            for e in CODEC.decode_all(message.value)
                            if getattr(e, "conversation_id", None) == conversation_id
                        ]
            return found
    finally:
        await consumer.stop()


def test_an_intent_answer_is_given_inline_without_the_responder(
    ai_stack: Settings, fake: FakeOpenAI
) -> None:
    frames, event = converse(ai_stack, "I want a refund")
    assert event.responder == "intent-faq" and event.action == "answer"
    assert event.latency_ms == 0  # no round trip: decided with the message
    names = TopicNames(ai_stack.topic_prefix)
    conversation = frames[-1]["conversation_id"]
    events = asyncio.run(_records_of(ai_stack, names.events, conversation))
    (request,) = [e for e in events if isinstance(e, ReplyRequested)]
    assert request.answered_inline and event.in_reply_to == request.event_id
    assert event.seq == request.seq + 2  # after the outbound moderation, same command
    commands = asyncio.run(_records_of(ai_stack, names.commands, conversation))
    assert not [c for c in commands if isinstance(c, RecordReply)]  # no responder hop
    assert fake.chat_calls() == []


def test_chinese_goes_to_the_chinese_model(ai_stack: Settings, fake: FakeOpenAI) -> None:
    _, event = converse(ai_stack, "这件羽绒服可以机洗吗？")
    assert event.model == "qwen-zh"
    assert [c.model for c in fake.chat_calls()] == ["qwen-zh"]


def test_paraphrase_is_a_shared_cache_hit_without_a_call(
    ai_stack: Settings, fake: FakeOpenAI
) -> None:
    _, first = converse(ai_stack, "does this coat come in navy blue?")
    assert len(fake.chat_calls()) == 1 and not first.cache_hit
    _, again = converse(ai_stack, "Does this coat come in navy blue please?")
    assert len(fake.chat_calls()) == 1  # no call was made
    assert again.cache_hit and again.responder == "semantic-cache"
    assert again.text == first.text and again.model == "gpt-en"


def test_outage_gets_a_fallback_within_2s_then_recovers(
    ai_stack: Settings, fake: FakeOpenAI
) -> None:
    fake.mode = "fail"
    for text in ("is the zipper made of metal?", "what are the dimensions of this tent?"):
        _, event = converse(ai_stack, text)
        assert event.responder.endswith(":unavailable"), event.responder
        assert event.latency_ms < 2000
        assert event.action in ("answer", "handoff") and event.text
    assert len(fake.chat_calls()) >= 2
    fake.mode = "ok"

    def recovered() -> ReplyProduced | None:
        _, event = converse(ai_stack, f"does the tent fit {uuid.uuid4().hex[:4]} people?")
        return event if event.responder == "llm" else None

    event = wait_for(recovered, timeout=30, what="the breaker to close")
    assert event.model == "gpt-en"


async def test_redis_rate_limit_is_shared_and_per_tenant(pipeline: Settings) -> None:
    client = aioredis.Redis.from_url(pipeline.redis.dsn)
    try:
        tenant = f"rl-{uuid.uuid4().hex[:6]}"
        # Two limiters = two workers: one budget between them.
        first = RedisRateLimiter(client, rate=0.001, burst=3)
        second = RedisRateLimiter(client, rate=0.001, burst=3, overrides={"big": (0.001, 10)})
        taken = [await (first if i % 2 else second).allow(tenant) for i in range(4)]
        assert taken.count(True) == 3
        assert await second.allow(f"{tenant}-other")
    finally:
        await client.aclose()


async def test_redis_cache_store_round_trip_and_expiry(pipeline: Settings) -> None:
    client = aioredis.Redis.from_url(pipeline.redis.dsn)
    try:
        store = RedisCacheStore(client)
        tenant = f"cache-{uuid.uuid4().hex[:6]}"
        await store.put(tenant, "refund:en", "a", '{"x": 1}', ttl=60)
        await store.put(tenant, "refund:en", "b", '{"x": 2}', ttl=60)
        assert sorted(await store.entries(tenant, "refund:en")) == [b'{"x": 1}', b'{"x": 2}']
        await store.drop(tenant, "refund:en", ["a"])
        assert await store.entries(tenant, "refund:en") == [b'{"x": 2}']
        assert 0 < await client.ttl(cache_key(tenant, "refund:en")) <= 60
        assert await store.entries("another-tenant", "refund:en") == []
    finally:
        await client.aclose()
