"""The Redis read model is a function of the events: applying them again, or
replaying the log into it, changes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import uuid

import redis.asyncio as aioredis

from kefu.settings import Settings
from projections.redis_state import RedisConversations, script_call
from schemas.keys import conversation_key, conversations_key, messages_key, tenant_prefix
from schemas.records import Event, RecordDelivery, RecordReply
from streams.lifecycle import Conversation, decide, evolve
from tests.test_lifecycle import POLICY, receive
from tests.test_redis_projection import Conv, traffic


def conversation_log(tenant: str, text: str = "where is my order") -> list[Event]:
    state, log = Conversation(), []
    for n in (1, 2):
        events = decide(state, receive(n, text=text, tenant=tenant), POLICY)
        for event in events:
            state = evolve(state, event)
        reply = RecordReply(
            command_id=f"reply-{n}",
            conversation_id="conv-1",
            tenant_id=tenant,
            issued_at=5000 + n,
            in_reply_to=state.awaiting_reply[0],
            text=f"answer {n}: {text}",
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


def mixed_log(tenant: str) -> list[Event]:
    """Thirty conversations with Chinese texts of growing length, one long enough to
    leave Redis's compact encoding, and routing traffic, interleaved as conversations
    share a partition."""
    logs = [
        [
            dataclasses.replace(e, conversation_id=f"conv-{k}")
            for e in conversation_log(tenant, text="我的订单在哪里？" * (1 + k % 4) + f" #{k}")
        ]
        for k in range(30)
    ]
    long = Conv(tenant, "conv-long")
    logs.append(
        [
            *long.received(100, text="退款" * 40),
            long.routed(110, "agent-7"),
            long.reply(120, "agent-7"),
            *long.received(130, text="还没到" * 30),
            long.closed(140),
        ]
    )
    logs.append(traffic(tenant))
    return [e for batch in itertools.zip_longest(*logs) for e in batch if e is not None]


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


async def tenant_snapshot(client: aioredis.Redis, tenant: str) -> dict[bytes, bytes | None]:
    keys = sorted([k async for k in client.scan_iter(match=f"{tenant_prefix(tenant)}*")])
    return {key: await client.dump(key) for key in keys}


# The one-event script as it was before batching and its read merging (git history:
# projections/redis_state.py): the reference the batch script must match, byte for byte.
ORIGINAL_APPLY = """
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


def test_a_batched_call_writes_what_one_call_per_event_writes(pipeline: Settings) -> None:
    """``apply`` sends many events per script call and merges reads of a hash into
    HMGETs; the state must be the one the original one-event script leaves, byte for
    byte, also for hashes big enough to leave Redis's compact encoding (a long Chinese
    text: values over 64 bytes), whose table layout depends on every operation."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    log = mixed_log(tenant)

    async def run() -> None:
        client = aioredis.Redis.from_url(pipeline.redis.dsn)
        original = client.register_script(ORIGINAL_APPLY)
        try:
            for event in log:  # the reference: one call of the original script per event
                keys, args = script_call(event)
                await original(keys=keys, args=args)
            for event in log[::3]:  # and some redelivered
                keys, args = script_call(event)
                await original(keys=keys, args=args)
            reference = await tenant_snapshot(client, tenant)
            assert len(reference) > 60
            await client.delete(*reference)
            model = RedisConversations(client, batch_events=7)  # chunks cross conversations
            await model.apply(log[:100])
            await model.apply(log[90:])  # an overlap: redelivered events change nothing
            await model.apply(log[::3])
            assert await tenant_snapshot(client, tenant) == reference
            await model.apply(log)
            assert await tenant_snapshot(client, tenant) == reference
            await client.delete(*reference)
            for event in log:  # the one-event path of the new script
                await model.apply([event])
            await model.apply(log[::3])
            assert await tenant_snapshot(client, tenant) == reference
            encodings = {
                await client.object("encoding", conversation_key(tenant, f"conv-{k}"))
                for k in range(30)
            }
            assert encodings == {b"hashtable", b"listpack"}  # both kinds are covered
        finally:
            await client.aclose()

    asyncio.run(run())
