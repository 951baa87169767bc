"""Reading whole topics in tests: a group-less consumer from the beginning to the end
offsets at the time of the call. A value of the events or queue-events topic holds one
event (written before commits) or a ``Commit`` of several: ``read_events`` reads both."""

from __future__ import annotations

import uuid

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from kefu.settings import Settings
from schemas.codec import CODEC, DecodeError
from schemas.records import Record


async def new_topic(settings: Settings, prefix: str, partitions: int = 4) -> str:
    """A topic of this test's own (a random name after ``prefix``), created now."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


async def read_topic(settings: Settings, topic: str) -> list[bytes]:
    return [r.value for r in await read_records(settings, topic) if r.value is not None]


async def read_events(settings: Settings, topic: str) -> list[Record]:
    """Every record the values of ``topic`` hold, in log order per partition (each
    commit's events in order); values that do not decode (other tests' poison) are
    skipped."""
    return decoded_all(await read_topic(settings, topic))


def decoded_all(values: list[bytes]) -> list[Record]:
    out: list[Record] = []
    for value in values:
        try:
            out += CODEC.decode_all(value)
        except DecodeError:
            continue
    return out


async def read_records(settings: Settings, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.servers, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        parts = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not parts:
            return []
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        found: list[ConsumerRecord[bytes, bytes]] = []
        pending = {tp for tp in parts if ends[tp] > 0}
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=1000)
            for _tp, records in batch.items():
                found.extend(records)
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
        return found
    finally:
        await consumer.stop()
