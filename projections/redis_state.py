"""Live conversation state in Redis, projected from events.

Keys are in ``schemas.keys`` (all tenant-scoped). Every write of an event happens in
one Lua script guarded by the conversation's ``seq``, so a redelivered or replayed
event changes nothing, and the per-tenant indexes (conversations by status, waiting
queues, assignee load, unread) move atomically with the hash they index.

What an event changes is a :class:`Change`, chosen by the event's type *name* in
``HANDLERS``: adding an event type is one decorated function (``@on("Name")``), with
no change to the script. Handlers for routing's events are already here, written
against the field names routing publishes; they run as soon as those events exist.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis

from schemas.keys import (
    agents_key,
    assignee_prefix,
    conversation_key,
    conversations_key,
    messages_key,
    queue_prefix,
    queue_seq_key,
    status_key,
    status_prefix,
    unread_key,
)
from schemas.records import Event, QueueEvent

RECENT_MESSAGES = 50
PREVIEW = 120
# Waiting-queue order: priority first, then arrival (score = rank * 1e13 + epoch ms).
PRIORITY_RANK = {"urgent": 0, "vip": 1, "high": 2, "normal": 3, "low": 4}

# KEYS: conversation hash, messages list, tenant conversations zset, tenant unread zset
# ARGV: seq, conversation id, occurred_at, message JSON or "", list cap,
#       n_set, field/value pairs..., n_incr, counter names...,
#       n_ext, (key, field, value) triples for other tenant hashes...,
#       n_index, (field, key prefix, score field) triples...
# An index keeps ``prefix .. value`` (a zset) holding the conversation while the hash
# field has that value; the old value's zset loses it when the value changes.
_APPLY = """
local h = KEYS[1]
local seq = tonumber(ARGV[1])
if seq <= tonumber(redis.call('HGET', h, 'seq') or '0') then return 0 end
local member = ARGV[2]
local at = ARGV[3]
local i = 6
local n_set = tonumber(ARGV[i]); local set_at = i + 1; i = i + 1 + 2 * n_set
local n_incr = tonumber(ARGV[i]); local incr_at = i + 1; i = i + 1 + n_incr
local n_ext = tonumber(ARGV[i]); local ext_at = i + 1; i = i + 1 + 3 * n_ext
local n_idx = tonumber(ARGV[i]); local idx_at = i + 1
if member == '' then
  -- A queue's event (routing: presence, ...): its guard and tenant hashes only.
  redis.call('HSET', h, 'seq', ARGV[1])
  for j = 0, n_ext - 1 do
    local k = ext_at + 3 * j
    redis.call('HSET', ARGV[k], ARGV[k + 1], ARGV[k + 2])
  end
  return 1
end
local old = {}
for j = 0, n_idx - 1 do
  old[j] = redis.call('HGET', h, ARGV[idx_at + 3 * j]) or ''
end
redis.call('HSET', h, 'seq', ARGV[1], 'updated_at', at, 'conversation_id', member)
redis.call('HSETNX', h, 'created_at', at)
for j = 0, n_set - 1 do
  redis.call('HSET', h, ARGV[set_at + 2 * j], ARGV[set_at + 2 * j + 1])
end
for j = incr_at, incr_at + n_incr - 1 do
  redis.call('HINCRBY', h, ARGV[j], 1)
  if ARGV[j] == 'replies' and redis.call('HEXISTS', h, 'first_response_ms') == 0 then
    redis.call('HSET', h, 'first_response_ms',
      tonumber(at) - tonumber(redis.call('HGET', h, 'created_at')))
  end
end
for j = 0, n_ext - 1 do
  local k = ext_at + 3 * j
  redis.call('HSET', ARGV[k], ARGV[k + 1], ARGV[k + 2])
end
for j = 0, n_idx - 1 do
  local k = idx_at + 3 * j
  local new = redis.call('HGET', h, ARGV[k]) or ''
  if old[j] ~= '' and old[j] ~= new then
    redis.call('ZREM', ARGV[k + 1] .. old[j], member)
  end
  if new ~= '' then
    local score = redis.call('HGET', h, ARGV[k + 2])
    if not score or score == '' then score = at end
    redis.call('ZADD', ARGV[k + 1] .. new, score, member)
  end
end
local unread = tonumber(redis.call('HGET', h, 'unread') or '0')
if unread > 0 then
  redis.call('ZADD', KEYS[4], unread, member)
