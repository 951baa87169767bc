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

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
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
# One event's writes, as a function: the one-event script and the batch script run
# exactly this, so a batch issues the same Redis commands, in the same order, as one
# script call per event (DUMPs stay byte-identical: a hash's table order depends on
# every operation on it, reads included).
_APPLY_EVENT = """
local function apply_event(h, messages, conversations, unread_key, ARGV)
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
-- Reads of h that follow each other with no write to h between them go in one HMGET:
-- the same field lookups in the same order as one HGET each, in fewer calls.
local old = {}
if n_idx > 0 then
  local fields = {}
  for j = 0, n_idx - 1 do fields[j + 1] = ARGV[idx_at + 3 * j] end
  local got = redis.call('HMGET', h, unpack(fields))
  for j = 0, n_idx - 1 do old[j] = got[j + 1] or '' end
end
redis.call('HSET', h, 'seq', ARGV[1], 'updated_at', at, 'conversation_id', member)
redis.call('HSETNX', h, 'created_at', at)
-- The event's fields in one HSET, in order, rather than one call per field: a replay is
-- bound by the calls Redis runs.
if n_set > 0 then
  redis.call('HSET', h, unpack(ARGV, set_at, set_at + 2 * n_set - 1))
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
-- The index fields' new values follow from old and this event's writes, so which score
-- fields the loop below reads is known before reading: one HMGET of the same fields in
-- the same order (the zsets it touches in between are other keys). Unless a field is
-- one the event writes otherwise: then one HGET at a time, as ever.
local news = {}
local known = true
for j = 0, n_idx - 1 do
  local f = ARGV[idx_at + 3 * j]
  if f == 'seq' or f == 'updated_at' or f == 'conversation_id' or f == 'created_at'
      or f == 'first_response_ms' then
    known = false
  end
  for x = incr_at, incr_at + n_incr - 1 do
    if ARGV[x] == f then known = false end
  end
  local v = old[j]
  for x = 0, n_set - 1 do
    if ARGV[set_at + 2 * x] == f then v = ARGV[set_at + 2 * x + 1] end
  end
  news[j] = v
end
for x = 0, n_ext - 1 do
  if ARGV[ext_at + 3 * x] == h then known = false end
end
local unread
if known then
  local fields = {}
  for j = 0, n_idx - 1 do
    local k = idx_at + 3 * j
    fields[#fields + 1] = ARGV[k]
    if news[j] ~= '' then fields[#fields + 1] = ARGV[k + 2] end
  end
  fields[#fields + 1] = 'unread'
  local got = redis.call('HMGET', h, unpack(fields))
  local p = 1
  for j = 0, n_idx - 1 do
    local k = idx_at + 3 * j
    local new = got[p] or ''
    p = p + 1
    if old[j] ~= '' and old[j] ~= new then
      redis.call('ZREM', ARGV[k + 1] .. old[j], member)
    end
    if news[j] ~= '' then
      local score = got[p]
      p = p + 1
      if new ~= '' then
        if not score or score == '' then score = at end
        redis.call('ZADD', ARGV[k + 1] .. new, score, member)
      end
    end
  end
  unread = tonumber(got[p] or '0')
else
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
  unread = tonumber(redis.call('HGET', h, 'unread') or '0')
end
if unread > 0 then
  redis.call('ZADD', unread_key, unread, member)
else
  redis.call('ZREM', unread_key, member)
end
if ARGV[4] ~= '' then
  redis.call('RPUSH', messages, ARGV[4])
  redis.call('LTRIM', messages, -tonumber(ARGV[5]), -1)
end
redis.call('ZADD', conversations, at, member)
return 1
end
"""
_APPLY = _APPLY_EVENT + "return apply_event(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV)\n"

