"""Reading whole topics in tests: a group-less consumer from the beginning to the end
offsets at the time of the call."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition

from kefu.settings import Settings


async def read_topic(settings: Settings, topic: str) -> list[bytes]:
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
        values: list[bytes] = []
        pending = {tp for tp in parts if ends[tp] > 0}
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=1000)
            for _tp, records in batch.items():
                values.extend(r.value for r in records if r.value is not None)
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
        return values
    finally:
        await consumer.stop()
