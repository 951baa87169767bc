"""A worker process: the Faust app with every agent, wired to its I/O.

More workers (same code, same group) split the partitions between them.
"""

from __future__ import annotations

from typing import Any

import faust
import redis.asyncio as aioredis

from connectors.delivery import ChannelDeliverer, WebhookTarget
from kefu.settings import Settings
from projections.redis_state import RedisConversations
from schemas.topics import TopicNames
from streams import conversation, delivery, projection, responder
from streams.app import KefuApp, StreamsConfig, build_app
from streams.lifecycle import Policy
from streams.moderation import Moderator
from streams.responders import OfflineResponder
from streams.routing import router


def build_worker(settings: Settings, web_port: int | None = None) -> KefuApp:
    kefu = build_app(
        StreamsConfig(
            app_id=settings.app_id,
            broker=settings.kafka.servers,
            partitions=settings.kafka.partitions,
            datadir=settings.state_dir.absolute() / "faust",
            topics=TopicNames(settings.topic_prefix),
            web_port=web_port or settings.worker.web_port,
            web_host=settings.worker.web_host,
            concurrency=settings.worker.concurrency,
        )
    )
    tenants = settings.tenants

    def ai_enabled(tenant_id: str) -> bool:
        tenant = tenants.get(tenant_id)
        return tenant is not None and tenant.ai_enabled

    redis = aioredis.Redis.from_url(settings.redis.dsn)
    webhooks = {
        tenant_id: WebhookTarget(t.webhook_url, t.webhook_secret.get_secret_value().encode())
        for tenant_id, t in tenants.items()
        if t.webhook_url
    }
    conversation.install(kefu, Policy(Moderator(), router(ai_enabled)))
    responder.install(kefu, OfflineResponder())
    delivery.install(kefu, ChannelDeliverer(redis, webhooks))
    projection.install(kefu, RedisConversations(redis))
    _install_health(kefu)
    return kefu


def _install_health(kefu: KefuApp) -> None:
    app = kefu.app

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        assigned = len(app.consumer.assignment()) if app.consumer else 0
        ready = assigned > 0 and not app.rebalancing
        body = {"status": "ok" if ready else "starting", "assigned_partitions": assigned}
        return web.json(body, status=200 if ready else 503)


def run_worker(settings: Settings, web_port: int | None = None) -> None:
    kefu = build_worker(settings, web_port)
    worker = faust.Worker(kefu.app, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()
