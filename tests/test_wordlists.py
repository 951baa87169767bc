"""Live word lists on the real stack, with two workers: a worker that starts reads the
compacted control topic before it is ready; a change published while both run takes
effect in each without a restart, and every message moderated after it (on every
partition, so by both workers) carries the new list's version and masks the new
words; removing the tenant's list (a tombstone) brings the shared one back."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from connectors.identity import conversation_id_for
from kefu.processes import free_ports
from kefu.services import Services
from kefu.settings import Settings
from schemas.codec import CODEC
from schemas.records import MessageModerated, WordListChanged
from schemas.time import now_ms
from schemas.topics import TopicNames
from streams.wordlists import list_key, next_version, publish, read_control
from tests.conftest import wait_for
from tests.test_pipeline import gateway

TENANT = "acme"  # no AI: its messages are moderated and queued, nothing else


def status(port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/moderation"
    try:
        response = httpx.get(url, timeout=2.0)
    except httpx.HTTPError:
        return {}
    return response.json() if response.status_code == 200 else {}


def tenant_version(port: int) -> int | None:
    versions: dict[str, int] = status(port).get("versions", {})
    return versions.get(TENANT, versions.get("*"))


def customers_on_every_partition(partitions: int, each: int) -> dict[str, int]:
    """Customers whose conversations land on every partition, ``each`` per partition
    (the gateway keys commands by conversation id with aiokafka's partitioner)."""
    choose = DefaultPartitioner()
    every = list(range(partitions))
    chosen: dict[str, int] = {}
    counts = dict.fromkeys(every, 0)
    while min(counts.values()) < each:
        who = f"wl-{uuid.uuid4().hex[:10]}"
        p = choose(conversation_id_for(TENANT, "api", who).encode(), every, every)
        if counts[p] < each:
            counts[p] += 1
            chosen[who] = p
    return chosen


def send(settings: Settings, customer: str, text: str) -> str:
    key = settings.tenants[TENANT].api_key.get_secret_value()
    with gateway(settings) as http:
        response = http.post(
            "/v1/messages",
            json={"customer_id": customer, "text": text},
            headers={"X-Api-Key": key},
        )
    assert response.status_code == 202, response.text
    return str(response.json()["conversation_id"])


async def events_end(settings: Settings) -> dict[int, int]:
    topic = TopicNames(settings.topic_prefix).events
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.servers)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        return {tp.partition: offset for tp, offset in (await consumer.end_offsets(parts)).items()}
    finally:
        await consumer.stop()


async def moderated_since(
    settings: Settings, start: dict[int, int], conversations: set[str]
) -> list[tuple[int, MessageModerated]]:
    """(partition, event) of the MessageModerated events of ``conversations`` written
    after ``start`` (end offsets taken before the messages were sent)."""
    topic = TopicNames(settings.topic_prefix).events
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.servers, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in start]
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, start[tp.partition])
        end = await consumer.end_offsets(parts)
        found: list[tuple[int, MessageModerated]] = []
        pending = {tp for tp in parts if end[tp] > start[tp.partition]}
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=1000)
            for tp, records in batch.items():
                for record in records:
                    for event in CODEC.decode_all(record.value):  # a commit holds several
                        if (
                            isinstance(event, MessageModerated)
                            and event.conversation_id in conversations
                        ):
                            found.append((tp.partition, event))
            pending = {tp for tp in pending if await consumer.position(tp) < end[tp]}
        return found
    finally:
        await consumer.stop()


def test_a_list_update_takes_effect_on_the_next_message_in_every_worker(
    pipeline: Settings,
) -> None:
    names = TopicNames(pipeline.topic_prefix)
    bootstrap, control = pipeline.kafka.servers, names.control
    partitions = pipeline.kafka.partitions
    # The second worker's web port: a fresh free one (worker(1) listens on
    # worker.web_port + 1, which the session never reserved).
    port = free_ports(1)[0]
    services = Services(
        pipeline.model_copy(
            update={"worker": pipeline.worker.model_copy(update={"web_port": port - 1})}
        ),
        workers=2,
    )
    second = services.worker(1)
    ports = (pipeline.worker.web_port, port)

    def change(words: list[str]) -> int:
        version = next_version(asyncio.run(read_control(bootstrap, control)))
        record = WordListChanged(
            tenant_id=TENANT,
            category="abuse",
            action="mask",
            words=words,
            version=version,
            changed_at=now_ms(),
            changed_by="test",
        )
        asyncio.run(publish(bootstrap, control, list_key(TENANT, "abuse"), record))
        return version

    shared_version = tenant_version(ports[0])
    assert shared_version is not None
    try:
        # A change before the second worker starts: it reads it before it is ready.
        first = change(["zorblax"])
        wait_for(lambda: tenant_version(ports[0]) == first, what="worker 0 on the first change")
        services.start([second])
        assert status(ports[1])["loaded"] and tenant_version(ports[1]) == first

        # Two workers, each moderating some of the conversation partitions.
        def split() -> list[list[int]] | None:
            owned = [status(p).get("commands_partitions", []) for p in ports]
            together = sorted(p for mine in owned for p in mine)
            return owned if all(owned) and together == list(range(partitions)) else None

        owned = wait_for(split, timeout=120, what="the partitions split between two workers")

        # A change while both run: each applies it live.
        published = now_ms()
        version = change(["zorblax", "蛤蟆精"])
        wait_for(
            lambda: all(tenant_version(p) == version for p in ports),
            what="both workers on the new list",
        )
        applied_ms = [status(p)["applied_at"] - published for p in ports]
        print(f"applied by the workers {applied_ms} ms after publishing")

        # Messages on every partition, so both workers moderate some of them.
        start = asyncio.run(events_end(pipeline))
        chosen = customers_on_every_partition(partitions, each=3)
        text = "you z.o.r.b.l.a.x 蛤 蟆 精, where is my order?"
        conversations = {send(pipeline, who, text) for who in chosen}

        def all_moderated() -> list[tuple[int, MessageModerated]] | None:
            found = asyncio.run(moderated_since(pipeline, start, conversations))
            return found if len(found) >= len(conversations) else None

        moderated = wait_for(all_moderated, timeout=60, what="every message moderated")
        assert {p for p, _ in moderated} == set(range(partitions))
        for worker in owned:  # each worker moderated messages of its own partitions
            assert any(p in worker for p, _ in moderated)
        for _, event in moderated:
            assert event.list_version == version
            assert event.verdict == "mask" and event.categories == ["abuse"]
            assert event.text == "you ************* *****, where is my order?"

        # The tombstone: acme's own list goes, the shared one applies again.
        asyncio.run(publish(bootstrap, control, list_key(TENANT, "abuse"), None))
        wait_for(
            lambda: all(tenant_version(p) == shared_version for p in ports),
            what="both workers back on the shared lists",
        )
        start = asyncio.run(events_end(pipeline))
        again = {send(pipeline, who, text) for who in list(chosen)[:partitions]}
        after = wait_for(
            lambda: (
                found
                if len(found := asyncio.run(moderated_since(pipeline, start, again))) >= len(again)
                else None
            ),
            timeout=60,
            what="moderated with the shared lists",
        )
        for _, event in after:
            assert event.list_version == shared_version
            assert event.verdict == "pass" and event.text == text
    finally:
        asyncio.run(publish(bootstrap, control, list_key(TENANT, "abuse"), None))
        services.stop([second])
