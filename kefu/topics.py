"""Creates kefu's topics with the settings they need; idempotent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from kefu.settings import Settings
from schemas.topics import TABLES, TopicNames, changelog_topic, leader_topic

log = logging.getLogger(__name__)

KEEP_FOREVER = {"retention.ms": "-1", "retention.bytes": "-1"}
COMPACT = {"cleanup.policy": "compact"}
WEEK = {"retention.ms": str(7 * 86400_000)}  # commands and routing commands
LEADERS_TIMEOUT_S = 30.0


def wanted(settings: Settings, replication: int = 1) -> list[NewTopic]:
    """The topics, with ``replication`` replicas each (three on a cluster: a write is
    acknowledged once two have it, so one broker can die without losing it)."""
    names = TopicNames(settings.topic_prefix)
    partitions = settings.kafka.partitions
    rf = replication
    isr = {"min.insync.replicas": "2"} if rf >= 3 else {}
    return [
        # The log is the truth: events are kept forever (replay, audit).
        NewTopic(names.events, partitions, rf, topic_configs={**KEEP_FOREVER, **isr}),
        NewTopic(names.commands, partitions, rf, topic_configs={**WEEK, **isr}),
        NewTopic(names.deadletter, 1, rf, topic_configs={**KEEP_FOREVER, **isr}),
        NewTopic(names.routing, partitions, rf, topic_configs={**WEEK, **isr}),
        NewTopic(names.queue_events, partitions, rf, topic_configs={**KEEP_FOREVER, **isr}),
        # Signed audit checkpoints (projections/audit_keyed.py): never compacted or
        # expired, so a cut or rewritten history is checked against every one.
        NewTopic(names.audit_checkpoints, 1, rf, topic_configs={**KEEP_FOREVER, **isr}),
        # The latest list per tenant/category survives compaction; one partition keeps
        # every change in order. Every worker reads it whole (streams.wordlists).
        NewTopic(names.control, 1, rf, topic_configs={**COMPACT, **isr}),
        # Configuration (schemas.config): the latest record per entity survives; a
        # month of changes is kept before compaction, so "who changed what" can be read.
        NewTopic(
            names.config,
            1,
            rf,
            topic_configs={**COMPACT, "min.compaction.lag.ms": str(30 * 86400_000), **isr},
        ),
        # Customers' data keys (schemas/sealing.py): the latest record per key id
        # survives; an erased key's tombstone is removed after a day, and with it the
        # wrapped key from every segment (delete.retention.ms; segments roll daily).
        NewTopic(
            names.keys,
            1,
            rf,
            topic_configs={
                **COMPACT,
                "delete.retention.ms": str(86400_000),
                "segment.ms": str(86400_000),
                "min.cleanable.dirty.ratio": "0.01",
                **isr,
            },
        ),
        # Faust's own topics, as Faust would declare them (compacted changelogs with the
        # source topics' partitions): made here so that they exist, with leaders,
        # before any worker subscribes (see schemas.topics).
        *(
            NewTopic(
                changelog_topic(settings.app_id, table),
                partitions,
                rf,
                topic_configs={**COMPACT, **isr},
            )
            for table in TABLES
        ),
        NewTopic(leader_topic(settings.app_id), 1, rf, topic_configs=isr),
    ]


async def ensure_topics(settings: Settings) -> list[str]:
    """Create the missing topics; return the names created."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka.servers, **settings.kafka.client_options()
    )
    await admin.start()
    try:
        # As many replicas as the cluster allows, up to three (one broker: one).
        brokers = len((await admin.describe_cluster()).get("brokers") or ()) or 1
        topics = wanted(settings, min(brokers, 3))
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t.name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process won
                await admin.create_topics(missing)
        await _wait_for_leaders(admin, {t.name: t.num_partitions for t in topics})
        return [t.name for t in missing]
    finally:
        await admin.close()


def ensure_topics_blocking(settings: Settings) -> list[str]:
    """``ensure_topics`` from synchronous code, on a loop in a thread of its own: the
    worker calls it before Faust starts, and must leave the main thread's loop to Faust."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(ensure_topics(settings))).result()


async def _wait_for_leaders(admin: AIOKafkaAdminClient, partitions: dict[str, int]) -> None:
    """Until the metadata shows every topic with all its partitions led. A topic just
    created can be unknown to the broker's metadata for a moment (KRaft: the controller
    has answered, the broker's image has not caught up), and a consumer whose
    first metadata has it so is assigned none of its partitions."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LEADERS_TIMEOUT_S
    while waiting := set(partitions) - led_topics(
        await admin.describe_topics(list(partitions)), partitions
    ):
        if loop.time() > deadline:
            raise TimeoutError(f"topics without a leader after {LEADERS_TIMEOUT_S} s: {waiting}")
        await asyncio.sleep(0.05)  # the broker has no notification for this: poll


def led_topics(described: list[dict[str, Any]], partitions: dict[str, int]) -> set[str]:
    return {
        topic["topic"]
        for topic in described
        if topic["error_code"] == 0
        and len(topic["partitions"]) == partitions.get(topic["topic"])
        and all(p["error_code"] == 0 and p["leader"] >= 0 for p in topic["partitions"])
    }
