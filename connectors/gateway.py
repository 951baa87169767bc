"""The gateway: every channel's HTTP and WebSocket edge in one ASGI app.

It turns requests into commands on the log and never waits for the pipeline: a 202
means the command is durable in Kafka. Replies come back through delivery (webhooks)
or the Redis outbox (WebSockets).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from connectors import console, dashboard, rest_api, routing_api, webchat
from connectors.body_limit import BodyLimit
from connectors.outbox_hub import OutboxHub
from connectors.publisher import CommandPublisher
from connectors.telegram import TelegramEdge
from connectors.telegram import router as telegram_router
from connectors.wechat import WeChatEdge
from connectors.wechat import router as wechat_router


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    bootstrap: str
    commands_topic: str
    redis_url: str
    api_keys: Mapping[str, str]  # tenant -> API key
    ai_tenants: frozenset[str] = frozenset()
    # The analytics reports behind /dashboard (kefu injects them; None: 503).
    dashboard: dashboard.DashboardData | None = None
    routing_topic: str = "kefu.routing"
    max_body_bytes: int = 1024 * 1024  # larger request bodies: 413 (connectors/body_limit.py)
    # WeChat (Official Account, mini-program) and Telegram callbacks; empty = off.
    wechat: WeChatEdge = field(default_factory=WeChatEdge)
    telegram: TelegramEdge = field(default_factory=TelegramEdge)
    # Who may log in to /console: tenant -> agent id -> account (token hash, team, ...).
    agents: console.AgentDirectory = field(default_factory=dict)


class Tenants:
    def __init__(self, api_keys: Mapping[str, str]) -> None:
        self._keys = [(tenant, key.encode()) for tenant, key in api_keys.items() if key]
        self.ids = frozenset(api_keys)

    def by_api_key(self, presented: str) -> str | None:
        """Constant-time over every tenant, so timing does not reveal which key is close."""
        found = None
        candidate = presented.encode()
        for tenant, key in self._keys:
            if hmac.compare_digest(candidate, key):
                found = tenant
        return found


@dataclass(slots=True)
class Services:
    publisher: CommandPublisher
    redis: aioredis.Redis
    tenants: Tenants
    outbox: OutboxHub


def create_app(config: GatewayConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        publisher = CommandPublisher(config.bootstrap, config.commands_topic, config.routing_topic)
        await publisher.start()
        client = aioredis.Redis.from_url(config.redis_url)
        outbox = OutboxHub(client)
        await outbox.start()
        app.state.services = Services(publisher, client, Tenants(config.api_keys), outbox)
        try:
            yield
        finally:
            await outbox.stop()
            await publisher.stop()
            await client.aclose()

    app = FastAPI(
        title="kefu gateway",
        version="0.1.0",
        description="Customer messages in (REST, web chat), replies out.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.include_router(rest_api.router)
    app.include_router(routing_api.router)
    app.include_router(webchat.router)
    app.include_router(dashboard.router)
    app.include_router(wechat_router)
    app.include_router(telegram_router)
    app.state.wechat = config.wechat
    app.state.telegram = config.telegram
    app.include_router(console.router)
    app.state.agents = config.agents
    app.state.dashboard = config.dashboard

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> JSONResponse:
        services: Services = app.state.services
        try:
            await services.redis.ping()
        except aioredis.RedisError as exc:
            return JSONResponse({"status": "degraded", "redis": repr(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    return app
