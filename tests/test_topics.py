"""kefu.topics: every topic a worker subscribes to exists, with led partitions, before
the worker starts (Faust's own changelogs included), against the test session's broker."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiokafka.admin import (  # type: ignore[import-untyped, unused-ignore]
    AIOKafkaAdminClient,
)

from kefu.settings import Settings
from kefu.topics import ensure_topics, ensure_topics_blocking, led_topics, wanted
from schemas.topics import TopicNames, leader_topic
from streams.app import StreamsConfig, build_app


def test_the_changelogs_made_ahead_are_the_ones_faust_declares(tmp_path: Path) -> None:
    settings = Settings(app_id="shop", state_dir=tmp_path)
    app = build_app(
        StreamsConfig(
            app_id=settings.app_id,
            broker="127.0.0.1:9",  # never connected: declarations only
            partitions=settings.kafka.partitions,
            datadir=tmp_path,
            topics=TopicNames(settings.topic_prefix),
            web_enabled=False,
        )
    ).app
    ours = {t.name: t for t in wanted(settings)}
    assert app.tables, "the app has tables"
    for table in app.tables.values():
        declared = table.changelog_topic
        made = ours[table.changelog_topic_name]
        assert made.num_partitions == declared.partitions == settings.kafka.partitions
        assert declared.compacting and made.topic_configs == {"cleanup.policy": "compact"}
    leader_assignor: Any = app._leader_assignor
    assert leader_topic(settings.app_id) == leader_assignor._leader_topic_name
    assert ours[leader_topic(settings.app_id)].num_partitions == 1


async def _describe(settings: Settings, names: list[str]) -> list[Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.servers)
    await admin.start()
    try:
        described: list[Any] = await admin.describe_topics(names)
        return described
    finally:
        await admin.close()


def test_ensure_returns_with_every_partition_led_and_is_idempotent(pipeline: Settings) -> None:
    # A fresh app id and prefix: every topic is new on the session's broker.
    settings = pipeline.model_copy(update={"app_id": "topics-t", "topic_prefix": "topics-t"})
    topics = wanted(settings)
    created = ensure_topics_blocking(settings)
    assert sorted(created) == sorted(t.name for t in topics)

    # Right after: described with all partitions and a leader for each (what a
    # consumer's first metadata then sees).
    described = asyncio.run(_describe(settings, [t.name for t in topics]))
    partitions = {t.name: t.num_partitions for t in topics}
    assert sorted(t["topic"] for t in described) == sorted(partitions)
    for topic in described:
        assert topic["error_code"] == 0, topic
        assert len(topic["partitions"]) == partitions[topic["topic"]]
        assert all(p["leader"] >= 0 for p in topic["partitions"]), topic
    assert asyncio.run(ensure_topics(settings)) == []


def test_a_topic_is_led_only_when_every_partition_has_a_leader() -> None:
    def partition(index: int, leader: int, error: int = 0) -> dict[str, int]:
        return {"error_code": error, "partition": index, "leader": leader}

    described = [
        {"error_code": 0, "topic": "ok", "partitions": [partition(0, 1), partition(1, 1)]},
        # Just created, as a broker's metadata can show it for a moment (KRaft: the
        # controller answered, the broker's metadata image has not caught up).
        {"error_code": 3, "topic": "unknown", "partitions": []},
        {"error_code": 0, "topic": "leaderless", "partitions": [partition(0, -1, 5)]},
        {"error_code": 0, "topic": "short", "partitions": [partition(0, 1)]},
    ]
    wanted_partitions = {"ok": 2, "unknown": 1, "leaderless": 1, "short": 2}
    assert led_topics(described, wanted_partitions) == {"ok"}
