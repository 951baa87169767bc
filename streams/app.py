"""The Faust app: topics, the conversation table, and the agents a worker runs.

Agents consume raw bytes and decode them themselves (``streams.inbox``), so a record
that cannot be decoded goes to the dead-letter topic with its position instead of
tripping Faust's decode-error path. Sends use the registered ``kefu-avro`` codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust

from schemas import faust_codec
from schemas.topics import TopicNames


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


@dataclass(frozen=True, slots=True)
class KefuApp:
    app: faust.App
    config: StreamsConfig
    commands_in: Any  # faust.TopicT (raw bytes, consumed)
    events_in: Any
    commands_out: Any  # faust.TopicT (kefu-avro, sent to)
    events_out: Any
    deadletter: Any
    conversations: Any  # faust.Table: conversation id -> state JSON
    routing_in: Any  # routing commands, keyed by queue
    routing_out: Any
    queue_events_out: Any
    queue_events_in: Any
    queues: Any  # faust.Table: queue -> state JSON


def build_app(config: StreamsConfig) -> KefuApp:
    faust_codec.register()
    app = faust.App(
        config.app_id,
        broker=f"kafka://{config.broker}",
        store="memory://",
        datadir=str(config.datadir),
        topic_partitions=config.partitions,
        web_enabled=config.web_enabled,
        web_port=config.web_port,
        web_bind=config.web_host,
        web_host=config.web_host,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        table_cleanup_interval=3600.0,
    )
    names = config.topics
    return KefuApp(
        app=app,
        config=config,
        commands_in=_raw_topic(app, names.commands),
        events_in=_raw_topic(app, names.events),
        commands_out=app.topic(names.commands, value_serializer=faust_codec.CODEC_NAME),
        events_out=app.topic(names.events, value_serializer=faust_codec.CODEC_NAME),
        deadletter=app.topic(names.deadletter, value_serializer=faust_codec.CODEC_NAME),
        conversations=app.Table(
            "conversations",
            default=None,
            partitions=config.partitions,
        ),
        routing_in=_raw_topic(app, names.routing),
        routing_out=app.topic(names.routing, value_serializer=faust_codec.CODEC_NAME),
        queue_events_out=app.topic(names.queue_events, value_serializer=faust_codec.CODEC_NAME),
        queue_events_in=_raw_topic(app, names.queue_events),
        queues=app.Table("queues", default=None, partitions=config.partitions),
    )


def _raw_topic(app: faust.App, name: str) -> Any:
    return app.topic(
        name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
