"""The Redis projection's contract: a read model that takes batches of events.

The worker's reader (``streams.event_reader``) applies each fetched batch to the sink
in one call before it commits the batch's offsets, so the read model is written before
the commit. Sinks are idempotent (guarded by each conversation's seq), so a
redelivered batch changes nothing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from schemas.records import Event, QueueEvent

log = logging.getLogger(__name__)


Projected = Event | QueueEvent  # conversations' and queues' histories


class EventSink(Protocol):
    name: str

    async def apply(self, events: Sequence[Projected]) -> None: ...


async def apply_until_done(sink: EventSink, events: Sequence[Projected]) -> None:
    """A read model that is down (Redis restarting) is waited for, not skipped: the
    partitions hold still and catch up when the store is back."""
    delay = 0.1
    while True:
        try:
            await sink.apply(events)
            return
        except Exception:
            log.exception("projection %s failed; retrying in %.1fs", sink.name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
