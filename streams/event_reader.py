"""The worker's reader of the log: each record read once, its effects applied per batch.

Every record of ``kefu.events`` (and of ``kefu.queue-events``) is fetched once per
process, decoded once (a ``Commit``'s events, or an older single-event record) and
handed to every in-process consumer: the Redis projection, delivery (with its
receipts), the routing feed and the responder. One Faust stream per consumer cost
each record four passes through Faust's per-event machinery (bench/RESULTS.md
"Hot path"), so this runs an aiokafka consumer of its own, in its own group
(``<app id>-events``), started with the Faust app as a runtime dependency: more
workers split its partitions as they split the commands'.

A batch (``getmany``) goes through ``_apply`` and then ``checkpoint``, the commit order
written out in one place: effects, producer flush, offsets. A crash anywhere before the
commit makes the batch come again, and every effect absorbs a repeat (the projection
by seq, receipts and routing commands by ids derived from the event, channels by the
reply's idempotency key). The plain consumer delivers each partition in order and
resumes from the committed offset, so none of the hole repair Faust's shared consumer
needs (``streams.consumer``) applies here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from mode import Service

from schemas.codec import CODEC, DecodeError
from schemas.records import Event, QueueEvent
from streams import delivery, routing_feed, telemetry
from streams.app import KefuApp
from streams.delivery import Deliverer
from streams.inbox import MAX_RECORD_BYTES, outlasting, send_dead_letter
from streams.projection import EventSink, apply_until_done
from streams.responder import ResponderPool

log = logging.getLogger(__name__)
STAGE = "reader"
PROJECTION_STAGE = "projection.redis"


@dataclass(frozen=True, slots=True)
class ReaderConfig:
    group_id: str
    max_records: int = 2000  # per fetch: bounds a batch's effects (and a redelivery)
    poll_ms: int = 100
    # Seeds a new group from this one's committed offsets (the Faust group that read
    # the events before this reader existed), so an upgrade does not redeliver history.
    legacy_group_id: str = ""


def decode_events(message: Any) -> list[Event | QueueEvent]:
    """The events a record holds; ``DecodeError`` if any of them is not one."""
    value = message.value or b""
    if len(value) > MAX_RECORD_BYTES:
        raise DecodeError(f"record of {len(value)} bytes is over the {MAX_RECORD_BYTES}-byte limit")
    out: list[Event | QueueEvent] = []
    for record in CODEC.decode_all(value):
        if not isinstance(record, Event | QueueEvent):
            raise DecodeError(f"expected an event, got {record.type}")
        out.append(record)
    return out


class _Rebalances(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, reader: EventReader) -> None:
        self._reader = reader

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._reader.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        names = sorted(f"{tp.topic}-{tp.partition}" for tp in assigned)
        log.info("events reader assigned %s", ", ".join(names))


class EventReader(Service):
    """Reads the events topics and applies each batch (module docstring)."""

    def __init__(
        self,
        kefu: KefuApp,
        sink: EventSink,
        deliverer: Deliverer,
        responder: ResponderPool,
        config: ReaderConfig,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._kefu = kefu
        self._sink = sink
        self._deliverer = deliverer
        self._responder = responder
        self._config = config
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()  # a batch and a rebalance never overlap
        self._processed: dict[TopicPartition, int] = {}  # next offset, effects done
        self._committed: dict[TopicPartition, int] = {}
        self.records = 0  # records applied by this process (tests, metrics)

    # --- lifecycle -------------------------------------------------------------------

    async def on_start(self) -> None:
        streams = self._kefu.config
        names = streams.topics
        consumer = AIOKafkaConsumer(
            bootstrap_servers=streams.broker,
            group_id=self._config.group_id,
            client_id=f"{self._config.group_id}-reader",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=streams.fetch_max_wait_ms,
            fetch_min_bytes=streams.fetch_min_bytes,
            session_timeout_ms=int(streams.session_timeout * 1000),
            heartbeat_interval_ms=int(streams.heartbeat_interval * 1000),
            rebalance_timeout_ms=int(streams.rebalance_timeout * 1000),
            # A batch waits for channels (bounded) and Redis (waited out): generous.
            max_poll_interval_ms=600_000,
            isolation_level="read_committed"
            if streams.processing_guarantee == "exactly_once"
            else "read_uncommitted",
            **dict(streams.kafka_options),
        )
        await self._seed_offsets()
        await consumer.start()
        consumer.subscribe([names.events, names.queue_events], listener=_Rebalances(self))
        self._consumer = consumer

    async def on_stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        async with self._lock:
            await self.checkpoint(consumer)
        await self._responder.close()
        await consumer.stop()

    @Service.task
    async def _read(self) -> None:
        while not self.should_stop:
            consumer = self._consumer
            if consumer is None:
                await asyncio.sleep(0.05)
                continue
            try:
                fetched = await consumer.getmany(
                    timeout_ms=self._config.poll_ms, max_records=self._config.max_records
                )
            except KafkaError as exc:  # the broker away: fetch again
                log.warning("events fetch failed: %r", exc)
                await asyncio.sleep(0.5)
                continue
            async with self._lock:
                owned = consumer.assignment()
                batch = {tp: records for tp, records in fetched.items() if tp in owned and records}
                if batch:
                    await self._apply(batch)
                await self.checkpoint(consumer)

    async def revoked(self, gone: set[TopicPartition]) -> None:
        """Partitions taken away: the batch in flight finishes and commits first."""
        consumer = self._consumer
        async with self._lock:
            if consumer is not None:
                await self.checkpoint(consumer)
            self._responder.forget(gone)
            for tp in gone:
                self._processed.pop(tp, None)
                self._committed.pop(tp, None)

    # --- one batch -------------------------------------------------------------------

    async def _apply(self, batch: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """The effects of a batch, each consumer once over all of it: projection first
        (the read model shows a reply no later than the customer gets it), then
        deliveries and queue notices, routing commands, receipts, reply requests."""
        started = time.perf_counter()
        items: list[tuple[Any, Event | QueueEvent]] = []
        messages: list[Any] = []
        for records in batch.values():
            for message in records:
                try:
                    events = decode_events(message)
                except DecodeError as exc:
                    await send_dead_letter(self._kefu.deadletter, message, exc.reason, STAGE)
                    continue
                messages.append(message)
                items.extend((message, event) for event in events)
        if items:
            await apply_until_done(self._sink, [event for _, event in items])
            telemetry.projected(PROJECTION_STAGE, messages, started)
        conversations = [(m, e) for m, e in items if isinstance(e, Event)]
        receipts = await delivery.deliver_batch(
            self._deliverer,
            conversations,
            self._kefu.deadletter,
            self._kefu.config.concurrency,
        )
        await routing_feed.feed(self._kefu, conversations)
        await self._send_receipts(receipts)
        for message, event in conversations:
            if self._responder.wanted(event):
                await self._responder.submit(message, event)  # type: ignore[arg-type]
        for tp, records in batch.items():
            self._processed[tp] = records[-1].offset + 1
        self.records += sum(len(records) for records in batch.values())

    async def _send_receipts(self, receipts: Sequence[delivery.Receipt]) -> None:
        """A partition's receipts as ONE command record: every conversation of an
        events partition is in the same commands partition, so the first one's id is a
        key that lands it there, and the conversation agent appends the outcomes as
        one events record. The record carries its first receipt's trace context."""
        by_partition: dict[int, list[delivery.Receipt]] = {}
        for receipt in receipts:
            by_partition.setdefault(receipt.message.partition, []).append(receipt)
        for group in by_partition.values():
            first = group[0].command
            key = first.conversation_id
            commands = [r.command for r in group]
            record: Any = first if len(group) == 1 else CODEC.commit(commands, key)
            send = partial(
                self._kefu.commands_out.send, key=key, value=record, headers=group[0].headers
            )
            # The replies are out: a Kafka hiccup must not lose their receipts.
            await outlasting(send, "delivery receipts")

    async def checkpoint(self, consumer: AIOKafkaConsumer) -> None:
        """The commit order, in one place (as quix-streams' ``Checkpoint.commit``):

        1. the batch's effects are done (``_apply`` returned: Redis written, replies
           handed to their channels, commands handed to the producer);
        2. the producer is flushed: every command and receipt is on the log;
        3. the offsets are committed, each partition up to what was applied but never
           past a reply request still being answered (``ResponderPool.holding``).

        A commit refused by a rebalance is only logged: the records come again to
        the partition's next owner, and every effect absorbs the repeat."""
        offsets: dict[TopicPartition, int] = {}
        for tp, done in self._processed.items():
            held = self._responder.holding(tp)
            offset = done if held is None else min(done, held)
            if offset > self._committed.get(tp, -1):
                offsets[tp] = offset
        if not offsets:
            return
        await self._kefu.app.producer.flush()
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            log.warning("events commit refused (%r): the records will come again", exc)
            return
        self._committed.update(offsets)

    # --- upgrade ---------------------------------------------------------------------

    async def _seed_offsets(self) -> None:
        """A new reader group starts where the legacy group (Faust's agents) stopped,
        not at the beginning: history must not be delivered twice after an upgrade."""
        legacy = self._config.legacy_group_id
        if not legacy:
            return
        streams = self._kefu.config
        topics = {streams.topics.events, streams.topics.queue_events}
        admin = AIOKafkaAdminClient(bootstrap_servers=streams.broker, **dict(streams.kafka_options))
        await admin.start()
        try:
            if await admin.list_consumer_group_offsets(self._config.group_id):
                return
            found = await admin.list_consumer_group_offsets(legacy)
        except KafkaError as exc:
            log.warning("could not read the legacy group's offsets: %r", exc)
            return
        finally:
            await admin.close()
        offsets = {
            tp: meta.offset for tp, meta in found.items() if tp.topic in topics and meta.offset >= 0
        }
        if not offsets:
            return
        seeder = AIOKafkaConsumer(
            bootstrap_servers=streams.broker,
            group_id=self._config.group_id,
            enable_auto_commit=False,
            **dict(streams.kafka_options),
        )
        await seeder.start()
        try:
            seeder.assign(list(offsets))
            await seeder.commit(offsets)
            log.info("events reader group seeded from %s at %d partitions", legacy, len(offsets))
        finally:
            await seeder.stop()

    # --- figures ---------------------------------------------------------------------

    def lag(self) -> list[tuple[str, int, int]]:
        """``(topic, partition, records not yet committed)`` per assigned partition."""
        consumer = self._consumer
        if consumer is None:
            return []
        out = []
        for tp in sorted(consumer.assignment()):
            highwater = consumer.highwater(tp)
            committed = self._committed.get(tp)
            if highwater is None or committed is None:
                continue
            out.append((tp.topic, tp.partition, max(0, highwater - committed)))
        return out
