"""Token buckets in Redis, so every gateway process shares one limit per tenant and per
client (API key, IP, WebSocket).

A bucket holds up to ``burst`` tokens and refills at ``per_second``; a request takes
one token from its tenant's bucket and one from its client's, all or nothing, in one
Lua script (atomic, one round trip, the clock is Redis's own so gateways' clocks do
not matter). Why not a library: throttled-py (the maintained token bucket with a Redis
backend) requires redis<8 and kefu is on redis 8; ``limits`` has only window
strategies; pyrate-limiter is a leaky bucket and checks one bucket per call.

If Redis cannot be reached the limiter lets the request through (and says so in the
log): an outage of the limiter's store must not stop customers' messages.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis
from fastapi import Request
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)

# KEYS: bucket keys. ARGV: cost, then per_second and burst of each bucket in order.
# Returns {1, 0, 0} when every bucket had the tokens (and takes them), else
# {0, milliseconds until the emptiest has them, 1-based index of that bucket}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local cost = tonumber(ARGV[1])
local tokens = {}
local wait, which = 0, 0
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i]) / 1000
  local burst = tonumber(ARGV[2 * i + 1])
  local state = redis.call('HMGET', key, 'tokens', 'at')
  local level = tonumber(state[1]) or burst
  local at = tonumber(state[2]) or now
  level = math.min(burst, level + math.max(0, now - at) * rate)
  tokens[i] = level
  if level < cost then
    local need = math.ceil((cost - level) / rate)
    if need > wait then wait, which = need, i end
  end
end
if which > 0 then return {0, wait, which} end
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i]) / 1000
  local burst = tonumber(ARGV[2 * i + 1])
  redis.call('HSET', key, 'tokens', tostring(tokens[i] - cost), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(burst / rate) + 1000)
end
return {1, 0, 0}
"""


@dataclass(frozen=True, slots=True)
class Limits:
    """Refill per second and capacity of the tenant's and each client's bucket; a
    ``per_second`` of 0 turns that bucket off."""

    tenant_per_second: float = 2000.0
    tenant_burst: float = 4000.0
    client_per_second: float = 1000.0
    client_burst: float = 2000.0


class RateLimited(Exception):
    def __init__(self, retry_after: float, scope: str) -> None:
        super().__init__(f"rate limit of the {scope} exceeded; retry after {retry_after:.2f} s")
        self.retry_after = retry_after
        self.scope = scope

    def body(self) -> dict[str, object]:
        return {
            "error": "rate_limited",
            "detail": str(self),
            "scope": self.scope,
            "retry_after": round(self.retry_after, 3),
        }


def bucket_keys(tenant: str | None, client: str, namespace: str = "kefu-rl") -> tuple[str, str]:
    """The tenant's bucket and the client's (within the tenant; IPs before a tenant is
    known go under "-"). Each limiter has its own ``namespace``: one key must never be
    refilled at two different rates."""
    if tenant is None:
        return "", f"{namespace}:-:client:{client}"
    return f"{namespace}:{tenant}:tenant", f"{namespace}:{tenant}:client:{client}"


class RateLimiter:
    def __init__(
        self,
        redis: aioredis.Redis,
        default: Limits | None = None,
        per_tenant: Mapping[str, Limits] | None = None,
        namespace: str = "kefu-rl",
    ) -> None:
        self.default = default or Limits()
        self.per_tenant = dict(per_tenant or {})
        self.namespace = namespace
        self._script = redis.register_script(_SCRIPT)

    def limits(self, tenant: str | None) -> Limits:
        return self.per_tenant.get(tenant, self.default) if tenant else self.default

    async def check(self, tenant: str | None, client: str, cost: float = 1.0) -> RateLimited | None:
        """None if allowed (the tokens are taken), else why not and for how long."""
        limits = self.limits(tenant)
        tenant_key, client_key = bucket_keys(tenant, client, self.namespace)
        keys: list[str] = []
        args: list[float] = [cost]
        scopes: list[str] = []
        if tenant_key and limits.tenant_per_second > 0:
            keys.append(tenant_key)
            args += [limits.tenant_per_second, limits.tenant_burst]
            scopes.append("tenant")
        if limits.client_per_second > 0:
            keys.append(client_key)
            args += [limits.client_per_second, limits.client_burst]
            scopes.append("client")
        if not keys:
            return None
        try:
            allowed, wait_ms, which = await self._script(keys=keys, args=args)
        except (aioredis.RedisError, OSError) as exc:
            log.warning("rate limiter unavailable, request let through: %r", exc)
            return None
        if int(allowed):
            return None
        return RateLimited(int(wait_ms) / 1000, scopes[int(which) - 1])

    async def enforce(self, tenant: str | None, client: str) -> None:
        limited = await self.check(tenant, client)
        if limited is not None:
            raise limited


async def rate_limited_response(request: Request, exc: Exception) -> JSONResponse:
    """429 with a JSON body saying which limit and ``Retry-After`` in whole seconds."""
    assert isinstance(exc, RateLimited)
    return JSONResponse(
        exc.body(),
        status_code=429,
        headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))},
    )
