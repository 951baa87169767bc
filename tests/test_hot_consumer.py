"""The hot path's librdkafka consumer (``streams.hot_consumer``) against the real broker:
records carry aiokafka's names, the listener hears of partitions before any record of
them, a revoke's listener commits while the consumer waits in librdkafka's callback
(the deadlock this module exists to avoid), and offsets read back as committed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from kefu.settings import Settings
from streams.hot_consumer import HotConsumer, librdkafka_consumer_config
from tests.kafka_helpers import new_topic


def _config(settings: Settings, group: str) -> dict[str, Any]:
    return librdkafka_consumer_config(
        settings.kafka.servers,
        group,
        fetch_max_wait_ms=50,
        fetch_min_bytes=1,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
        max_poll_interval_ms=60_000,
        read_committed=False,
    )


class _Listener:
    """Like ``BatchConsumer``'s: commits what it read before partitions go."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.consumer: HotConsumer | None = None
        self.read: dict[TopicPartition, int] = {}  # next offset per partition
        self.heard: list[tuple[str, set[TopicPartition]]] = []
        self.revoke_commits: list[dict[TopicPartition, int]] = []

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.heard.append(("assigned", set(assigned)))

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        gone = set(revoked)
        self.heard.append(("revoked", gone))
        offsets = {tp: at for tp, at in self.read.items() if tp in gone}
        if offsets and self.consumer is not None:
            await self.consumer.commit(offsets)  # inside librdkafka's callback
            self.revoke_commits.append(offsets)
        for tp in gone:
            self.read.pop(tp, None)


async def _read_until(consumer: HotConsumer, listener: _Listener, want: int, limit_s: float) -> int:
    got = 0
    deadline = time.monotonic() + limit_s
    while got < want and time.monotonic() < deadline:
        batch = await consumer.getmany(timeout_ms=100, max_records=500)
        for tp, records in batch.items():
            heard = set().union(*(tps for kind, tps in listener.heard if kind == "assigned"))
            assert tp in heard  # the listener heard of it before any record
            for record in records:
                assert isinstance(record.value, bytes) and record.key is not None
                assert record.timestamp > 0 and record.topic == tp.topic
            listener.read[tp] = records[-1].offset + 1
            got += len(records)
    return got


def test_records_rebalances_and_commits(pipeline: Settings) -> None:
    async def scenario() -> None:
        topic = await new_topic(pipeline, "test-hotc", 4)
        group = f"test-hotc-{uuid.uuid4().hex[:6]}"
        producer = AIOKafkaProducer(bootstrap_servers=pipeline.kafka.servers)
        await producer.start()
        try:
            for i in range(200):
                await producer.send(topic, f"v{i}".encode(), key=f"k{i}".encode())
            await producer.flush()
        finally:
            await producer.stop()

        first_listener = _Listener("first")
        first = HotConsumer(_config(pipeline, group))
        first_listener.consumer = first
        await first.start()
        first.subscribe([topic], first_listener)
        assert await _read_until(first, first_listener, 200, 30) == 200
        assert len(first.assignment()) == 4

        # A second member joins: the first's revoke commits from inside the callback.
        second_listener = _Listener("second")
        second = HotConsumer(_config(pipeline, group))
        second_listener.consumer = second
        await second.start()
        second.subscribe([topic], second_listener)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (first.assignment() and second.assignment()):
            await asyncio.gather(first.getmany(timeout_ms=100), second.getmany(timeout_ms=100))
        assert first.assignment() and second.assignment()
        assert first.assignment().isdisjoint(second.assignment())
        assert first_listener.revoke_commits, "the revoke's commit never ran"
        committed = first_listener.revoke_commits[0]
        for tp, offset in committed.items():
            assert await second.committed(tp) == offset  # the group holds it

        everything = [TopicPartition(topic, p) for p in range(4)]
        assert sum([await first.committed(tp) or 0 for tp in everything]) == 200
        await second.stop()
        await first.stop()
        assert await first.getmany(timeout_ms=10) == {}  # stopped: nothing, no error

    asyncio.run(scenario())
