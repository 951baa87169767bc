"""The gateway: every channel's HTTP and WebSocket edge in one ASGI app.

It turns requests into commands on the log and never waits for the pipeline: a 202
means the command is durable in Kafka. Replies come back through delivery (webhooks)
or the Redis outbox (WebSockets).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from connectors import (
    accounts,
    admin_api,
    admin_config,
    console,
    dashboard,
    files_api,
    privacy_api,
    rest_api,
    routing_api,
    webchat,
)
from connectors.attachments import Quota
from connectors.auth import AuthConfig, KeyRing
from connectors.body_limit import BodyLimit
from connectors.config_log import ConfigFollower, SecretBox
from connectors.live_agents import LiveAgentDirectory
from connectors.live_channels import live_telegram, live_wechat
from connectors.metrics import metrics_endpoint, ready_response
from connectors.outbox_hub import OutboxHub
from connectors.publisher import CommandPublisher
from connectors.rate_limit import Limits, RateLimited, RateLimiter, rate_limited_response
from connectors.telegram import TelegramEdge
from connectors.telegram import router as telegram_router
from connectors.thumbnails import Thumbnails
from connectors.uploads import Files
from connectors.wechat import WeChatEdge
from connectors.wechat import router as wechat_router
from kefu.long_lived import keep_long_lived_out_of_gc
from schemas.config import ConfigState
from schemas.records import ConfigChanged


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    bootstrap: str
    commands_topic: str
    redis_url: str
    api_keys: Mapping[str, str]  # tenant -> plaintext API key (tests); hashed on load
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
    # Key hashes per role, WebSocket origins, rate limits (connectors/auth.py, rate_limit.py).
    auth: AuthConfig = field(default_factory=AuthConfig)
    rate_limits: Limits = field(default_factory=Limits)
    tenant_rate_limits: Mapping[str, Limits] = field(default_factory=dict)
    # Kafka security options of the command publisher (SASL/TLS; empty = PLAINTEXT).
    kafka_options: Mapping[str, object] = field(default_factory=dict)
    redis_connections: int = 100  # the process's Redis pool; more requests wait
    # Seconds between gc.freeze() calls (0 = off) and between full collections of
    # what was frozen: see kefu.long_lived.
    gc_freeze_s: float = 0.0
    gc_full_s: float = 3600.0
    # Attachments: blob store, link signer, policy (None: uploads answer 503).
    files: Files | None = None
    # Configuration as events (schemas/config.py): the topic every gateway follows
    # ("" = none: tests of the bare app), the key that seals secrets, and the entities
    # to write on a first run (from the environment) when the topic lacks them.
    config_topic: str = ""
    config_key: bytes = b""
    config_seed: tuple[ConfigChanged, ...] = ()
    # Erasing customers (``connectors/privacy_api.py``; kefu injects it; None: 503).
    privacy: Any = None


@dataclass(slots=True)
class Services:
    publisher: CommandPublisher
    redis: aioredis.Redis
    tenants: KeyRing  # tenant ids and their keys (connectors/auth.py)
    outbox: OutboxHub


def create_app(config: GatewayConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        publisher = CommandPublisher(
            config.bootstrap,
            config.commands_topic,
            config.routing_topic,
            config.kafka_options,
            config_topic=config.config_topic,
        )
        await publisher.start()
        follower = None
        app.state.config = ConfigState()
        if config.config_key:
            app.state.config_box = SecretBox(config.config_key)
        # WeChat and Telegram credentials: the live configuration's, the settings' below.
        box = getattr(app.state, "config_box", None)
        app.state.wechat = live_wechat(config.wechat, app.state.config, box)
        app.state.telegram = live_telegram(config.telegram, app.state.config, box)
        if config.config_topic:
            follower = ConfigFollower(
                config.bootstrap, config.config_topic, app.state.config, config.kafka_options
            )
            await follower.start()
            # The console's accounts: the environment's, with the live config on top.
            app.state.agents = LiveAgentDirectory(app.state.config, config.agents)
            for record in config.config_seed:  # first run: what the environment says
                key = (record.tenant_id, record.kind, record.entity_id)
                if not app.state.config.version(*key):
                    await publisher.publish_config(record)
        # A burst of sockets opening (limiter, history) waits for a pooled connection
        # instead of failing with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            config.redis_url, max_connections=config.redis_connections, timeout=20
        )
        client = aioredis.Redis.from_pool(pool)
        outbox = OutboxHub(client)
        await outbox.start()
        # Tenants of the settings and of the live configuration (created in /admin).
        ring = KeyRing(config.auth.with_plain_api_keys(config.api_keys), client, app.state.config)
        app.state.services = Services(publisher, client, ring, outbox)
        app.state.limiter = RateLimiter(client, config.rate_limits, config.tenant_rate_limits)
        if config.files is not None:
            await config.files.store.ensure()  # a first start against MinIO: the bucket
            quota_bytes = config.files.policy.tenant_quota_bytes
            quota = Quota(client, config.files.store, quota_bytes) if quota_bytes else None
            # Thumbnails asked for before the worker made them (connectors/thumbnails.py).
            thumbnails = Thumbnails(
                config.files.store,
                config.files.policy,
                concurrency=config.files.thumbnail_concurrency,
                redis=client,
            )
            app.state.files = dataclasses.replace(config.files, quota=quota, thumbnails=thumbnails)
        collector = None
        if config.gc_freeze_s > 0:
            # Held sockets out of the cyclic GC's scans (a full collection over 20,000
            # sockets stalled the loop 2.2 s: bench/RESULTS.md "Web chat sockets").
            collector = asyncio.create_task(
                keep_long_lived_out_of_gc(config.gc_freeze_s, config.gc_full_s)
            )
        try:
            yield
        finally:
            if collector is not None:
                collector.cancel()
            await outbox.stop()
            if follower is not None:
                await follower.stop()
            await publisher.stop()
            await client.aclose()

    # /docs and /redoc from the package's own copies of Swagger UI and ReDoc: the
    # pages work without internet (FastAPI's defaults load them from a CDN).
    app = FastAPIOffline(
        title="kefu gateway",
        version="0.1.0",
        description="Customer messages in (REST, web chat), replies out.",
        lifespan=lifespan,
    )
    # Uploads may be larger than other bodies: their own limit (the largest channel's,
    # plus the multipart framing); each channel's own limit is checked per file (413).
    uploads = {}
    if config.files is not None:
        upload_limit = config.files.policy.largest_limit + 64 * 1024
        uploads = {path: upload_limit for path in files_api.UPLOAD_PATHS}
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, per_path=uploads)
    app.add_middleware(webchat.ChatSocketShortcut)
    app.add_exception_handler(RateLimited, rate_limited_response)
    app.include_router(rest_api.router)
    app.include_router(files_api.router)
    app.include_router(routing_api.router)
    app.include_router(admin_api.router)
    # Accounts (sign-in, sessions) and live administration (/admin, /v1/admin/config).
    app.include_router(accounts.router)
    app.include_router(admin_config.router)
    app.include_router(admin_config.pages)
    app.include_router(privacy_api.router)
    app.state.privacy = config.privacy
    app.state.bootstrap = config.bootstrap  # admin_config reads the word-list topic
    app.state.kafka_options = config.kafka_options
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

    async def ready() -> tuple[bool, dict[str, object]]:
        services: Services | None = getattr(app.state, "services", None)
        if services is None or not services.publisher.started:
            return False, {"kafka": "producer not started"}
        await services.redis.ping()
        return True, {}

    # Operations: unauthenticated and out of the OpenAPI document (connectors/metrics.py).
    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        return await ready_response(ready)

    app.add_api_route("/metrics", metrics_endpoint, include_in_schema=False)
    return app
