"""The conversation agent's table (``streams.conversation_store``) against the real
broker: changes reach the changelog once per batch, a new owner recovers exactly the
partitions it gains (Faust's changelog format included), and the batch consumer never
commits past a send the producer gave up on (``streams.batch_consumer``)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from kefu.settings import Settings
from schemas.topics import TopicNames
from streams.app import StreamsConfig
from streams.batch_consumer import BatchConfig, BatchConsumer
from streams.conversation_store import ConversationStore
from streams.lifecycle import Conversation
from tests.kafka_helpers import new_topic, read_records


class _Producer:
    """Faust's producer's ``send``/``flush`` over an aiokafka producer."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def send(
        self, topic: str, key: bytes, value: bytes, partition: int, ts: Any, headers: Any
    ) -> Any:
        return await self._producer.send(topic, value, key=key, partition=partition)

    async def flush(self) -> None:
        await self._producer.flush()


def _state(conversation_id: str, seq: int) -> Conversation:
    return Conversation(conversation_id=conversation_id, tenant_id="acme", seq=seq)


def test_states_are_changelogged_once_and_recovered_by_partition(pipeline: Settings) -> None:
    async def scenario() -> None:
        topic = await new_topic(pipeline, "test-changelog")
        producer = AIOKafkaProducer(bootstrap_servers=pipeline.kafka.servers)
        await producer.start()
        try:
            app = SimpleNamespace(producer=_Producer(producer))
            store = ConversationStore(topic, pipeline.kafka.servers, app)
            for seq in (1, 2, 3):  # three changes in one batch: one changelog record
                store.put("c-a", _state("c-a", seq), 0)
            store.put("c-b", _state("c-b", 1), 1)
            store.put("c-c", _state("c-c", 5), 2)
            sent = await store.write_changelog()
            await producer.flush()
            assert len(sent) == 3 and all(f.done() and not f.exception() for f in sent)
            assert await store.write_changelog() == []  # nothing changed since
            # A record as Faust's table wrote it (raw key, JSON value): still read.
            faust_state = _state("c-d", 7).to_json()
            await producer.send_and_wait(
                topic, json.dumps(faust_state).encode(), key=b"c-d", partition=1
            )
            await producer.send_and_wait(topic, None, key=b"c-c", partition=2)  # tombstone
        finally:
            await producer.stop()

        records = [r for r in await read_records(pipeline, topic) if r.key == b"c-a"]
        assert len(records) == 1 and json.loads(records[0].value or b"")["seq"] == 3

        successor = ConversationStore(topic, pipeline.kafka.servers, SimpleNamespace())
        await successor.recover({0, 1, 2})
        assert successor.get("c-a") == _state("c-a", 3)
        assert successor.get("c-b") == _state("c-b", 1)
        assert successor.get("c-d") == _state("c-d", 7)
        assert successor.get("c-c") == Conversation()  # deleted
        assert successor.partitions() == {0, 1, 2}
        assert dict(successor.items()).keys() == {"c-a", "c-b", "c-d"}
        successor.forget({0})
        assert successor.get("c-a") == Conversation() and successor.partitions() == {1, 2}

        only_one = ConversationStore(topic, pipeline.kafka.servers, SimpleNamespace())
        await only_one.recover({1})
        assert {k for k, _ in only_one.items()} == {"c-b", "c-d"}

    asyncio.run(scenario())


class _Consumer:
    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


def _batch_consumer(held: int | None = None) -> tuple[BatchConsumer, Any]:
    class Held(BatchConsumer):
        def held(self, tp: TopicPartition) -> int | None:
            return held

    flushed: list[int] = []

    async def flush() -> None:
        flushed.append(1)

    app = SimpleNamespace(producer=SimpleNamespace(flush=flush))
    streams = StreamsConfig("t", "127.0.0.1:1", 4, datadir=Path("."), topics=TopicNames())
    consumer = Held(streams, BatchConfig("g", ("t",)), app)
    return consumer, flushed


def test_a_checkpoint_flushes_then_commits_what_was_applied_but_not_past_held_work() -> None:
    async def scenario() -> None:
        reader, flushed = _batch_consumer(held=None)
        kafka = _Consumer()
        tp = TopicPartition("t", 0)
        reader._processed[tp] = 10
        await reader.checkpoint(kafka)
        assert flushed == [1, 1] and kafka.commits == [{tp: 10}]  # effects, then changelog
        await reader.checkpoint(kafka)
        assert kafka.commits == [{tp: 10}]  # nothing new: no flush, no commit

        waiting, _ = _batch_consumer(held=4)
        kafka = _Consumer()
        waiting._processed[tp] = 10
        await waiting.checkpoint(kafka)
        assert kafka.commits == [{tp: 4}]  # a request at offset 4 is still being answered

    asyncio.run(scenario())


