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
from schemas.sealing import ERASED

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
# field has that value, scored by the score field (or the event's time if that is
# empty); the old value's zset loses it when the value changes.
#
# A replay is bound by the calls Redis runs (bench/redis_script.py), so one event is
# one HMGET of every field its writes depend on, the new values worked out here, one
# HSET, and only the index writes that change something: an index entry whose value
# and score field are unchanged already holds that score, an unchanged unread count is
# already in (or out of) its zset, a list at or under its cap needs no LTRIM. The
# state is the one the one-command-per-step script left (tests/test_redis_state.py
# checks it against that script); the one-event and the batch scripts both run this
# function, so live writes, redeliveries and replays leave byte-identical DUMPs.
_APPLY_EVENT = """
-- The writes to a hash, in the order the steps make them: a field written twice keeps
-- its first place and its last value; one that already holds the value is not written.
local function put(w, f, v)
  if not w.placed[f] and w.cur[f] ~= v then w.placed[f] = true; w.order[#w.order + 1] = f end
  w.cur[f] = v
end
local function apply_event(h, messages, conversations, unread_key, ARGV)
local member = ARGV[2]
local at = ARGV[3]
local i = 6
local n_set = tonumber(ARGV[i]); local set_at = i + 1; i = i + 1 + 2 * n_set
local n_incr = tonumber(ARGV[i]); local incr_at = i + 1; i = i + 1 + n_incr
local n_ext = tonumber(ARGV[i]); local ext_at = i + 1; i = i + 1 + 3 * n_ext
local n_idx = tonumber(ARGV[i]); local idx_at = i + 1
if member == '' then
  -- A queue's event (routing: presence, ...): its guard and tenant hashes only.
  if tonumber(ARGV[1]) <= tonumber(redis.call('HGET', h, 'seq') or '0') then return 0 end
  redis.call('HSET', h, 'seq', ARGV[1])
  for j = 0, n_ext - 1 do
    local k = ext_at + 3 * j
    redis.call('HSET', ARGV[k], ARGV[k + 1], ARGV[k + 2])
  end
  return 1
end
local reads = {'seq', 'updated_at', 'conversation_id', 'created_at', 'first_response_ms', 'unread'}
for j = 0, n_idx - 1 do
  reads[#reads + 1] = ARGV[idx_at + 3 * j]
  reads[#reads + 1] = ARGV[idx_at + 3 * j + 2]
end
for j = incr_at, incr_at + n_incr - 1 do reads[#reads + 1] = ARGV[j] end
for j = set_at, set_at + 2 * n_set - 1, 2 do reads[#reads + 1] = ARGV[j] end
local got = redis.call('HMGET', h, unpack(reads))
if tonumber(ARGV[1]) <= tonumber(got[1] or '0') then return 0 end
local old, cur = {}, {}
for j = 1, #reads do
  if got[j] then old[reads[j]] = got[j]; cur[reads[j]] = got[j] end
end
local w = {order = {}, placed = {}, cur = cur}
put(w, 'seq', ARGV[1]); put(w, 'updated_at', at); put(w, 'conversation_id', member)
if not cur['created_at'] then put(w, 'created_at', at) end
for j = set_at, set_at + 2 * n_set - 1, 2 do put(w, ARGV[j], ARGV[j + 1]) end
for j = incr_at, incr_at + n_incr - 1 do
  local f = ARGV[j]
  put(w, f, string.format('%d', (tonumber(cur[f]) or 0) + 1))
  if f == 'replies' and not cur['first_response_ms'] then
    put(w, 'first_response_ms', string.format('%d', tonumber(at) - tonumber(cur['created_at'])))
  end
end
local pairs_ = {}  -- never empty: the guard above makes seq change
for _, f in ipairs(w.order) do
  pairs_[#pairs_ + 1] = f; pairs_[#pairs_ + 1] = cur[f]
end
redis.call('HSET', h, unpack(pairs_))
for j = 0, n_ext - 1 do
  local k = ext_at + 3 * j
  redis.call('HSET', ARGV[k], ARGV[k + 1], ARGV[k + 2])
  if ARGV[k] == h then cur[ARGV[k + 1]] = ARGV[k + 2] end
end
for j = 0, n_idx - 1 do
  local k = idx_at + 3 * j
  local f, prefix, sf = ARGV[k], ARGV[k + 1], ARGV[k + 2]
  local was, new = old[f] or '', cur[f] or ''
  if was ~= '' and was ~= new then redis.call('ZREM', prefix .. was, member) end
  if new ~= '' then
    local score = cur[sf] or ''
    if not (was == new and score ~= '' and score == (old[sf] or '')) then
      if score == '' then score = at end
      redis.call('ZADD', prefix .. new, score, member)
    end
  end
end
local unread = tonumber(cur['unread'] or '0')
if unread ~= tonumber(old['unread'] or '0') then
  if unread > 0 then
    redis.call('ZADD', unread_key, unread, member)
  else
    redis.call('ZREM', unread_key, member)
  end
end
if ARGV[4] ~= '' then
  if redis.call('RPUSH', messages, ARGV[4]) > tonumber(ARGV[5]) then
    redis.call('LTRIM', messages, -tonumber(ARGV[5]), -1)
  end
end
if old['updated_at'] ~= at then redis.call('ZADD', conversations, at, member) end
return 1
end
"""
_APPLY = _APPLY_EVENT + "return apply_event(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV)\n"

