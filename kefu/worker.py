"""A worker process: the Faust app with every agent, wired to its I/O.

More workers (same code, same group) split the partitions between them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, cast

import faust
import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST

from connectors.config_log import SecretBox, shown
from connectors.delivery import ChannelDeliverer, WebhookTarget
from connectors.live_channels import live_webhooks
from connectors.metrics import metrics_text
from connectors.thumbnails import Thumbnails
from kefu.ai import build_responder
from kefu.channels import channel_senders
from kefu.config import ConfigService, config_key
from kefu.data_keys import KeyService, install, key_store
from kefu.erasure import run_retention
from kefu.files import attachment_policy, blob_store, url_signer
from kefu.long_lived import keep_long_lived_out_of_gc
from kefu.settings import Settings
from kefu.telemetry import setup_tracing
from kefu.topics import ensure_topics_blocking
from projections.redis_erase import RedisRedactor
from projections.redis_rebuild import RebuildingRedisModel, log_fold, log_rebuild
from projections.redis_state import RedisConversations
from projections.replay import replay_topics
from schemas.config import SINGLE, ConfigState
from schemas.topics import TopicNames
from streams import router as queue_router
from streams import timers, wordlists
from streams.app import KefuApp, StreamsConfig, build_app
from streams.batch_consumer import BatchConsumer, direct_sends
from streams.conversation import ConversationAgent, agent_config
from streams.event_reader import EventReader, reader_config
from streams.hot_producer import ClosedLast, HotProducer, librdkafka_config
from streams.lifecycle import Policy
from streams.metrics import watch_app, watch_reader
from streams.moderation import Moderator, SpamLimits, WordList
from streams.responder import ResponderPool
from streams.responders import TenantFaq
from streams.routing import TenantRouting, router
from streams.telemetry import traced_app

log = logging.getLogger(__name__)


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
            fetch_max_wait_ms=settings.worker.fetch_max_wait_ms,
            fetch_min_bytes=settings.worker.fetch_min_bytes,
            producer_linger_s=settings.worker.linger_ms / 1000,
            kafka_options=settings.kafka.client_options(),
            librdkafka_options=settings.kafka.librdkafka_security(),
            librdkafka_consumer=settings.worker.librdkafka_consumer,
            session_timeout=settings.reliability.session_timeout_s,
            heartbeat_interval=settings.reliability.heartbeat_interval_s,
            rebalance_timeout=settings.reliability.rebalance_timeout_s,
            processing_guarantee=settings.reliability.processing_guarantee,
            redeliver_lost_after_s=settings.reliability.redeliver_lost_after_s,
            redeliver_stuck_after_s=settings.reliability.redeliver_stuck_after_s,
        )
    )
    kefu = traced_app(kefu)  # sends carry trace context and the origin time (telemetry)
    tenants = settings.tenants
    # Configuration as events (schemas/config.py): read whole before the agents start,
    # then followed live; what it says wins over the environment's seed.
    live = ConfigState()
    kefu.app.add_dependency(ConfigService(settings, live))
    _install_config_page(kefu, live)
    # Crypto-shredding (schemas/sealing.py): the customers' data keys, read whole before
    # the agents start; keys made here go out with the app's producer, so the hot
    # path's checkpoint checks them with the events sealed under them.
    keys = key_store(settings)
    keys_topic = TopicNames(settings.topic_prefix).keys
    # The hot path's records (events, commands, keys, the table's changelog) go out
    # with librdkafka, not aiokafka (streams/hot_producer.py: bench/RESULTS.md).
    producer = (
        HotProducer(
            librdkafka_config(
                settings.kafka.servers,
                f"{settings.app_id}-hot",
                settings.worker.linger_ms,
                settings.kafka.librdkafka_security(),
            )
        )
        if settings.worker.librdkafka_producer
        else None
    )
    if producer is not None:
        kefu.conversations.write_with(producer)

    async def publish_key(key: bytes, value: bytes | None) -> Any:
        if producer is None:
            return await kefu.app.producer.send(keys_topic, key, value, None, None, None)
        return await producer.send(keys_topic, key, value)

    keys.publish = publish_key
    install(keys)  # every decode in this process opens sealed fields
    kefu.app.add_dependency(KeyService(keys))

    def tenant_routing(tenant_id: str) -> TenantRouting:
        tenant = tenants.get(tenant_id)
        configured = live.get(tenant_id, "tenant")
        if tenant is None and configured is None:
            return TenantRouting(ai_enabled=False)
        ai_enabled = tenant.ai_enabled if tenant is not None else False
        if configured is not None and "ai_enabled" in configured:
            ai_enabled = bool(configured["ai_enabled"])
        if configured is not None and configured.get("disabled"):
            ai_enabled = False
        return TenantRouting(
            ai_enabled,
            frozenset(tenant.vip_customers if tenant else ()),
            frozenset(tenant.urgent_channels if tenant else ()),
        )

    redis = aioredis.Redis.from_url(settings.redis.dsn)
    # The webhook and channel credentials: the live configuration's (secrets opened
    # with the config key), the environment's where it sets none.
    box = SecretBox(config_key(settings))
    webhooks = live_webhooks(
        {
            tenant_id: WebhookTarget(t.webhook_url, t.webhook_secret.get_secret_value().encode())
            for tenant_id, t in tenants.items()
            if t.webhook_url
        },
        live,
        box,
    )
    moderator = _moderator(settings)
    # Every worker follows the whole control topic (not a group agent): lists live.
    wordlists.install(kefu, moderator, load_timeout=settings.moderation.load_timeout_s)
    # The tenant's own FAQ from /admin first, live; then the configured responder.
    answers = TenantFaq(build_responder(settings, redis, moderator, live), live)
    policy = Policy(
        moderator,
        router(tenant_routing),
        max_ai_failures=settings.routing.max_ai_failures,
        csat=settings.routing.csat,
        answer_now=answers.answer_now if settings.worker.inline_answers else None,
    )
    queue_router.install(kefu, sticky=settings.routing.sticky)
    timers.install(kefu, _deadlines(settings), settings.routing.timer_seconds)
    deliverer = ChannelDeliverer(
        redis, webhooks, senders=channel_senders(settings, live, box), signer=url_signer(settings)
    )
    read_model = RedisConversations(redis)
    sink: RedisConversations | RebuildingRedisModel = read_model
    if settings.reliability.redis_rebuild:  # Redis flushed or replaced: back from the log
        names = TopicNames(settings.topic_prefix)
        rebuild = log_rebuild(
            settings.kafka.servers,
            replay_topics(names),
            read_model,
            settings.kafka.client_options(),
        )
        # Redis that lost its newest writes (a crash): the gap folded back from the log.
        fold = log_fold(settings.kafka.servers, read_model, settings.kafka.client_options())
        sink = RebuildingRedisModel(redis, read_model, rebuild, fold)
    # The hot path: two batch consumers on the app's loop (streams.batch_consumer),
    # the conversation agent on the commands, one reader of the events for the
    # projection, delivery, routing feed and responder. Faust runs the rest.
    hot = direct_sends(kefu, producer)
    sealing = keys if settings.security.seal_personal_data else None
    agent = ConversationAgent(hot, policy, agent_config(kefu, settings.app_id), keys=sealing)
    pool = ResponderPool(hot, answers, concurrency=settings.worker.concurrency)
    # The thumbnails of new images, made here rather than in the upload request
    # (connectors/thumbnails.py): scheduled by the reader, in threads, a few at a time.
    thumbnails = Thumbnails(
        blob_store(settings),
        attachment_policy(settings),
        concurrency=settings.attachments.thumbnail_concurrency,
        redis=redis,
    )
    reader = EventReader(
        hot,
        sink,
        deliverer,
        pool,
        reader_config(kefu, settings.app_id),
        redact=RedisRedactor(redis),
        observe=thumbnails.observe,
    )
    for consumer in (agent, reader):
        watch_reader(consumer)

    @kefu.app.task  # type: ignore[untyped-decorator]
    async def start_hot_path(app: Any) -> None:
        # After Faust's table recovery; runtime dependencies stop before the producer
        # (Faust's, and the hot one: added first, so it stops after them).
        if producer is not None:
            await app.add_runtime_dependency(ClosedLast(producer))
        await app.add_runtime_dependency(agent)
        await app.add_runtime_dependency(reader)

    _install_health(kefu, (agent, reader))

    @kefu.app.task  # type: ignore[untyped-decorator]
    async def long_lived_out_of_gc(app: Any) -> None:
        await keep_long_lived_out_of_gc(settings.worker.gc_freeze_s, settings.worker.gc_full_s)

    async def retention() -> None:
        """Tenants' ``retention_days`` (kefu/erasure.py), on the leader worker only."""
        try:
            erased = await run_retention(settings, keys, live)
        except Exception:
            log.exception("the retention job failed; it runs again next time")
            return
        for tenant, customers in erased.items():
            log.info("retention erased %d customer(s) of %s", len(customers), tenant)

    kefu.app.timer(settings.security.retention_interval_s, on_leader=True, name="kefu.retention")(
        retention
    )

    async def close_clients(app: Any, **kwargs: Any) -> None:
        # After the consumer stopped, before the loop closes: sessions left open are
        # an error in the log ("Unclosed client session").
        await deliverer.close()
        await redis.aclose()

    kefu.app.on_before_shutdown.connect(cast(Any, close_clients))

    return kefu