def test_a_send_the_producer_gave_up_on_stops_the_commit() -> None:
    async def scenario() -> None:
        reader, _ = _batch_consumer()
        kafka = _Consumer()
        reader._processed[TopicPartition("t", 0)] = 3
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed.set_exception(TimeoutError("no ack"))
        reader.track([failed])
        with pytest.raises(RuntimeError, match="sends failed"):
            await reader.checkpoint(kafka)
        assert kafka.commits == []

    asyncio.run(scenario())


async def _committed(
    bootstrap: str, group: str, tps: list[TopicPartition]
) -> dict[int, int | None]:
    """A group's committed offsets, read through the coordinator with its retries (the
    admin client's OffsetFetch answers "none" on a response-level error)."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await reader.start()
    try:
        return {tp.partition: await reader.committed(tp) for tp in tps}
    finally:
        await reader.stop()


def test_a_new_group_starts_where_the_legacy_group_stopped(pipeline: Settings) -> None:
    """An upgrade: the hot path's groups are new, and must not read the log from its
    beginning (every reply would be delivered again): they take the Faust group's
    committed offsets, once; a group that has offsets of its own keeps them."""

    async def scenario() -> None:
        topic = await new_topic(pipeline, "test-changelog", 2)
        bootstrap = pipeline.kafka.servers
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for n in range(6):
                await producer.send_and_wait(topic, b"x", key=b"k", partition=n % 2)
        finally:
            await producer.stop()
        legacy, group = f"legacy-{uuid.uuid4().hex[:6]}", f"new-{uuid.uuid4().hex[:6]}"
        old = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=legacy)
        await old.start()
        try:
            tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
            old.assign(tps)
            await old.commit({tps[0]: 2, tps[1]: 3})
        finally:
            await old.stop()
        streams = StreamsConfig(
            "t", bootstrap, 2, datadir=Path("."), topics=TopicNames(), kafka_options={}
        )
        config = BatchConfig(group, (topic,), legacy_group_id=legacy)
        await BatchConsumer(streams, config, SimpleNamespace())._seed_offsets()
        assert await _committed(bootstrap, group, tps) == {0: 2, 1: 3}
        # Seeded once: offsets of its own are never overwritten by the legacy ones.
        mine = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
        await mine.start()
        try:
            mine.assign(tps)
            await mine.commit({tps[0]: 3, tps[1]: 3})
        finally:
            await mine.stop()
        await BatchConsumer(streams, config, SimpleNamespace())._seed_offsets()
        assert await _committed(bootstrap, group, tps) == {0: 3, 1: 3}

    asyncio.run(scenario())


def test_a_checkpoint_in_the_background_commits_what_was_captured_not_later_batches() -> None:
    """Steps 2-4 run while the next batches are applied: the commit holds the offsets
    and the changelog states taken when it started, never a later batch's."""

    async def scenario() -> None:
        release = asyncio.Event()
        flushes: list[int] = []
        written: list[tuple[str, int]] = []

        async def flush() -> None:
            flushes.append(1)
            await release.wait()

        async def send(topic: str, key: bytes, value: bytes, *rest: Any) -> Any:
            written.append((key.decode(), json.loads(value)["seq"]))
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

        app = SimpleNamespace(producer=SimpleNamespace(flush=flush, send=send))
        store = ConversationStore("changelog", "127.0.0.1:1", app)

        class Table(BatchConsumer):
            def commit_writes(self) -> Any:
                return store.changelog_writes()

        streams = StreamsConfig("t", "127.0.0.1:1", 4, datadir=Path("."), topics=TopicNames())
        reader = Table(streams, BatchConfig("g", ("t",)), app)
        tp = TopicPartition("t", 0)

        class Kafka(_Consumer):
            def assignment(self) -> set[TopicPartition]:
                return {tp}

        kafka = Kafka()
        store.put("c-a", _state("c-a", 1), 0)
        reader._processed[tp] = 10
        await reader._step(kafka, {})  # due: starts in the background
        await asyncio.sleep(0)
        assert reader._in_flight is not None and flushes == [1] and kafka.commits == []
        # The next batch, applied while the checkpoint waits for its flush.
        store.put("c-a", _state("c-a", 2), 0)
        reader._processed[tp] = 20
        await reader._step(kafka, {})  # one checkpoint at a time: none started
        release.set()
        await reader._settled()
        assert kafka.commits == [{tp: 10}] and written == [("c-a", 1)]
        await reader.checkpoint(kafka)  # the next one takes the rest
        assert kafka.commits == [{tp: 10}, {tp: 20}] and written == [("c-a", 1), ("c-a", 2)]

    asyncio.run(scenario())
