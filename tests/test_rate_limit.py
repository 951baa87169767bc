"""Rate limits: token buckets in Redis per tenant and per client (connectors/rate_limit.py),
on the real gateway (tenants rl and rl2 of tests/conftest.py: tenant 2/s burst 4,
client 1/s burst 3) and on the limiter itself against the session's Redis."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import websockets

from connectors.rate_limit import Limits, RateLimiter
from kefu.settings import Settings
from tests.conftest import wait_for


def gateway(settings: Settings) -> httpx.Client:
    g = settings.gateway
    return httpx.Client(base_url=f"http://{g.host}:{g.port}", timeout=30)


def key(tenant: str, which: str = "test") -> dict[str, str]:
    return {"X-Api-Key": f"{tenant}-{which}-key"}


def probe(http: httpx.Client, tenant: str, which: str = "test") -> httpx.Response:
    """A cheap authenticated call: an unknown conversation (404 = allowed through)."""
    return http.get(f"/v1/conversations/none-{uuid.uuid4().hex[:6]}", headers=key(tenant, which))


def flood(http: httpx.Client, tenant: str, which: str = "test") -> httpx.Response:
    for _ in range(50):
        response = probe(http, tenant, which)
        if response.status_code == 429:
            return response
        assert response.status_code == 404, response.text
    raise AssertionError("never limited")


def test_client_limit_429_then_refill_and_other_key_unaffected(pipeline: Settings) -> None:
    with gateway(pipeline) as http:
        limited = flood(http, "rl")
        body = limited.json()
        assert body["error"] == "rate_limited" and body["scope"] == "client", body
        assert body["retry_after"] > 0
        assert int(limited.headers["Retry-After"]) >= 1
        # The write path is limited the same way, and nothing is accepted.
        post = http.post("/v1/messages", json={"customer_id": "c", "text": "hi"}, headers=key("rl"))
        assert post.status_code == 429, post.text
        # Another key of the same tenant has its own client bucket.
        assert probe(http, "rl", "second").status_code == 404
        # Tokens come back at the refill rate.
        wait_for(lambda: probe(http, "rl").status_code == 404, 10, "client bucket refill")


def test_tenant_flood_does_not_limit_another_tenant(pipeline: Settings) -> None:
    with gateway(pipeline) as http:
        # Two keys of rl2 together exceed its tenant bucket (burst 4 < 2 x 3).
        scopes = []
        for _ in range(40):
            for which in ("test", "second"):
                response = probe(http, "rl2", which)
                if response.status_code == 429:
                    scopes.append(response.json()["scope"])
            if "tenant" in scopes:
                break
        assert "tenant" in scopes, scopes
        # rl (and a tenant with the defaults) are not affected by rl2's flood.
        wait_for(lambda: probe(http, "rl").status_code == 404, 10, "rl served")
        assert probe(http, "iso-a").status_code == 404
        wait_for(lambda: probe(http, "rl2", "second").status_code == 404, 10, "rl2 refilled")


def test_failed_logins_count_against_the_callers_ip(pipeline: Settings) -> None:
    """Wrong keys cost the IP's bucket (defaults here: high), and get 401 not 500."""
    with gateway(pipeline) as http:
        response = http.get("/v1/conversations/x", headers={"X-Api-Key": "guess"})
        assert response.status_code == 401


def test_chat_socket_frames_over_the_limit_get_an_error_frame(pipeline: Settings) -> None:
    g = pipeline.gateway

    async def chat() -> list[dict[str, Any]]:
        url = f"ws://{g.host}:{g.port}/v1/chat/ws?tenant=rl&customer=ws-{uuid.uuid4().hex[:6]}"
        frames: list[dict[str, Any]] = []
        async with websockets.connect(url) as socket:
            frames.append(json.loads(await socket.recv()))  # history (or a limit error)
            if frames[0].get("error") == "rate_limited":
                return frames  # the tenant's bucket was already empty: refused at connect
            for i in range(12):
                await socket.send(json.dumps({"type": "typing", "n": i}))
            # Typing frames get no answer unless limited: read until an error frame.
            while not any(f.get("error") == "rate_limited" for f in frames):
                frames.append(json.loads(await asyncio.wait_for(socket.recv(), 10)))
        return frames

    frames = asyncio.run(chat())
    error = next(f for f in frames if f.get("error") == "rate_limited")
    assert error["type"] == "error" and error["retry_after"] > 0


@pytest.fixture
def redis_url(pipeline: Settings) -> str:
    return pipeline.redis.dsn


def test_two_gateways_share_one_bucket(redis_url: str) -> None:
    """Two limiters (as in two gateway processes) draw from the same Redis bucket."""

    async def run() -> tuple[list[bool], float]:
        client = aioredis.Redis.from_url(redis_url)
        limits = Limits(
            tenant_per_second=0, tenant_burst=0, client_per_second=1.0, client_burst=4.0
        )
        one, two = RateLimiter(client, limits), RateLimiter(client, limits)
        client_id = f"shared-{uuid.uuid4().hex}"
        allowed = []
        for i in range(6):
            limiter = one if i % 2 else two
            allowed.append(await limiter.check("rl-unit", client_id) is None)
        limited = await one.check("rl-unit", client_id)
        await client.aclose()
        assert limited is not None
        return allowed, limited.retry_after

    allowed, retry_after = asyncio.run(run())
    assert allowed == [True, True, True, True, False, False]
    assert 0 < retry_after <= 1.0


def test_limiter_lets_requests_through_when_redis_is_down() -> None:
    async def run() -> object:
        client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
        try:
            return await RateLimiter(client, Limits()).check("t", "c")
        finally:
            await client.aclose()

    assert asyncio.run(run()) is None
