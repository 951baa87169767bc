"""Creates kefu's topics with the settings they need; idempotent."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from kefu.settings import Settings
from schemas.topics import TopicNames

log = logging.getLogger(__name__)

KEEP_FOREVER = {"retention.ms": "-1", "retention.bytes": "-1"}


def wanted(settings: Settings) -> list[NewTopic]:
    names = TopicNames(settings.topic_prefix)
    partitions = settings.kafka.partitions
    return [
        # The log is the truth: events are kept forever (replay, audit).
        NewTopic(names.events, partitions, 1, topic_configs=KEEP_FOREVER),
        NewTopic(names.commands, partitions, 1, topic_configs={"retention.ms": str(7 * 86400_000)}),
        NewTopic(names.deadletter, 1, 1, topic_configs=KEEP_FOREVER),
        NewTopic(names.routing, partitions, 1, topic_configs={"retention.ms": str(7 * 86400_000)}),
        NewTopic(names.queue_events, partitions, 1, topic_configs=KEEP_FOREVER),
        # The latest list per tenant/category survives compaction; one partition keeps
        # every change in order. Every worker reads it whole (streams.wordlists).
        NewTopic(names.control, 1, 1, topic_configs={"cleanup.policy": "compact"}),
    ]


async def ensure_topics(settings: Settings) -> list[str]:
    """Create the missing topics; return the names created."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka.servers, **settings.kafka.client_options()
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted(settings) if t.name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process won
                await admin.create_topics(missing)
            # Metadata propagates asynchronously; wait until every topic is listed.
            for _ in range(100):
                if {t.name for t in missing} <= set(await admin.list_topics()):
                    break
                await asyncio.sleep(0.05)
        return [t.name for t in missing]
    finally:
        await admin.close()
