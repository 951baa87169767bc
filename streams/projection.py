"""The projection agent: feeds batches of events to a read model (``EventSink``).

Batches come from ``take_events``; Faust acks them (and so may commit their offsets)
only after ``apply`` returns, so the read model is written before the commit. Sinks are
idempotent (guarded by each conversation's seq), so a redelivered batch changes
nothing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from schemas.codec import DecodeError
from schemas.records import Event, QueueEvent
from streams import telemetry
from streams.app import KefuApp
from streams.consumer import InOrder
from streams.inbox import decode, send_dead_letter

log = logging.getLogger(__name__)


Projected = Event | QueueEvent  # conversations' and queues' histories


class EventSink(Protocol):
    name: str

    async def apply(self, events: Sequence[Projected]) -> None: ...


def install(
    kefu: KefuApp,
    sink: EventSink,
    batch: int = 500,
    within: float = 0.05,
    queues: bool = False,
) -> Any:
    """Project ``kefu.events``, or with ``queues`` the routing queues' history."""
    consumer = f"projection.{sink.name}" + (".queues" if queues else "")
    expected: type[Event] | type[QueueEvent] = QueueEvent if queues else Event
    topic = kefu.queue_events_in if queues else kefu.events_in

    async def projection(stream: Any) -> None:
        gate = InOrder(stream.app.consumer)  # a seq-guarded model must not skip ahead
        async for batch_events in stream.take_events(batch, within=within):
            started = time.perf_counter()
            decoded: list[Projected] = []
            for event in batch_events:
                if not gate.admit(event.message):
                    continue
                try:
                    decoded.append(decode(event.value, expected))
                except DecodeError as exc:
                    await send_dead_letter(kefu.deadletter, event.message, exc.reason, consumer)
            if decoded:
                await _apply_until_done(sink, decoded)
                telemetry.projected(consumer, batch_events, started)

    return kefu.app.agent(topic, name=f"kefu.{consumer}")(projection)


async def _apply_until_done(sink: EventSink, events: Sequence[Projected]) -> None:
    """A read model that is down (Redis restarting) is waited for, not skipped: the
    partition holds still and catches up when the store is back."""
    delay = 0.1
    while True:
        try:
            await sink.apply(events)
            return
        except Exception:
            log.exception("projection %s failed; retrying in %.1fs", sink.name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
