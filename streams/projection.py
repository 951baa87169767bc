"""The Redis projection's contract: a read model that takes batches of events.

The worker's reader (``streams.event_reader``) applies each fetched batch to the sink
in one call before it commits the batch's offsets, so the read model is written before
the commit. Sinks are idempotent (guarded by each conversation's seq), so a
redelivered batch changes nothing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from aiokafka import TopicPartition

from schemas.records import Event, QueueEvent

log = logging.getLogger(__name__)


Projected = Event | QueueEvent  # conversations' and queues' histories


class EventSink(Protocol):
    name: str

    async def apply(self, events: Sequence[Projected]) -> None: ...


@runtime_checkable
class PositionedSink(Protocol):
    """A sink that records with each batch where it leaves each partition of the log,
    and can tell, when the reader is given partitions, that it lost writes since
    (``projections.redis_rebuild``: Redis losing its newest append-only writes)."""

    name: str

    async def apply(
        self, events: Sequence[Projected], positions: Mapping[TopicPartition, int] | None = None
    ) -> None: ...

    async def catch_up(self, starts: Mapping[TopicPartition, int]) -> int: ...


async def apply_until_done(
    sink: EventSink,
    events: Sequence[Projected],
    positions: Mapping[TopicPartition, int] | None = None,
) -> None:
    """A read model that is down (Redis restarting) is waited for, not skipped: the
    partitions hold still and catch up when the store is back. ``positions`` (the
    next offset per partition after these events) go to a sink that records them."""
    delay = 0.1
    while True:
        try:
            if positions and isinstance(sink, PositionedSink):
                await sink.apply(events, positions)
            else:
                await sink.apply(events)
            return
        except Exception:
            log.exception("projection %s failed; retrying in %.1fs", sink.name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def catch_up_until_done(sink: PositionedSink, starts: Mapping[TopicPartition, int]) -> None:
    """``sink.catch_up``, waiting out a read model (or a log) that is down, as batches
    do: the partitions must not be read on before the model has what it lost."""
    delay = 0.1
    while True:
        try:
            await sink.catch_up(starts)
            return
        except Exception:
            log.exception("projection %s: catching up failed; retrying in %.1fs", sink.name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
