"""The Redis read model's per-tenant indexes (conversations by status, waiting queues,
assignee load, unread) and routing's events by name: all move atomically with the
conversation hash under its seq guard, so redelivery and replay leave every key of
the tenant byte-identical."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from kefu.settings import Settings
from projections.redis_state import RedisConversations, changes
from schemas.keys import (
    agents_key,
    assignee_key,
    conversation_key,
    queue_key,
    status_key,
    tenant_prefix,
    unread_key,
)
from schemas.records import (
    ConversationClosed,
    ConversationRouted,
    Event,
    MessageModerated,
    MessageReceived,
    ReplyProduced,
)


@dataclass(frozen=True, kw_only=True)
class Named(Event):
    """An event of a type named at run time (routing's), fields by attribute."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.name

    def __getattr__(self, item: str) -> Any:
        try:
            return self.__dict__["fields"][item]
        except KeyError:
            raise AttributeError(item) from None


class Conv:
    def __init__(self, tenant: str, cid: str) -> None:
        self.tenant, self.cid, self.seq = tenant, cid, 0

    def env(self, at: int) -> dict[str, Any]:
        self.seq += 1
        return {
            "event_id": f"{self.cid}-{self.seq}",
            "conversation_id": self.cid,
            "tenant_id": self.tenant,
            "seq": self.seq,
            "occurred_at": at,
        }

    def received(self, at: int, text: str = "hi") -> list[Event]:
        first = MessageReceived(
            **self.env(at),
            channel="web",
            customer_id="cust",
            text=text,
            channel_message_id=f"m{self.seq}",
            command_id=f"c{self.seq}",
        )
        moderated = MessageModerated(
            **self.env(at),
            message_event_id=first.event_id,
            direction="in",
            verdict="pass",
            text=text,
        )
        return [first, moderated]

    def routed(self, at: int, assignee: str, priority: str = "normal") -> Event:
        return ConversationRouted(
            **self.env(at),
            assignee=assignee,
            queue=f"{self.tenant}:support",
            reason="test",
            priority=priority,
        )

    def reply(self, at: int, author: str) -> Event:
        return ReplyProduced(
            **self.env(at),
            in_reply_to="x",
            channel="web",
            text="answer",
            author=author,
            responder="test",
            confidence=1.0,
            customer_id="cust",
        )

    def named(self, at: int, name: str, **fields: Any) -> Event:
        return Named(**self.env(at), name=name, fields=fields)

    def closed(self, at: int) -> Event:
        return ConversationClosed(**self.env(at), reason="resolved", closed_by="agent-1")


def traffic(tenant: str) -> list[Event]:
    a, b, c = Conv(tenant, "a"), Conv(tenant, "b"), Conv(tenant, "c")
    return [
        # a: the AI answers, then a handoff to agent-1, who answers and closes.
        *a.received(1000),
        a.routed(1000, "ai"),
        a.reply(2000, "ai"),
        *a.received(3000),
        a.named(
            3100,
            "ConversationHandedOff",
            from_assignee="ai",
            to_assignee="agent-1",
            reason="asked_for_human",
            queue=f"{tenant}:support",
        ),
        a.reply(4000, "agent-1"),
        a.closed(5000),
        a.named(5100, "CsatRated", rating=5),
        # b and c: no AI; both wait, c is VIP so it is first; then b is assigned.
        *b.received(1500),
        *b.received(1600),
        b.routed(1500, ""),
        *c.received(1700),
        c.routed(1700, ""),
        c.named(1700, "ConversationQueued", queue=f"{tenant}:support", priority="vip", position=1),
        b.named(
            6000,
            "ConversationAssigned",
            assignee="agent-2",
            queue=f"{tenant}:support",
            priority="normal",
        ),
    ]


async def tenant_snapshot(client: aioredis.Redis, tenant: str) -> dict[bytes, bytes | None]:
    keys = sorted([k async for k in client.scan_iter(match=f"{tenant_prefix(tenant)}*")])
    return {key: await client.dump(key) for key in keys}


def test_changes_are_chosen_by_type_name() -> None:
    c = Conv("t", "x")
    assert changes(c.named(1, "NotAnEventYet")).set == {}
    sla = changes(c.named(1, "SlaBreached", kind="first", due_at=5))
    assert sla.set == {"sla_breached": "first"} and sla.incr == ("sla_breaches",)


def test_tenant_indexes_and_routing_events(pipeline: Settings) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    log = traffic(tenant)

    async def run() -> None:
        client = aioredis.Redis.from_url(pipeline.redis.dsn, decode_responses=True)
        model = RedisConversations(client)
        try:
            await model.apply(log)
            a = await model.conversation(tenant, "a")
            assert a["status"] == "closed" and a["assignee"] == "" and a["csat"] == "5"
            assert a["handoffs"] == "1" and a["last_handoff_reason"] == "asked_for_human"
            assert a["first_response_ms"] == "1000" and a["unread"] == "0"
            assert await model.by_status(tenant, "closed") == ["a"]
            assert await model.by_status(tenant, "open") == ["b", "c"]  # b: latest activity
            # c waits (VIP); b left the queue when agent-2 took it.
            assert await client.zrange(queue_key(tenant, f"{tenant}:support"), 0, -1) == ["c"]
            assert await client.zcard(assignee_key(tenant, "agent-2")) == 1
            assert await client.zcard(assignee_key(tenant, "agent-1")) == 0  # closed
            b = await model.conversation(tenant, "b")
            assert b["unread"] == "2" and b["assignee"] == "agent-2"
            assert await client.zrange(unread_key(tenant), 0, -1, withscores=True) == [
                ("c", 1.0),
                ("b", 2.0),
            ]

            snapshot = await tenant_snapshot(client, tenant)
            await model.apply(log)  # redelivered
            await model.apply(log[4:9])  # partly redelivered
            assert await tenant_snapshot(client, tenant) == snapshot
            await client.delete(*snapshot)
            for event in log:  # a replay, event by event
                await model.apply([event])
            assert await tenant_snapshot(client, tenant) == snapshot
        finally:
            await client.aclose()

    asyncio.run(run())


def test_queue_priority_and_agent_presence(pipeline: Settings) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    normal, vip = Conv(tenant, "n"), Conv(tenant, "v")

    @dataclass(frozen=True, kw_only=True)
    class QueueNamed(Named):
        queue: str

    presence = [
        QueueNamed(
            event_id=f"p{n}",
            conversation_id="",
            tenant_id=tenant,
            seq=n,
            occurred_at=n,
            queue=f"{tenant}:support",
            name="AgentPresenceChanged",
            fields={"agent_id": "agent-1", "presence": state, "capacity": 3},
        )
        for n, state in ((1, "online"), (2, "away"))
    ]

    async def run() -> None:
        client = aioredis.Redis.from_url(pipeline.redis.dsn, decode_responses=True)
        model = RedisConversations(client)
        try:
            await model.apply([*normal.received(10), normal.routed(10, "")])
            await model.apply([*vip.received(20), vip.routed(20, "", priority="vip")])
            assert await client.zrange(queue_key(tenant, f"{tenant}:support"), 0, -1) == ["v", "n"]
            await model.apply(presence)
            await model.apply(presence[:1])  # a redelivered older presence changes nothing
            agent = await client.hget(agents_key(tenant), "agent-1")
            assert agent is not None and '"presence": "away"' in agent
            assert await client.exists(conversation_key(tenant, "")) == 0
        finally:
            await client.aclose()

    asyncio.run(run())


def test_status_key_shape() -> None:
    assert status_key("t", "open") == "kefu:t:status:open"
