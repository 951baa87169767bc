"""Delivery: hands each produced reply to its channel and says how it went.

The worker's reader (``streams.event_reader``) calls ``deliver_batch`` with the events
of a fetched batch: one conversation's replies go out in log order, different
conversations at once. Each outcome is a ``RecordDelivery`` receipt; the reader sends
a partition's receipts of a batch as ONE command record (a ``Commit``), so the
conversation agent appends their ``MessageDelivered`` events as one record too: the
receipt costs a fraction of a hop per reply instead of a hop of its own. Channel I/O is
injected (``Deliverer``), so this module stays free of channel code;
``connectors.delivery`` provides it."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from schemas.codec import CODEC
from schemas.ids import uuid5_text
from schemas.outcomes import DeliveryOutcome as Outcome
from schemas.records import (
    ConversationClosed,
    ConversationQueued,
    CsatRated,
    CsatRequested,
    Event,
    MessageReceived,
    RecordDelivery,
    ReplyProduced,
)
from schemas.time import now_ms
from streams import telemetry
from streams.inbox import each_conversation, outlasting, position, send_dead_letter

log = logging.getLogger(__name__)
_DELIVERY_NAMESPACE = uuid.UUID("a4d7c0f2-91b3-4e6a-b2d8-0c5f7e1a9b63")
STAGE = "delivery"


class Deliverer(Protocol):
    async def deliver(self, reply: ReplyProduced) -> Outcome: ...

    async def notify(self, event: Event) -> None:
        """Tell the customer's live sockets (best effort, no receipt) one of
        ``noticed``: their place in line, that their message is listed, that the
        conversation closed, that a rating is asked for or was recorded."""


# Notices for the web chat's live sockets. A chat message's MessageReceived is
# delivered after its batch was projected (``event_reader.apply``), so its notice
# honestly says "the read model lists it: agents and the AI see it".
NOTICES = (ConversationQueued, ConversationClosed, CsatRequested, CsatRated)


def noticed(event: Event) -> bool:
    if isinstance(event, MessageReceived):
        return event.channel == "web"  # only the web chat shows delivered marks
    return isinstance(event, NOTICES)


def delivery_command_id(reply_event_id: str) -> str:
    return uuid5_text(_DELIVERY_NAMESPACE, reply_event_id)


@dataclass(frozen=True, slots=True)
class Receipt:
    message: Any  # the Kafka record the reply came in
    command: RecordDelivery
    headers: list[tuple[str, bytes]]  # the delivery hop's trace context, for the send


def receipt_of(reply: ReplyProduced, outcome: Outcome) -> RecordDelivery:
    return RecordDelivery(
        command_id=delivery_command_id(reply.event_id),
        conversation_id=reply.conversation_id,
        tenant_id=reply.tenant_id,
        issued_at=now_ms(),
        reply_event_id=reply.event_id,
        channel=reply.channel,
        status=outcome.status,
        attempts=outcome.attempts,
        detail=outcome.detail,
    )


async def deliver_batch(
    deliverer: Deliverer,
    items: Sequence[tuple[Any, Event]],
    deadletter: Any,
    concurrency: int,
) -> list[Receipt]:
    """Deliver the replies and queue notices among ``items`` (``(Kafka message,
    event)`` in log order); the receipts, with the message each reply came in. Channels
    bound their calls (timeouts, retries), so a slow one holds a batch for a bounded
    time; Redis down (the web chat's outbox) is waited out for up to
    ``TRANSIENT_BUDGET_S`` before the reply is dead-lettered."""
    wanted = [(m, e) for m, e in items if isinstance(e, ReplyProduced) or noticed(e)]
    receipts: list[Receipt] = []

    async def handle(message: Any, event: Event) -> None:
        with telemetry.hop(STAGE, message, event):
            if isinstance(event, ReplyProduced):
                receipt = await _deliver(deliverer, message, event, deadletter)
                if receipt is not None:  # the hop's trace goes on with the receipt
                    receipts.append(Receipt(message, receipt, telemetry.carried()))
            else:
                await _notify(deliverer, event)

    if wanted:
        await each_conversation(wanted, handle, concurrency)
    return receipts


async def _notify(deliverer: Deliverer, event: Event) -> None:
    try:
        await deliverer.notify(event)
    except Exception:  # best effort: what it says is in the read model too
        log.warning("%s notice for %s failed", event.type, event.conversation_id, exc_info=True)


async def _deliver(
    deliverer: Deliverer, message: Any, reply: ReplyProduced, deadletter: Any
) -> RecordDelivery | None:
    try:
        outcome = await outlasting(lambda: deliverer.deliver(reply), f"{STAGE} {reply.event_id}")
    except Exception as exc:
        log.exception("delivery failed at %s", position(message))
        await send_dead_letter(deadletter, message, repr(exc), STAGE, payload=_encoded(reply))
        return None
    return receipt_of(reply, outcome)


def _encoded(reply: ReplyProduced) -> bytes:
    # The reply alone, not the record it came in: a redrive must not repeat its siblings.
    return CODEC.encode(reply)
