"""The ClickHouse projector process. With the embedded engine it is the one process
that opens the chdb data directory, so it also serves read-only queries on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from connectors.metrics import ops_routes
from kefu.data_keys import install, key_store
from kefu.long_lived import keep_long_lived_out_of_gc
from kefu.settings import Settings
from kefu.telemetry import ops_app, register_counter, register_gauge, serve_ops, setup_tracing
from projections.clickhouse_events import ClickHouseProjector, ClickHouseStore, ProjectorConfig
from projections.clickhouse_query import query_app
from schemas.topics import TopicNames

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    names = TopicNames(settings.topic_prefix)
    # Sealed personal fields are stored opened (and redacted on CustomerErased).
    keys = key_store(settings)
    install(keys)
    await keys.start_async()
    store = ClickHouseStore(settings.clickhouse_url, settings.clickhouse.database)
    await store.start()
    projector = ClickHouseProjector(
        ProjectorConfig(
            bootstrap=settings.kafka.servers,
            events_topic=names.events,
            deadletter_topic=names.deadletter,
            group_id=f"{settings.app_id}-clickhouse",
            batch_size=settings.clickhouse.batch_size,
            batch_seconds=settings.clickhouse.batch_seconds,
            extra_topics=(names.queue_events,),
            kafka_options=settings.kafka.client_options(),
        ),
        store,
    )
    register_counter(
        "kefu_projector_rows_stored", "Events stored in ClickHouse", lambda: projector.stored
    )
    register_gauge(
        "kefu_projector_lag",
        "Records on the log not yet stored in ClickHouse (as of the last fetch)",
        ("topic", "partition"),
        projector.lag,
    )

    async def ready() -> tuple[bool, dict[str, object]]:
        await store.query("SELECT 1")  # the engine (chdb or server) answers
        return True, {"database": store.database}

    server: uvicorn.Server | None = None
    tasks = [asyncio.create_task(projector.run(), name="projector")]
    # /metrics, /healthz, /readyz: on the query endpoint with chdb, else on their own port.
    o = settings.observability
    ops = None
    if not settings.embedded_clickhouse:
        ops = await serve_ops(ops_app(ready), o.ops_host, o.projector_port, "projector")
    if settings.embedded_clickhouse:
        config = uvicorn.Config(
            Starlette(routes=[*ops_routes(ready), Mount("/", query_app(store))]),
            host="127.0.0.1",
            port=settings.clickhouse.query_port,
            log_level="warning",
            lifespan="off",
        )
        server = uvicorn.Server(config)
        # This process handles SIGTERM itself (stop the projector, then the endpoint).
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        tasks.append(asyncio.create_task(server.serve(), name="query-endpoint"))

    ch = settings.clickhouse
    collector = asyncio.create_task(keep_long_lived_out_of_gc(ch.gc_freeze_s, ch.gc_full_s))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    projector.stop()
    collector.cancel()
    for running in (server, ops):
        if running is not None:
            running.should_exit = True
    for task in tasks:
        if task in done and task.exception():
            log.error("%s failed: %r", task.get_name(), task.exception())
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
    store.close()
    await asyncio.to_thread(keys.stop)


def run_projector(settings: Settings) -> None:
    setup_tracing(settings, "projector")
    asyncio.run(serve(settings))