else
  redis.call('ZREM', KEYS[4], member)
end
if ARGV[4] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[4])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[5]), -1)
end
redis.call('ZADD', KEYS[3], at, member)
return 1
"""


@dataclass(frozen=True, slots=True)
class Change:
    """What one event does to its conversation's hash (``set``, ``incr``ement), the
    recent-messages list (``message``) and other tenant hashes (``ext``: key, field,
    value)."""

    set: Mapping[str, str] = field(default_factory=dict)
    incr: tuple[str, ...] = ()
    message: dict[str, Any] | None = None
    ext: tuple[tuple[str, str, str], ...] = ()


NOTHING = Change()
Handler = Callable[[Event], Change]
HANDLERS: dict[str, Handler] = {}


def on(*type_names: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        for name in type_names:
            HANDLERS[name] = handler
        return handler

    return register


def index_specs(tenant_id: str) -> list[tuple[str, str, str]]:
    """(hash field, zset key prefix, score field): the tenant indexes the script keeps."""
    return [
        ("status", status_prefix(tenant_id), "updated_at"),
        ("waiting_queue", queue_prefix(tenant_id), "queue_score"),
        ("assignee", assignee_prefix(tenant_id), "assigned_at"),
    ]


def changes(event: Event | QueueEvent) -> Change:
    handler = HANDLERS.get(event.type)
    # Handlers read fields by name, so a queue event passes through the same table.
    return handler(cast(Event, event)) if handler else NOTHING


def _get(event: Event, name: str, default: Any = "") -> Any:
    """Fields by name: handlers for event types other modules add read them this way."""
    return getattr(event, name, default)


def _at(event: Event) -> str:
    return str(event.occurred_at)


def _queue_score(priority: str, at: int) -> str:
    return str(PRIORITY_RANK.get(priority, PRIORITY_RANK["normal"]) * 10**13 + at)


# --- today's events ----------------------------------------------------------------


@on("MessageReceived")
def _received(event: Event) -> Change:
    return Change(
        set={
            "status": "open",
            "channel": _get(event, "channel"),
            "customer_id": _get(event, "customer_id"),
            "last_customer_at": _at(event),
        },
        incr=("messages", "unread"),
        # Listed once moderated, so the list never shows unmasked text.
    )


@on("MessageModerated")
def _moderated(event: Event) -> Change:
    if _get(event, "direction") != "in":
        return NOTHING
    text = str(_get(event, "text"))
    verdict = str(_get(event, "verdict"))
    return Change(
        set={"last_message": text[:PREVIEW], "last_message_at": _at(event), "moderation": verdict},
        message={
            "id": _get(event, "message_event_id"),
            "role": "customer",
            "text": text,
            "at": event.occurred_at,
            "verdict": verdict,
        },
    )


@on("ConversationRouted")
def _routed(event: Event) -> Change:
    assignee = str(_get(event, "assignee"))
    queue = str(_get(event, "queue"))
    priority = str(_get(event, "priority", "normal"))
    return Change(
        set={
            "assignee": assignee,
            "assigned_at": _at(event) if assignee else "",
            "queue": queue,
            "priority": priority,
            # No assignee: the conversation waits in its queue for a human.
            "waiting_queue": "" if assignee else queue,
            "queue_score": "" if assignee else _queue_score(priority, event.occurred_at),
        }
    )


@on("ReplyProduced")
def _replied(event: Event) -> Change:
    text = str(_get(event, "text"))
    author = str(_get(event, "author"))
    return Change(
        set={
            "last_message": text[:PREVIEW],
            "last_message_at": _at(event),
            "last_reply_at": _at(event),
            "last_reply_author": author,
            "unread": "0",
        },
        incr=("replies",),
        message={
            "id": event.event_id,
            "role": author if author in ("ai", "system") else "agent",
            "author": author,
            "text": text,
            "at": event.occurred_at,
        },
    )


@on("MessageDelivered")
def _delivered(event: Event) -> Change:
    return Change(set={"last_delivery": str(_get(event, "status"))}, incr=("deliveries",))


@on("ConversationClosed")
def _closed(event: Event) -> Change:
    return Change(
        set={
            "status": "closed",
            "closed_reason": str(_get(event, "reason")),
            "closed_by": str(_get(event, "closed_by")),
            "closed_at": _at(event),
            "assignee": "",
            "waiting_queue": "",
            "unread": "0",
        }
    )


# --- routing's events (issue 3): written against the field names it publishes --------


@on("ConversationQueued")
def _queued(event: Event) -> Change:
    queue = str(_get(event, "queue"))
    priority = str(_get(event, "priority", "normal"))
    return Change(
        set={
            "assignee": "",
            "queue": queue,
            "priority": priority,
            "waiting_queue": queue,
            "queued_at": _at(event),
            "queue_score": _queue_score(priority, event.occurred_at),
        }
    )


@on("ConversationAssigned")
def _assigned(event: Event) -> Change:
    assignee = str(_get(event, "assignee"))
    return Change(
        set={
            "assignee": assignee,
            "assigned_at": _at(event),
            "queue": str(_get(event, "queue")),
            "priority": str(_get(event, "priority", "normal")),
            "waiting_queue": "",
        }
    )


@on("ConversationHandedOff")
def _handed_off(event: Event) -> Change:
    to = str(_get(event, "to_assignee"))
    return Change(
        set={
            "assignee": to,
            "assigned_at": _at(event) if to else "",
            "last_handoff_reason": str(_get(event, "reason")),
        },
        incr=("handoffs",),
    )


@on("AgentPresenceChanged")
def _presence(event: Event) -> Change:
    agent = str(_get(event, "agent_id"))
    value = json.dumps(
        {
            "presence": _get(event, "presence"),
            "capacity": _get(event, "capacity", 0),
            "at": event.occurred_at,
        },
        sort_keys=True,
    )
    return Change(ext=((agents_key(event.tenant_id), agent, value),))


@on("SlaBreached")
def _sla(event: Event) -> Change:
    return Change(set={"sla_breached": str(_get(event, "kind"))}, incr=("sla_breaches",))


@on("CsatRated")
def _csat(event: Event) -> Change:
    return Change(set={"csat": str(_get(event, "rating"))})


# --- the sink ------------------------------------------------------------------------


def script_call(event: Event | QueueEvent) -> tuple[list[str], list[Any]]:
    """The keys and arguments of the script for one event. An event of a queue rather
    than a conversation (routing's ``QueueEvent``s) is guarded by its queue's seq."""
    change = changes(event)
    tenant = event.tenant_id
    conversation = event.conversation_id if isinstance(event, Event) else ""
    guard = (
        conversation_key(tenant, conversation)
        if conversation
        else queue_seq_key(tenant, str(getattr(event, "queue", "")))
    )
    args: list[Any] = [
        event.seq,
        conversation,
        event.occurred_at,
        json.dumps(change.message, ensure_ascii=False) if change.message else "",
        RECENT_MESSAGES,
        len(change.set),
    ]
    for name, value in change.set.items():
        args.extend((name, value))
    args.append(len(change.incr))
    args.extend(change.incr)
    args.append(len(change.ext))
    for triple in change.ext:
        args.extend(triple)
    specs = index_specs(tenant)
    args.append(len(specs))
    for spec in specs:
        args.extend(spec)
    keys = [
        guard,
        messages_key(tenant, conversation),
        conversations_key(tenant),
        unread_key(tenant),
    ]
    return keys, args


class RedisConversations:
    """The Redis read model: an ``EventSink`` for the projection agent and replay."""

    name = "redis"

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._apply = client.register_script(_APPLY)

    async def apply(self, events: Sequence[Event | QueueEvent]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in events:
                keys, args = script_call(event)
                await self._apply(keys=keys, args=args, client=pipe)
            await pipe.execute()

    async def conversation(self, tenant_id: str, conversation_id: str) -> dict[str, str]:
        raw = await self._redis.hgetall(conversation_key(tenant_id, conversation_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def recent_messages(self, tenant_id: str, conversation_id: str) -> list[dict[str, Any]]:
        raw = await self._redis.lrange(messages_key(tenant_id, conversation_id), 0, -1)
        return [json.loads(item) for item in raw]

    async def by_status(self, tenant_id: str, status: str) -> list[str]:
        """The tenant's conversations in ``status``, most recently active first."""
        raw = await self._redis.zrevrange(status_key(tenant_id, status), 0, -1)
        return [_text(v) for v in raw if isinstance(v, bytes | str)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
