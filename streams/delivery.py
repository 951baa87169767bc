"""The delivery agent: hands each produced reply to its channel, then records the
outcome as a ``RecordDelivery`` command (the conversation agent appends
``MessageDelivered``). Batches skip other events unread; within a batch, one
conversation's replies go out in log order and different conversations at once.
Channel I/O is injected (``Deliverer``), so this module stays free of channel code;
``connectors.delivery`` provides it."""

from __future__ import annotations

import logging
import uuid
from typing import Any, Protocol

from schemas.outcomes import DeliveryOutcome as Outcome
from schemas.records import ConversationQueued, Event, RecordDelivery, ReplyProduced
from schemas.time import now_ms
from streams import telemetry
from streams.app import KefuApp
from streams.inbox import (
    batches,
    each_conversation,
    outlasting,
    position,
    send_dead_letter,
    send_in_order,
)

log = logging.getLogger(__name__)
_DELIVERY_NAMESPACE = uuid.UUID("a4d7c0f2-91b3-4e6a-b2d8-0c5f7e1a9b63")
STAGE = "delivery"


class Deliverer(Protocol):
    async def deliver(self, reply: ReplyProduced) -> Outcome: ...

    async def notify(self, event: ConversationQueued) -> None:
        """Tell a waiting customer their place in line (best effort, no receipt)."""


def delivery_command_id(reply_event_id: str) -> str:
    return str(uuid.uuid5(_DELIVERY_NAMESPACE, reply_event_id))


def install(kefu: KefuApp, deliverer: Deliverer) -> Any:
    async def handle(event: Any, record: Event) -> None:
        with telemetry.hop(STAGE, event.message, record):
            if isinstance(record, ConversationQueued):
                await _notify(deliverer, record)
            elif isinstance(record, ReplyProduced):
                await _deliver(kefu, deliverer, event, record)

    async def delivery(stream: Any) -> None:
        wanted = (ReplyProduced, ConversationQueued)
        async for batch in batches(stream, Event, kefu.deadletter, STAGE, only=wanted):
            await each_conversation(batch, handle, kefu.config.concurrency)

    # One actor: a second would take the next batch and could overtake a conversation's
    # earlier reply. Channels bound their calls (timeouts, retries), so a slow one holds
    # a batch for a bounded time; Redis down (the web chat's outbox) is waited out for
    # up to ``TRANSIENT_BUDGET_S`` before the reply is dead-lettered.
    return kefu.app.agent(kefu.events_in, name="kefu.delivery")(delivery)


async def _notify(deliverer: Deliverer, event: ConversationQueued) -> None:
    try:
        await deliverer.notify(event)
    except Exception:  # best effort: the position is in the read model too
        log.warning("queue notice for %s failed", event.conversation_id, exc_info=True)


async def _deliver(kefu: KefuApp, deliverer: Deliverer, event: Any, record: ReplyProduced) -> None:
    try:
        outcome = await outlasting(lambda: deliverer.deliver(record), f"{STAGE} {record.event_id}")
    except Exception as exc:
        log.exception("delivery failed at %s", position(event.message))
        await send_dead_letter(kefu.deadletter, event.message, repr(exc), STAGE)
        return
    receipt = RecordDelivery(
        command_id=delivery_command_id(record.event_id),
        conversation_id=record.conversation_id,
        tenant_id=record.tenant_id,
        issued_at=now_ms(),
        reply_event_id=record.event_id,
        channel=record.channel,
        status=outcome.status,
        attempts=outcome.attempts,
        detail=outcome.detail,
    )
    # The reply is out: a Kafka hiccup must not lose its receipt (nor resend the reply).
    await send_in_order(
        [(kefu.commands_out, record.conversation_id, receipt)], f"{STAGE} {record.event_id}"
    )
