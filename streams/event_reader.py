"""The worker's reader of the log: each record read once, its effects applied per batch.

Every record of ``kefu.events`` (and of ``kefu.queue-events``) is fetched once per
process, decoded once (a ``Commit``'s events, or an older single-event record) and
handed to every in-process consumer: the Redis projection, delivery (with its
receipts), the routing feed and the responder. One Faust stream per consumer cost
each record four passes through Faust's per-event machinery (bench/RESULTS.md
"Hot path"), so this is a ``streams.batch_consumer.BatchConsumer`` in its own group
(``<app id>-events``): more workers split its partitions as they split the commands'.
A crash before the checkpoint makes a batch come again, and every effect absorbs a
repeat (the projection by seq, receipts and routing commands by ids derived from the
event, channels by the reply's idempotency key). A reply request being answered holds
its offset back (``ResponderPool.holding``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any

from aiokafka import TopicPartition

from schemas.codec import CODEC, DecodeError
from schemas.records import Event, QueueEvent, as_projected
from streams import delivery, routing_feed, telemetry
from streams.app import KefuApp
from streams.batch_consumer import BatchConfig, BatchConsumer
from streams.delivery import Deliverer
from streams.inbox import MAX_RECORD_BYTES, outlasting, send_dead_letter
from streams.projection import EventSink, PositionedSink, apply_until_done, catch_up_until_done
from streams.responder import ResponderPool

log = logging.getLogger(__name__)
STAGE = "reader"
PROJECTION_STAGE = "projection.redis"


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


def reader_config(kefu: KefuApp, app_id: str) -> BatchConfig:
    names = kefu.config.topics
    return BatchConfig(
        group_id=f"{app_id}-events",
        topics=(names.events, names.queue_events),
        legacy_group_id=app_id,
    )


class EventReader(BatchConsumer):
    """Reads the events topics and applies each batch (module docstring)."""

    def __init__(
        self,
        kefu: KefuApp,
        sink: EventSink,
        deliverer: Deliverer,
        responder: ResponderPool,
        config: BatchConfig,
        redact: Callable[[Sequence[Event]], Awaitable[None]] | None = None,
        observe: Callable[[Sequence[tuple[Any, Event]]], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(kefu.config, config, kefu.app, kefu.hot_producer, **kwargs)
        self._kefu = kefu
        self._sink = sink
        # After a batch with ``CustomerErased`` events: what the read model holds of
        # those conversations beyond their hashes is redacted (projections.redis_erase).
        self._redact = redact
        # Told each batch's conversation events; may only schedule work, never wait
        # (the thumbnails of new images: connectors/thumbnails.py).
        self._observe = observe
        self._deliverer = deliverer
        self._responder = responder

    def held(self, tp: TopicPartition) -> int | None:
        return self._responder.holding(tp)

    def on_revoked(self, tps: set[TopicPartition]) -> None:
        self._responder.forget(tps)

    async def on_assigned(self, tps: set[TopicPartition]) -> None:
        """Before any batch of them: a read model that lost writes of these partitions
        (Redis's newest append-only writes, after a crash) gets them back from the log
        up to where this reader resumes (``projections.redis_rebuild``)."""
        sink, consumer = self._sink, self._consumer
        if not tps or consumer is None or not isinstance(sink, PositionedSink):
            return
        starts = {}
        for tp in tps:
            committed = await consumer.committed(tp)
            if committed is not None:  # none: the reader starts at the beginning
                starts[tp] = committed
        await catch_up_until_done(sink, starts)

    async def on_stop(self) -> None:
        await super().on_stop()
        await self._responder.close()

    async def apply(self, batch: Mapping[TopicPartition, Sequence[Any]]) -> None:
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
        if items:  # a reply at the time it reached the log (``as_projected``)
            projected = [as_projected(event, message.timestamp) for message, event in items]
            positions = {tp: records[-1].offset + 1 for tp, records in batch.items()}
            await apply_until_done(self._sink, projected, positions)
            if self._redact is not None:
                erased = [e for e in projected if e.type == "CustomerErased"]
                if erased:
                    await self._redact(erased)
            telemetry.projected(PROJECTION_STAGE, messages, started)
        conversations = [(m, e) for m, e in items if isinstance(e, Event)]
        if self._observe is not None:
            self._observe(conversations)
        receipts = await delivery.deliver_batch(
            self._deliverer,
            conversations,
            self._kefu.deadletter,
            self._kefu.config.concurrency,
        )
        self.track(await routing_feed.feed(self._kefu, conversations))
        await self._send_receipts(receipts)
        for message, event in conversations:
            if self._responder.wanted(event):
                await self._responder.submit(message, event)  # type: ignore[arg-type]

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
            self.track([await outlasting(send, "delivery receipts")])
