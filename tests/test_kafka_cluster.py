"""The three-broker cluster users grow into (``kefu stack up --brokers 3``): a KRaft
cluster on loopback, topics with three replicas and min.insync.replicas 2, and writes
that survive the broker leading them being SIGKILLed mid-stream, then a second broker
being killed for a few seconds: nothing acknowledged is lost, nothing is duplicated, and
each key's order is kept."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from kefu.processes import free_run
from kefu.settings import KafkaSettings, RedisSettings, Settings
from kefu.stack import Stack
from kefu.topics import ensure_topics
from schemas.topics import TopicNames

MESSAGES = 1800
KEYS = 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    base = free_run(6)  # node n: broker base + 2(n-1), controller base + 2(n-1) + 1
    settings = Settings(
        state_dir=tmp_path_factory.mktemp("kefu-cluster"),
        kafka=KafkaSettings(port=base, controller_port=base + 1, brokers=3, heap="384m"),
        redis=RedisSettings(url="redis://127.0.0.1:1/0"),  # external: not started here
    )
    stack = Stack(settings)
    try:
        stack.up(timeout=180)
        yield settings
    finally:
        stack.down()


def _leaders(described: list[Any], topic: str) -> dict[int, int]:
    for found in described:
        if found["topic"] == topic:
            return {int(p["partition"]): int(p["leader"]) for p in found["partitions"]}
    raise AssertionError(f"no {topic}")


async def _describe(settings: Settings, topic: str) -> list[Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.servers)
    await admin.start()
    try:
        described: list[Any] = await admin.describe_topics([topic])
        return described
    finally:
        await admin.close()


def test_three_nodes_and_three_replicas(cluster: Settings) -> None:
    created = asyncio.run(ensure_topics(cluster))
    events = TopicNames(cluster.topic_prefix).events
    assert events in created
    described = asyncio.run(_describe(cluster, events))
    for partition in described[0]["partitions"]:
        assert len(partition["replicas"]) == 3 and len(partition["isr"]) == 3
    status = Stack(cluster).status()
    assert [name for name in status if name.startswith("kafka")] == ["kafka", "kafka-2", "kafka-3"]
    assert all(state.startswith("running") for name, state in status.items() if "kafka" in name)


def _kill(stack: Stack, node_id: int) -> None:
    daemon = stack.kafka_daemons[node_id - 1]
    pid = daemon.pid()
    assert pid, f"node {node_id} is not running"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while daemon.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_writes_survive_the_leader_killed_and_a_second_broker_down(cluster: Settings) -> None:
    asyncio.run(ensure_topics(cluster))
    topic = TopicNames(cluster.topic_prefix).events
    stack = Stack(cluster)
    recoveries: list[float] = []

    async def produce() -> dict[int, int]:
        producer = AIOKafkaProducer(
            bootstrap_servers=cluster.kafka.servers,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=15_000,
            retry_backoff_ms=100,
        )
        await producer.start()
        acked: dict[int, int] = {}
        try:
            leaders = _leaders(await _describe(cluster, topic), topic)
            busiest = leaders[0]  # the leader of partition 0 (every partition takes keys)
            killed_at = 0.0
            for n in range(MESSAGES):
                if n == MESSAGES // 3:
                    _kill(stack, busiest)  # SIGKILL mid-stream
                    killed_at = time.monotonic()
                if n == MESSAGES // 2:
                    await asyncio.to_thread(stack.up, 180)  # the node comes back
                if n == 2 * MESSAGES // 3:
                    second = next(i for i in (1, 2, 3) if i != busiest)
                    _kill(stack, second)  # a second broker, for a few seconds
                    killed_at = time.monotonic()
                if n == 2 * MESSAGES // 3 + 300:
                    await asyncio.to_thread(stack.up, 180)
                key = f"k{n % KEYS}".encode()
                meta = await producer.send_and_wait(topic, str(n).encode(), key=key)
                if killed_at:
                    recoveries.append(time.monotonic() - killed_at)
                    killed_at = 0.0
                acked[n] = meta.partition
        finally:
            await producer.stop()
        return acked

    acked = asyncio.run(produce())
    assert len(acked) == MESSAGES

    async def consume() -> list[tuple[bytes, int]]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=cluster.kafka.servers,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        await consumer.start()
        try:
            parts = [TopicPartition(topic, p) for p in sorted(set(acked.values()))]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            end = await consumer.end_offsets(parts)
            out: list[tuple[bytes, int]] = []
            while [tp for tp in parts if await consumer.position(tp) < end[tp]]:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    out.extend((r.key or b"", int(r.value or b"-1")) for r in records)
            return out
        finally:
            await consumer.stop()

    seen = asyncio.run(consume())
    values = [v for _, v in seen]
    assert sorted(values) == list(range(MESSAGES)), "lost or duplicated records"
    by_key: dict[bytes, list[int]] = {}
    for key, value in seen:
        by_key.setdefault(key, []).append(value)
    assert all(v == sorted(v) for v in by_key.values()), "a key's order changed"
    assert len(recoveries) == 2
    # Recovery times go to bench/RESULTS.md through bench/faults.py; here only bounded.
    assert max(recoveries) < 60, recoveries
    Path(os.environ.get("KEFU_CLUSTER_RECOVERY_FILE", os.devnull)).write_text(
        ",".join(f"{r:.3f}" for r in recoveries)
    )
