"""The Faust app: topics, the conversation table, and the agents a worker runs.

Agents consume raw bytes and decode them themselves (``streams.inbox``), so a record
that cannot be decoded goes to the dead-letter topic with its position instead of
tripping Faust's decode-error path. Sends use the registered ``kefu-avro`` codec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from schemas import faust_codec
from schemas.topics import TABLES, TopicNames, changelog_topic
from streams import faust_private
from streams.consumer import Consumer
from streams.conversation_store import ConversationStore
from streams.recovery import TableManager

# kefu.topics creates their changelogs before a worker starts. The conversations'
# table is the conversation agent's own (streams.conversation_store); queues' is Faust's.
CONVERSATIONS, QUEUES = TABLES


@dataclass(frozen=True, slots=True)
class StreamsConfig:
    app_id: str
    broker: str  # host:port list
    partitions: int
    datadir: Path
    topics: TopicNames
    web_port: int = 16066
    web_host: str = "127.0.0.1"
    web_enabled: bool = True
    concurrency: int = 16
    # aiokafka security options (SASL/TLS), as kefu's settings give them; empty = PLAINTEXT.
    kafka_options: Mapping[str, Any] = field(default_factory=dict)
    # The same as librdkafka settings, for the hot path's clients (streams/hot_*.py).
    librdkafka_options: Mapping[str, str] = field(default_factory=dict)
    # The batch consumers read with librdkafka (streams/hot_consumer.py), not aiokafka.
    librdkafka_consumer: bool = False
    # Faust hard-codes 1500 ms. aiokafka keeps one fetch in flight per broker and
    # sends the next only when every partition's buffer is drained, so a long wait on
    # quiet partitions stalls busy ones: a short wait keeps the pipeline flowing.
    fetch_max_wait_ms: int = 100
    # The broker answers a fetch once this much is ready (or the wait is over): 1 byte
    # answers every record at once; more trades up to the wait for fewer round trips.
    fetch_min_bytes: int = 1
    # A few ms of linger turns a burst of sends into one produce request per partition.
    producer_linger_s: float = 0.002
    # Group membership (docs/faults.md): a SIGKILLed worker's partitions move on after
    # session_timeout; Faust's defaults (60 s) would stall them for a minute.
    session_timeout: float = 30.0
    heartbeat_interval: float = 3.0
    rebalance_timeout: float = 30.0
    processing_guarantee: str = "at_least_once"  # or "exactly_once" (measured)
    # A record missing below acked ones holds the partition's commits back; after this
    # long it is delivered again (streams.consumer): sooner when no agent holds it.
    redeliver_lost_after_s: float = 5.0
    redeliver_stuck_after_s: float = 20.0


@dataclass(frozen=True, slots=True)
class KefuApp:
    app: faust.App
    config: StreamsConfig
    commands_in: Any  # faust.TopicT (raw bytes, consumed)
    events_in: Any
    commands_out: Any  # faust.TopicT (kefu-avro, sent to)
    events_out: Any
    deadletter: Any
    conversations: ConversationStore  # conversation id -> state (the agent's table)
    routing_in: Any  # routing commands, keyed by queue
    routing_out: Any
    queue_events_out: Any
    queue_events_in: Any
    queues: Any  # faust.Table: queue -> state JSON
    # The worker's producer for the hot path (streams.hot_producer); None: the Faust
    # app's producer (set by ``streams.batch_consumer.direct_sends``).
    hot_producer: Any = None


class _Transport(faust_aiokafka.Transport):
    Consumer = Consumer


class _App(faust_private.HookedApp):
    """A Faust app with our consumer (``streams.consumer``): strict commits, hole
    repair, and the broker fetch's ``fetch_max_wait_ms`` and ``fetch_min_bytes``."""

    transport_class = _Transport

    fetch_max_wait_ms: int
    fetch_min_bytes: int
    redeliver_lost_after_s: float
    redeliver_stuck_after_s: float


def build_app(config: StreamsConfig) -> KefuApp:
    faust_private.check_versions()  # the private APIs kefu relies on, at start
    faust_codec.register()
    app = _App(
        config.app_id,
        broker=f"kafka://{config.broker}",
        broker_credentials=broker_credentials(config.kafka_options),
        store="memory://",
        datadir=str(config.datadir),
        topic_partitions=config.partitions,
        web_enabled=config.web_enabled,
        web_port=config.web_port,
        web_bind=config.web_host,
        web_host=config.web_host,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger=config.producer_linger_s,
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        table_cleanup_interval=3600.0,
        broker_session_timeout=config.session_timeout,
        broker_heartbeat_interval=config.heartbeat_interval,
        broker_rebalance_timeout=config.rebalance_timeout,
        processing_guarantee=config.processing_guarantee,
        TableManager=TableManager,  # streams.recovery: a recovery race closed
    )
    # Read when the consumer is built and starts.
    app.fetch_max_wait_ms = config.fetch_max_wait_ms
    app.fetch_min_bytes = config.fetch_min_bytes
    app.redeliver_lost_after_s = config.redeliver_lost_after_s
    app.redeliver_stuck_after_s = config.redeliver_stuck_after_s
    names = config.topics
    return KefuApp(
        app=app,
        config=config,
        commands_in=_raw_topic(app, names.commands),
        events_in=_raw_topic(app, names.events),
        commands_out=app.topic(names.commands, value_serializer=faust_codec.CODEC_NAME),
        events_out=app.topic(names.events, value_serializer=faust_codec.CODEC_NAME),
        deadletter=app.topic(names.deadletter, value_serializer=faust_codec.CODEC_NAME),
        conversations=ConversationStore(
            changelog_topic(config.app_id, CONVERSATIONS),
            config.broker,
            app,
            config.kafka_options,
        ),
        routing_in=_raw_topic(app, names.routing),
        routing_out=app.topic(names.routing, value_serializer=faust_codec.CODEC_NAME),
        queue_events_out=app.topic(names.queue_events, value_serializer=faust_codec.CODEC_NAME),
        queue_events_in=_raw_topic(app, names.queue_events),
        queues=app.Table(QUEUES, default=None, partitions=config.partitions),
    )


def _raw_topic(app: faust.App, name: str) -> Any:
    return app.topic(
        name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )


def broker_credentials(options: Mapping[str, Any]) -> Any:
    """Faust's credentials for aiokafka security options: Faust turns them back into
    the same ``security_protocol``/``sasl_*``/``ssl_context`` for its clients."""
    protocol = str(options.get("security_protocol", "PLAINTEXT")).upper()
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=options.get("sasl_plain_username"),
            password=options.get("sasl_plain_password"),
            ssl_context=options.get("ssl_context") if protocol == "SASL_SSL" else None,
            mechanism=options.get("sasl_mechanism"),
        )
    if protocol == "SSL":
        return faust.SSLCredentials(options["ssl_context"])
    return None
