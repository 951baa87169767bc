"""Live conversation state in Redis, projected from events.

Keys are in ``schemas.keys`` (all tenant-scoped). Every write happens in one Lua
script guarded by the conversation's ``seq``, so a redelivered or replayed event
changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from schemas.keys import conversation_key, conversations_key, messages_key
from schemas.records import (
    ConversationClosed,
    ConversationRouted,
    Event,
    MessageDelivered,
    MessageModerated,
    MessageReceived,
    ReplyProduced,
)

RECENT_MESSAGES = 50

# KEYS: conversation hash, messages list, tenant zset
# ARGV: seq, conversation id, occurred_at, message JSON or "", list cap,
#       n_set, set field/value pairs..., n_incr, counter names...
_APPLY = """
local h = KEYS[1]
local seq = tonumber(ARGV[1])
if seq <= tonumber(redis.call('HGET', h, 'seq') or '0') then return 0 end
local at = ARGV[3]
redis.call('HSET', h, 'seq', ARGV[1], 'updated_at', at, 'conversation_id', ARGV[2])
redis.call('HSETNX', h, 'created_at', at)
local i = 7
for _ = 1, tonumber(ARGV[6]) do
  redis.call('HSET', h, ARGV[i], ARGV[i + 1])
  i = i + 2
end
local n_incr = tonumber(ARGV[i])
for j = i + 1, i + n_incr do
  redis.call('HINCRBY', h, ARGV[j], 1)
  if ARGV[j] == 'replies' and redis.call('HEXISTS', h, 'first_response_ms') == 0 then
    redis.call('HSET', h, 'first_response_ms',
      tonumber(at) - tonumber(redis.call('HGET', h, 'created_at')))
  end
end
if ARGV[4] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[4])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[5]), -1)
end
redis.call('ZADD', KEYS[3], at, ARGV[2])
return 1
"""


def changes(event: Event) -> tuple[dict[str, str], dict[str, Any] | None]:
    """The hash fields an event sets (``+name``: a counter to increment), and the
    message it adds to the recent list."""
    match event:
        case MessageReceived():
            return (
                {
                    "status": "open",
                    "channel": event.channel,
                    "customer_id": event.customer_id,
                    "+messages": "",
                    "last_customer_at": str(event.occurred_at),
                },
                None,  # listed once moderated, so the list never shows unmasked text
            )
        case MessageModerated(direction="in"):
            fields = {"last_message": event.text[:120], "moderation": event.verdict}
            return fields, {
                "id": event.message_event_id,
                "role": "customer",
                "text": event.text,
                "at": event.occurred_at,
                "verdict": event.verdict,
            }
        case ConversationRouted():
            return {
                "assignee": event.assignee,
                "queue": event.queue,
                "priority": event.priority,
            }, None
        case ReplyProduced():
            return (
                {
                    "last_message": event.text[:120],
                    "+replies": "",
                    "last_reply_at": str(event.occurred_at),
                    "last_reply_author": event.author,
                },
                {
                    "id": event.event_id,
                    "role": "ai" if event.author == "ai" else "agent",
                    "author": event.author,
                    "text": event.text,
                    "at": event.occurred_at,
                },
            )
        case MessageDelivered():
            return {"last_delivery": event.status, "+deliveries": ""}, None
        case ConversationClosed():
            return {"status": "closed", "closed_reason": event.reason, "assignee": ""}, None
        case _:
            return {}, None


class RedisConversations:
    """The Redis read model: an ``EventSink`` for the projection agent."""

    name = "redis"

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._apply = client.register_script(_APPLY)

    async def apply(self, events: Sequence[Event]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in events:
                fields, message = changes(event)
                counters = [name[1:] for name in fields if name.startswith("+")]
                sets = [(k, v) for k, v in fields.items() if not k.startswith("+")]
                args: list[Any] = [
                    event.seq,
                    event.conversation_id,
                    event.occurred_at,
                    json.dumps(message, ensure_ascii=False) if message else "",
                    RECENT_MESSAGES,
                    len(sets),
                ]
                for name, value in sets:
                    args.extend((name, value))
                args.append(len(counters))
                args.extend(counters)
                keys = [
                    conversation_key(event.tenant_id, event.conversation_id),
                    messages_key(event.tenant_id, event.conversation_id),
                    conversations_key(event.tenant_id),
                ]
                await self._apply(keys=keys, args=args, client=pipe)
            await pipe.execute()

    async def conversation(self, tenant_id: str, conversation_id: str) -> dict[str, str]:
        raw = await self._redis.hgetall(conversation_key(tenant_id, conversation_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def recent_messages(self, tenant_id: str, conversation_id: str) -> list[dict[str, Any]]:
        raw = await self._redis.lrange(messages_key(tenant_id, conversation_id), 0, -1)
        return [json.loads(item) for item in raw]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
