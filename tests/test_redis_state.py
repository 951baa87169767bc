"""The Redis read model is a function of the events: applying them again, or
replaying the log into it, changes nothing."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from kefu.settings import Settings
from projections.redis_state import RedisConversations
from schemas.keys import conversation_key, conversations_key, messages_key
from schemas.records import Event, RecordDelivery, RecordReply
from streams.lifecycle import Conversation, decide, evolve
from tests.test_lifecycle import POLICY, receive


def conversation_log(tenant: str) -> list[Event]:
    state, log = Conversation(), []
    for n in (1, 2):
        events = decide(state, receive(n, tenant=tenant), POLICY)
        for event in events:
            state = evolve(state, event)
        reply = RecordReply(
            command_id=f"reply-{n}",
            conversation_id="conv-1",
            tenant_id=tenant,
            issued_at=5000 + n,
            in_reply_to=state.awaiting_reply[0],
            text=f"answer {n}",
            author="ai",
            responder="offline-faq",
            confidence=1.0,
        )
        replied = decide(state, reply, POLICY)
        for event in replied:
            state = evolve(state, event)
        receipt = RecordDelivery(
            command_id=f"receipt-{n}",
            conversation_id="conv-1",
            tenant_id=tenant,
            issued_at=6000 + n,
            reply_event_id=replied[-1].event_id,
            channel="api",
            status="delivered",
            attempts=1,
        )
        delivered = decide(state, receipt, POLICY)
        for event in delivered:
            state = evolve(state, event)
        log += [*events, *replied, *delivered]
    return log


async def snapshot(client: aioredis.Redis, tenant: str) -> tuple[object, ...]:
    return (
        await client.dump(conversation_key(tenant, "conv-1")),
        await client.dump(messages_key(tenant, "conv-1")),
        await client.zscore(conversations_key(tenant), "conv-1"),
    )


def test_redelivery_and_replay_leave_redis_byte_identical(pipeline: Settings) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    log = conversation_log(tenant)

    async def run() -> None:
        client = aioredis.Redis.from_url(pipeline.redis.dsn)
        model = RedisConversations(client)
        try:
            await model.apply(log)
            first = await snapshot(client, tenant)
            state = await model.conversation(tenant, "conv-1")
            assert state["seq"] == str(len(log))
            assert state["messages"] == "2" and state["replies"] == "2"
            assert state["deliveries"] == "2"
            assert state["first_response_ms"] == str(5001 - 1001)

            await model.apply(log)  # a redelivered batch
            await model.apply(log[3:7])  # a partial redelivery
            assert await snapshot(client, tenant) == first

            keys = [
                conversation_key(tenant, "conv-1"),
                messages_key(tenant, "conv-1"),
                conversations_key(tenant),
            ]
            await client.delete(*keys)
            for event in log:  # a replay, one event at a time
                await model.apply([event])
            assert await snapshot(client, tenant) == first
            recent = await model.recent_messages(tenant, "conv-1")
            assert [m["role"] for m in recent] == ["customer", "ai", "customer", "ai"]
        finally:
            await client.aclose()

    asyncio.run(run())