# Many events in one call: the payload is a JSON array of [key 1..4, [args as strings]]
# per event (what ``script_call`` gives), applied in order; returns how many applied.
# The keys travel in the payload, not KEYS: fine on a standalone Redis, which this model
# needs anyway (one call spans a tenant's conversations).
_APPLY_BATCH = (
    _APPLY_EVENT
    + """
local function apply_batch(payload)
  local applied = 0
  for _, e in ipairs(cjson.decode(payload)) do
    applied = applied + apply_event(e[1], e[2], e[3], e[4], e[5])
  end
  return applied
end
"""
)
_APPLY_MANY = _APPLY_BATCH + "return apply_batch(ARGV[1])\n"

# The live projection's batch call (projections.redis_rebuild), one round trip a batch:
# KEYS[1] the model's epoch marker, KEYS[2] its positions hash; ARGV[1] a payload as
# ``_APPLY_MANY``'s, ARGV[2..] field/value pairs for the positions (a batch's last call).
# The marker is checked in the same atomic call as the writes, so no WATCH is needed:
# without it nothing is written and ``MARKER_MISSING`` is returned.
MARKER_MISSING = -1  # never a count of events applied
APPLY_IF_MARKED = (
    _APPLY_BATCH
    + f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {MARKER_MISSING} end
local applied = apply_batch(ARGV[1])
if #ARGV > 1 then redis.call('HSET', KEYS[2], unpack(ARGV, 2)) end
return applied
"""
)


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


def _listed_attachments(event: Event) -> list[dict[str, Any]]:
    """A message's attachments as its list entry shows them: metadata, no URL (the
    gateway signs a URL per reader when it serves the entry)."""
    # Records live; a replay's fold (projections.redis_fold.view) hands the decoded
    # dicts, which hold the same fields in the same (the schema's) order.
    return [a if isinstance(a, dict) else a.to_avro() for a in _get(event, "attachments", ())]


def _attachment_preview(attachments: list[dict[str, Any]]) -> str:
    # The conversation list's preview of a message with no text: "[image] name".
    return " ".join(f"[{a['kind']}] {a['name']}" for a in attachments)


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
    message = {
        "id": _get(event, "message_event_id"),
        "role": "customer",
        "text": text,
        "at": event.occurred_at,
        "verdict": verdict,
    }
    attachments = _listed_attachments(event)
    if attachments:  # entries without any stay as they were before attachments
        message["attachments"] = attachments
    preview = text or _attachment_preview(attachments)
    return Change(
        set={
            "last_message": preview[:PREVIEW],
            "last_message_at": _at(event),
            "moderation": verdict,
        },
        message=message,
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
    message = {
        "id": event.event_id,
        "role": author if author in ("ai", "system") else "agent",
        "author": author,
        "text": text,
        "at": event.occurred_at,
    }
    attachments = _listed_attachments(event)
    if attachments:
        message["attachments"] = attachments
    preview = text or _attachment_preview(attachments)
    return Change(
        set={
            "last_message": preview[:PREVIEW],
            "last_message_at": _at(event),
            "last_reply_at": _at(event),
            "last_reply_author": author,
            "unread": "0",
        },
        incr=("replies",),
        message=message,
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


@on("NoteAdded")
def _note(event: Event) -> Change:
    # In the message list with its own role, which every customer-facing reader drops
    # (connectors.uploads.shown_messages); no preview, unread or reply field moves, so
    # the conversation list and the customer's state look as if it were not there.
    author = str(_get(event, "author"))
    return Change(
        message={
            "id": event.event_id,
            "role": "note",
            "author": author,
            "text": str(_get(event, "text")),
            "at": event.occurred_at,
        }
    )


@on("CustomerErased")
def _erased(event: Event) -> Change:
    # The preview goes; the recent-messages list is redacted after the batch that
    # holds this event (projections.redis_erase: its entries are rewritten in place).
    return Change(set={"last_message": ERASED, "erased_at": _at(event)})


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