def _moderator(settings: Settings) -> Moderator:
    m = settings.moderation
    return Moderator(
        WordList.default() if m.default_lists else WordList({}, {}, 0),
        personal_data=m.personal_data,
        spam=SpamLimits(
            repeats=m.spam_repeats,
            repeat_window_ms=int(m.spam_repeat_window_s * 1000),
            links=m.spam_links,
            link_window_ms=int(m.spam_link_window_s * 1000),
        ),
    )


def _deadlines(settings: Settings) -> Callable[[str, str], timers.Deadlines]:
    def deadlines_for(tenant_id: str, priority: str) -> timers.Deadlines:
        tenant = settings.tenants.get(tenant_id)
        if tenant is None:
            return timers.Deadlines()
        first = tenant.sla_first_response_seconds
        after = tenant.sla_next_response_seconds
        return timers.Deadlines(
            idle_close_ms=int(tenant.idle_close_seconds * 1000),
            first_response_ms=int(first.get(priority, first.get("normal", 120.0)) * 1000),
            next_response_ms=int(after.get(priority, after.get("normal", 300.0)) * 1000),
        )

    return deadlines_for


def _install_health(kefu: KefuApp, hot_path: tuple[BatchConsumer, ...]) -> None:
    app = kefu.app

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        assigned = len(app.consumer.assignment()) if app.consumer else 0
        assigned += sum(len(consumer.assignment()) for consumer in hot_path)
        # Recovering tables after a rebalance, the worker owns partitions but does not
        # process them yet: not ready until that is over.
        recovering = bool(getattr(app, "in_recovery", False))
        # Every hot-path consumer has its share (maybe none): with only the commands'
        # one joined, the first messages waited a second for the events reader.
        joined = all(consumer.joined for consumer in hot_path)
        ready = assigned > 0 and joined and not app.rebalancing and not recovering
        body = {"status": "ok" if ready else "starting", "assigned_partitions": assigned}
        return web.json(body, status=200 if ready else 503)

    # /healthz above is the readiness check kefu.services and compose already use;
    # /readyz says the same under the conventional name, /livez only "the loop runs".
    app.page("/readyz")(healthz)

    @app.page("/livez")
    async def livez(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        # aiohttp takes the charset separately: drop it from Prometheus' content type.
        content_type = CONTENT_TYPE_LATEST.split("; charset=")[0]
        return web.bytes(metrics_text(), content_type=content_type)

    watch_app(app)


def _install_config_page(kefu: KefuApp, live: ConfigState) -> None:
    @kefu.app.page("/config")
    async def config_status(web: Any, request: Any) -> Any:
        """What this worker's configuration holds: ``?tenant=&kind=&id=`` for one
        entity's version and data (secrets only say that they are set)."""
        query = request.query
        tenant, kind = query.get("tenant", ""), query.get("kind", "")
        out: dict[str, Any] = {"applied": live.applied, "applied_at": live.applied_at}
        if tenant and kind:
            entity = live.entity(tenant, kind, query.get("id", SINGLE))
            out["entity"] = (
                None if entity is None else {"version": entity.version, "data": shown(entity.data)}
            )
        return web.json(out)


def run_worker(settings: Settings, web_port: int | None = None) -> None:
    sys.setswitchinterval(settings.worker.switch_interval_ms / 1000)
    if settings.worker.event_loop == "uvloop":
        import mode.loop

        mode.loop.use("uvloop")  # before the app exists: Faust takes the loop at creation
    setup_tracing(settings, "worker")
    try:  # Faust would create the missing ones too, racing its own subscription
        ensure_topics_blocking(settings)
    except Exception as exc:  # the broker may come later: Faust waits for it
        log.warning("could not create kefu's topics before starting: %r", exc)
    kefu = build_worker(settings, web_port)
    worker = faust.Worker(kefu.app, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()
