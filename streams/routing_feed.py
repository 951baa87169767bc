"""The routing feed: turns conversation events into routing commands for the queue
they concern. It re-keys from conversation to queue, which is what serialises the
router's decisions per queue; command ids derive from the event, so a redelivered
event makes no second request."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from schemas.ids import uuid5_text
from schemas.records import (
    ConversationClosed,
    ConversationHandedOff,
    ConversationRouted,
    Event,
    ReleaseAssignment,
    RequestAssignment,
    RoutingCommand,
)
from streams import telemetry
from streams.app import KefuApp
from streams.inbox import send_in_order

_NAMESPACE = uuid.UUID("8c4b2a9e-6d3f-4e1a-b7c5-2e9f0d8a1b36")
STAGE = "routing-feed"


def _id(event: Event, what: str) -> str:
    return uuid5_text(_NAMESPACE, f"{event.event_id}/{what}")


def routing_commands(event: Event) -> list[RoutingCommand]:
    match event:
        case ConversationRouted(assignee=""):
            return [
                RequestAssignment(
                    command_id=_id(event, "request"),
                    queue=event.queue,
                    conversation_id=event.conversation_id,
                    priority=event.priority,
                    requested_at=event.occurred_at,
                    tenant_id=event.tenant_id,
                    issued_at=event.occurred_at,
                )
            ]
        case ConversationHandedOff():
            out: list[RoutingCommand] = []
            # Leaving a human (or a place in line): free it in the queue it leaves.
            if event.from_assignee != "ai" and event.from_queue:
                out.append(
                    ReleaseAssignment(
                        command_id=_id(event, "release"),
                        queue=event.from_queue,
                        conversation_id=event.conversation_id,
                        reason=event.reason[:200],
                        tenant_id=event.tenant_id,
                        issued_at=event.occurred_at,
                    )
                )
            if event.to_assignee == "":
                out.append(
                    RequestAssignment(
                        command_id=_id(event, "request"),
                        queue=event.queue,
                        conversation_id=event.conversation_id,
                        priority=event.priority,
                        requested_at=event.occurred_at,
                        preferred_agent=event.preferred_agent,
                        tenant_id=event.tenant_id,
                        issued_at=event.occurred_at,
                    )
                )
            return out
        case ConversationClosed() if event.assignee != "ai" and event.queue:
            return [
                ReleaseAssignment(
                    command_id=_id(event, "release"),
                    queue=event.queue,
                    conversation_id=event.conversation_id,
                    reason=f"closed: {event.reason}"[:200],
                    tenant_id=event.tenant_id,
                    issued_at=event.occurred_at,
                )
            ]
        case _:
            return []


async def feed(kefu: KefuApp, items: Sequence[tuple[Any, Event]]) -> list[Any]:
    """Send the routing commands of a batch's events (``(Kafka message, event)``, in
    log order); each under the hop of the event it came from (its trace goes on).
    Returns the sends' delivery futures."""
    sent: list[Any] = []
    for message, event in items:
        commands = routing_commands(event)
        if not commands:
            continue
        with telemetry.hop(STAGE, message, event):
            sends = [(kefu.routing_out, command.queue, command) for command in commands]
            sent += await send_in_order(sends, f"{STAGE} {event.event_id}")
    return sent
