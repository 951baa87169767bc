"""The whole pipeline on a three-broker cluster (issue 19): customers keep talking while
the broker that leads most of the conversation partitions is SIGKILLed mid-wave and
restarted, then a second broker is killed for a few seconds. Every message is answered
exactly once, in order; the log, Redis and ClickHouse agree (``tests/fault_stack.py``
``verify``). How long each fault stalled the customers goes to bench/RESULTS.md."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from kefu.processes import free_run, wait_until
from tests.fault_stack import Customers, FaultStack, fault_settings, verify
from tests.test_faults import assert_clean

CONVERSATIONS = 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    settings = fault_settings(tmp_path_factory.mktemp("kefu-cluster-faults"))
    base = free_run(6)
    kafka = settings.kafka.model_copy(
        update={"port": base, "controller_port": base + 1, "brokers": 3, "heap": "384m"}
    )
    stack = FaultStack(settings.model_copy(update={"kafka": kafka}))
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


def busiest_leader(faults: FaultStack) -> int:
    """The node leading most partitions of the commands and events topics."""

    async def leaders() -> Counter[int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=faults.settings.kafka.servers)
        await admin.start()
        try:
            found: list[Any] = await admin.describe_topics(
                [faults.names.commands, faults.names.events]
            )
        finally:
            await admin.close()
        return Counter(int(p["leader"]) for topic in found for p in topic["partitions"])

    return asyncio.run(leaders()).most_common(1)[0][0]


def kill_node(faults: FaultStack, node_id: int) -> None:
    daemon = faults.stack.kafka_daemons[node_id - 1]
    pid = daemon.pid()
    assert pid, f"Kafka node {node_id} is not running"
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not daemon.is_running(), timeout=30.0, what=f"node {node_id} gone")


def test_the_leading_broker_killed_then_a_second_one(cluster: FaultStack) -> None:
    customers = Customers(cluster.settings, CONVERSATIONS)
    asyncio.run(customers.wave())
    leader = busiest_leader(cluster)
    stalls: list[tuple[float | None, float | None]] = []
    first = asyncio.run(customers.wave(lambda: kill_node(cluster, leader), at=0.3))
    stalls.append((first.progress_s, first.caught_up_s))
    cluster.stack.up(timeout=180.0)  # the killed node rejoins
    asyncio.run(customers.wave())
    second = next(n for n in (1, 2, 3) if n != leader)

    def second_down_a_while() -> None:
        kill_node(cluster, second)
        time.sleep(3.0)  # "for a few seconds": the fault itself, not a wait for a state
        cluster.stack.up(timeout=180.0)

    again = asyncio.run(customers.wave(second_down_a_while, at=0.3))
    stalls.append((again.progress_s, again.caught_up_s))
    asyncio.run(customers.wave())
    assert_clean(verify(cluster, customers))
    # Seconds from each fault to the first reply after it, and to every reply that
    # was outstanding at the fault (bench/RESULTS.md "Cluster faults").
    print(f"\ncluster faults (first reply, caught up) s: {stalls}")
