"""Redis-backed I/O for the AI responder, shared by every worker.

- ``RedisTokenSink``: streamed reply chunks published on the conversation's outbox
  channel; the web-chat socket relays them as they come (``connectors.webchat``).
- ``RedisCacheStore``: the semantic cache, one hash per (tenant, bucket); each entry
  carries its expiry, and the hash expires when its newest entry does.
- ``RedisRateLimiter``: one token bucket per tenant, updated atomically by a script,
  so N workers enforce one limit rather than N.

Every key starts with ``kefu:<tenant>:`` like the rest of kefu's Redis keys.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from schemas.keys import outbox_channel


def cache_key(tenant_id: str, bucket: str) -> str:
    return f"kefu:{tenant_id}:aicache:{bucket}"


def rate_key(tenant_id: str) -> str:
    return f"kefu:{tenant_id}:ai:rate"


class RedisTokenSink:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def send(self, tenant_id: str, conversation_id: str, frame: Mapping[str, Any]) -> None:
        message = json.dumps(frame, ensure_ascii=False)
        await self._redis.publish(outbox_channel(tenant_id, conversation_id), message)


class RedisCacheStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def entries(self, tenant_id: str, bucket: str) -> list[bytes]:
        values = await self._redis.hvals(cache_key(tenant_id, bucket))
        return [v.encode() if isinstance(v, str) else v for v in values]

    async def put(self, tenant_id: str, bucket: str, entry_id: str, value: str, ttl: float) -> None:
        key = cache_key(tenant_id, bucket)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, entry_id, value)
            pipe.expire(key, max(1, math.ceil(ttl)))
            await pipe.execute()

    async def drop(self, tenant_id: str, bucket: str, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            await self._redis.hdel(cache_key(tenant_id, bucket), *entry_ids)


# KEYS[1] bucket hash; ARGV rate/s, burst, now (s). Returns 1 if a token was taken.
_TAKE = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(held[1]), tonumber(held[2])
if tokens == nil then tokens, at = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local ok = 0
if tokens >= 1 then tokens = tokens - 1; ok = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / math.max(rate, 0.001)) + 60)
return ok
"""


class RedisRateLimiter:
    def __init__(
        self,
        redis: aioredis.Redis,
        rate: float,
        burst: float,
        overrides: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        self._redis = redis
        self._default = (rate, burst)
        self._overrides = dict(overrides or {})
        self._script = redis.register_script(_TAKE)

    async def allow(self, tenant_id: str) -> bool:
        rate, burst = self._overrides.get(tenant_id, self._default)
        taken = await self._script(keys=[rate_key(tenant_id)], args=[rate, burst, time.time()])
        return bool(taken)
