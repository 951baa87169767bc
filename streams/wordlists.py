"""Live word lists: every worker follows the whole compacted control topic.

The control topic (``TopicNames.control``) holds one ``WordListChanged`` per
``<tenant>/<category>`` key (compaction keeps the latest), or a tombstone that removes
a tenant's own list. Every worker must apply every record, whichever partitions of
the conversation topics it owns, so this is not a consumer-group agent: each worker
runs its own group-less aiokafka consumer, assigned every partition of the control
topic, reading from the beginning and then following it.

It runs as a ``mode.Service`` added as the Faust app's first dependency, so its
``on_start`` (read the topic up to its end offsets, apply, build the automata) finishes
before the app starts its consumer and agents: a worker never moderates a message with
the shipped defaults while a tenant's list exists. After that a task applies changes as
they arrive (one rebuild per fetched batch), without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from mode import Service

from schemas.codec import CODEC, DecodeError
from schemas.records import WordListChanged, dead_letter
from schemas.time import now_ms
from streams import faust_private
from streams.app import KefuApp
from streams.inbox import MAX_RECORD_BYTES
from streams.moderation import (
    CategoryList,
    ListChange,
    ListRemoved,
    Moderator,
    validate,
)

log = logging.getLogger(__name__)


def list_key(tenant_id: str, category: str) -> bytes:
    return f"{tenant_id}/{category}".encode()


def change_of(key: bytes | None, value: bytes | None) -> ListChange:
    """The list change a control record carries; ValueError/DecodeError if none."""
    if value is None:
        return change_of_record(key, None)
    record = CODEC.decode(value)
    if not isinstance(record, WordListChanged):
        raise DecodeError(f"expected a WordListChanged, got {record.type}")
    return change_of_record(key, record)


def change_of_record(key: bytes | None, record: WordListChanged | None) -> ListChange:
    if record is None:  # a tombstone: only the key says which list goes
        if key is None or b"/" not in key:
            raise ValueError("tombstone without a tenant/category key")
        tenant, category = key.decode().split("/", 1)
        return ListRemoved(tenant, category)
    if key != list_key(record.tenant_id, record.category):
        raise ValueError(f"key {key!r} does not name {record.tenant_id}/{record.category}")
    change = CategoryList(
        record.tenant_id, record.category, record.action, tuple(record.words), record.version
    )
    validate(change)
    return change


@dataclass(slots=True)
class ControlLog:
    """What the control topic holds now: the latest record per key, and its end."""

    records: dict[bytes, WordListChanged | None] = field(default_factory=dict)
    end: dict[int, int] = field(default_factory=dict)  # partition -> end offset

    @property
    def max_version(self) -> int:
        return max((r.version for r in self.records.values() if r is not None), default=0)

    def changes(self) -> list[ListChange]:
        return [change_of_record(key, record) for key, record in self.records.items()]


# ------------------------------------------------------------------- the follower


class WordListFollower(Service):
    """Applies the control topic to ``moderator``; one per worker process."""

    def __init__(
        self,
        moderator: Moderator,
        bootstrap: str,
        topic: str,
        *,
        load_timeout: float = 60.0,
        kafka_options: Mapping[str, Any] | None = None,
        deadletter_topic: str = "",
        **kwargs: Any,
    ) -> None:
        self.moderator = moderator
        self.kafka_options = dict(kafka_options or {})
        self.bootstrap = bootstrap
        self.topic = topic
        self.load_timeout = load_timeout
        self.loaded = False
        self.applied = 0  # control records applied since start
        self.applied_at = 0  # epoch ms of the last change applied
        self.skipped = 0  # records that were not a valid list change
        # Followed live, a record that is not a list change goes to the dead-letter
        # topic (from every worker that sees it); on start-up the history is only
        # skipped, as it was dead-lettered when it arrived.
        self.deadletter_topic = deadletter_topic
        self._rejected: list[tuple[ConsumerRecord[bytes, bytes], str]] = []
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        started = time.monotonic()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,  # no group: this worker sees every partition, every record
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id="kefu-wordlists",
            **self.kafka_options,
        )
        await consumer.start()
        self._consumer = consumer
        partitions = await asyncio.wait_for(self._partitions(consumer), self.load_timeout)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        left = max(self.load_timeout - (time.monotonic() - started), 1.0)
        await asyncio.wait_for(self._catch_up(consumer, end), left)
        self._rejected.clear()
        self.loaded = True
        log.info(
            "word lists loaded: %d records from %s in %.2f s, shared version %d",
            self.applied,
            self.topic,
            time.monotonic() - started,
            self.moderator.version(),
        )

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        while True:
            found = await _partitions_of(consumer, self.topic)
            if found:
                return [TopicPartition(self.topic, p) for p in sorted(found)]
            log.warning("control topic %s missing (run `kefu topics`); waiting", self.topic)
            await asyncio.sleep(1.0)

    async def _catch_up(self, consumer: AIOKafkaConsumer, end: dict[TopicPartition, int]) -> None:
        pending: list[ListChange] = []
        while await _behind(consumer, end):
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                pending.extend(self._changes(records))
        await self._apply(pending)  # one build for the whole history

    @Service.task
    async def _follow(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not self.should_stop:
            try:
                batch = await consumer.getmany(timeout_ms=1000)
                changes = [c for records in batch.values() for c in self._changes(records)]
                if changes:
                    await self._apply(changes)
                await self._dead_letter()
            except asyncio.CancelledError:
                raise
            except Exception:  # a broker hiccup must not stop the worker; try again
                if self.should_stop:
                    break
                log.exception("following %s failed; retrying", self.topic)
                await self.sleep(1.0)

    def _changes(self, records: Iterable[ConsumerRecord[bytes, bytes]]) -> list[ListChange]:
        out: list[ListChange] = []
        for record in records:
            try:
                size = len(record.value or b"")
                if size > MAX_RECORD_BYTES:
                    limit = MAX_RECORD_BYTES
                    raise DecodeError(f"record of {size} bytes is over the {limit}-byte limit")
                out.append(change_of(record.key, record.value))
            except (DecodeError, ValueError) as exc:
                self.skipped += 1
                self._rejected.append((record, str(exc)))
                log.warning(
                    "skipped control record %s[%d]@%d: %s",
                    record.topic,
                    record.partition,
                    record.offset,
                    exc,
                )
        return out

    async def _apply(self, changes: list[ListChange]) -> None:
        if not changes:
            return
        # Building an automaton for a long list takes tens of ms: off the event loop.
        await asyncio.to_thread(self.moderator.apply, changes)
        self.applied += len(changes)
        self.applied_at = now_ms()
        log.info("applied %d word-list changes", len(changes))

    async def _dead_letter(self) -> None:
        if not self.deadletter_topic:
            self._rejected.clear()
        while self._rejected:
            record, reason = self._rejected[0]
            if self._producer is None:  # only ever needed for poison: started lazily
                self._producer = AIOKafkaProducer(
                    bootstrap_servers=self.bootstrap, acks="all", **self.kafka_options
                )
                await self._producer.start()
            letter = dead_letter(
                source_topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                reason=reason,
                consumer="wordlists",
                failed_at=now_ms(),
                payload=(record.value or b"")[:MAX_RECORD_BYTES],
                key=record.key,
            )
            await self._producer.send_and_wait(
                self.deadletter_topic, CODEC.encode(letter), key=record.key
            )
            self._rejected.pop(0)

    async def on_shutdown(self) -> None:
        # After the follow task is cancelled, so no fetch is in flight on a stopped client.
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    def status(self) -> dict[str, Any]:
        lists = self.moderator.lists()
        return {
            "loaded": self.loaded,
            "applied": self.applied,
            "applied_at": self.applied_at,
            "skipped": self.skipped,
            "versions": {tenant: self.moderator.version(tenant) for tenant in lists},
            "lists": {
                tenant: {
                    c: {"action": lst.action, "words": len(lst.words), "version": lst.version}
                    for c, lst in categories.items()
                }
                for tenant, categories in lists.items()
            },
        }


def install(kefu: KefuApp, moderator: Moderator, *, load_timeout: float = 60.0) -> WordListFollower:
    """Make ``moderator`` follow the control topic in this worker."""
    follower = WordListFollower(
        moderator,
        kefu.config.broker,
        kefu.config.topics.control,
        load_timeout=load_timeout,
        kafka_options=kefu.config.kafka_options,
        deadletter_topic=kefu.config.topics.deadletter,
    )
    # Added before the app starts, so it comes before the dependencies Faust adds on
    # start (producer, consumer, agents): they wait for the lists to be loaded.
    kefu.app.add_dependency(follower)

    store = kefu.conversations

    @kefu.app.page("/moderation")
    async def moderation_status(web: Any, request: Any) -> Any:
        # The commands partitions: the conversations this worker moderates now.
        partitions = sorted(store.partitions())
        return web.json({**follower.status(), "commands_partitions": partitions})

    return follower


async def _partitions_of(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    # A fresh metadata fetch: the consumer's own view only knows subscribed topics.
    return await faust_private.topic_partitions(consumer, topic)


async def _behind(consumer: AIOKafkaConsumer, end: dict[TopicPartition, int]) -> bool:
    for tp, offset in end.items():
        if await consumer.position(tp) < offset:
            return True
    return False


# ---------------------------------------------------------------- admin (the CLI)


async def read_control(
    bootstrap: str,
    topic: str,
    wait_s: float = 30.0,
    kafka_options: Mapping[str, Any] | None = None,
) -> ControlLog:
    """The control topic as it stands: the latest record per key (None: tombstone)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        **(kafka_options or {}),
    )
    await consumer.start()
    try:
        found = await _partitions_of(consumer, topic)
        if not found:
            raise RuntimeError(f"control topic {topic} does not exist (run `kefu topics`)")
        partitions = [TopicPartition(topic, p) for p in sorted(found)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        log_ = ControlLog(end={tp.partition: offset for tp, offset in end.items()})

        async def drain() -> None:
            while await _behind(consumer, end):
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        if record.key is None:
                            continue
                        if record.value is None:
                            log_.records[record.key] = None
                            continue
                        try:
                            decoded = CODEC.decode(record.value)
                        except DecodeError:
                            continue
                        if isinstance(decoded, WordListChanged):
                            log_.records[record.key] = decoded

        await asyncio.wait_for(drain(), wait_s)
        return log_
    finally:
        await consumer.stop()


def next_version(current: ControlLog) -> int:
    """Greater than every version on the topic, and never reused even after a
    tombstone's record is compacted away: the time in ms unless the topic is ahead."""
    return max(current.max_version + 1, now_ms())


async def publish(
    bootstrap: str,
    topic: str,
    key: bytes,
    record: WordListChanged | None,
    kafka_options: Mapping[str, Any] | None = None,
) -> tuple[int, int]:
    """Send one control record (None: a tombstone); return (partition, offset)."""
    if record is not None:
        validate(
            CategoryList(record.tenant_id, record.category, record.action, tuple(record.words), 0)
        )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **(kafka_options or {}))
    await producer.start()
    try:
        value = CODEC.encode(record) if record is not None else None
        meta = await producer.send_and_wait(topic, value, key=key)
        return int(meta.partition), int(meta.offset)
    finally:
        await producer.stop()