# Many events in one call: ARGV[1] is a JSON array of [key 1..4, [args as strings]]
# per event (what ``script_call`` gives), applied in order; returns how many applied.
# The keys travel in the payload, not KEYS: fine on a standalone Redis, which this model
# needs anyway (one call spans a tenant's conversations).
_APPLY_MANY = (
    _APPLY_EVENT
    + """
local applied = 0
for _, e in ipairs(cjson.decode(ARGV[1])) do
  applied = applied + apply_event(e[1], e[2], e[3], e[4], e[5])
end
return applied
"""
)

# Public for sinks that queue it in a transaction of their own (redis_rebuild).
APPLY_SCRIPT = _APPLY


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


@functools.lru_cache(maxsize=4096)
def _tenant_parts(tenant: str) -> tuple[str, str, tuple[str, ...]]:
    """A tenant's conversations and unread keys and its flattened index specs: the same
    for every event of the tenant, so made once."""
    specs = index_specs(tenant)
    flat = (str(len(specs)), *(part for spec in specs for part in spec))
    return conversations_key(tenant), unread_key(tenant), flat


def event_entry(event: Event | QueueEvent) -> list[Any]:
    """One event of an ``_APPLY_MANY`` payload: its four keys, then its arguments as
    strings (what redis-py would send for ``script_call``'s)."""
    change = changes(event)
    tenant = event.tenant_id
    conversation = event.conversation_id if isinstance(event, Event) else ""
    guard = (
        conversation_key(tenant, conversation)
        if conversation
        else queue_seq_key(tenant, str(getattr(event, "queue", "")))
    )
    conversations, unread, specs = _tenant_parts(tenant)
    args = [
        str(event.seq),
        conversation,
        str(event.occurred_at),
        _message_json(change.message) if change.message else "",
        _RECENT,
        str(len(change.set)),
    ]
    for name, value in change.set.items():
        args.append(name)
        args.append(_arg(value))
    args.append(str(len(change.incr)))
    args.extend(change.incr)
    args.append(str(len(change.ext)))
    for triple in change.ext:
        args.extend(map(_arg, triple))
    args.extend(specs)
    return [guard, messages_key(tenant, conversation), conversations, unread, args]


_RECENT = str(RECENT_MESSAGES)


def _arg(value: Any) -> str:
    # As redis-py encodes an argument: str as is, int and float by repr (bytes unused).
    return value if isinstance(value, str) else repr(value)


def _message_json(message: dict[str, Any]) -> str:
    # One encoder for the one-event and the batch paths: the list items stay identical.
    return orjson.dumps(message).decode()


def batch_payload(events: Sequence[Event | QueueEvent]) -> bytes:
    """``_APPLY_MANY``'s ARGV[1] for ``events``, in order."""
    return orjson.dumps([event_entry(e) for e in events])


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
        _message_json(change.message) if change.message else "",
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


# Events per ``_APPLY_MANY`` call: Redis runs a script to its end, so a call blocks
# other clients for about this many events' work (~10 µs each).
BATCH_EVENTS = 500


class RedisConversations:
    """The Redis read model: an ``EventSink`` for the projection agent and replay."""

    name = "redis"

    def __init__(self, client: aioredis.Redis, batch_events: int = BATCH_EVENTS) -> None:
        self._redis = client
        self._apply = client.register_script(_APPLY)
        self._apply_many = client.register_script(_APPLY_MANY)
        self._batch = batch_events

    async def apply(self, events: Sequence[Event | QueueEvent]) -> None:
        """Every event, in order, one script call per ``batch_events`` of them."""
        if len(events) == 1:
            keys, args = script_call(events[0])
            await self._apply(keys=keys, args=args)
            return
        await self.apply_payloads(self.payloads(events))

    def payloads(self, events: Sequence[Event | QueueEvent]) -> list[bytes]:
        """The batch script's payloads for ``events`` (CPU only: no I/O)."""
        return [
            batch_payload(events[start : start + self._batch])
            for start in range(0, len(events), self._batch)
        ]

    async def apply_payloads(self, payloads: Sequence[bytes]) -> None:
        """Run the batch script over ``payloads``, in order, in one round trip."""
        if not payloads:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for payload in payloads:
                await self._apply_many(keys=[], args=[payload], client=pipe)
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
