"""The router agent: the single writer of every queue (tenant:team).

Routing commands are keyed by queue, so one actor decides for a queue and two
workers can never assign from the same queue at once. Each decision is appended to
the queue's history (``kefu.queue-events``, one record per decision) and told to the
conversations it concerns as commands (assigned, or its place in line)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from schemas.codec import CODEC
from schemas.records import (
    AgentAssigned,
    AssignConversation,
    QueueConversation,
    QueueEvent,
    RoutingCommand,
)
from streams.app import KefuApp
from streams.inbox import position, records, send_dead_letter, send_in_order
from streams.queueing import Queue, RoutingRejected, decide_queue, evolve_queue

log = logging.getLogger(__name__)
_NAMESPACE = uuid.UUID("5d1e0c3b-7a4f-4b8e-9c2d-1f6a8e3b7c95")


def conversation_commands(
    before: Queue, after: Queue, events: list[QueueEvent]
) -> list[AssignConversation | QueueConversation]:
    """Assignments, and the new place in line of every conversation whose place moved.

    Ids derive from the decision's last event, so a redelivered decision repeats them.
    """
    if not events:
        return []
    last = events[-1]
    out: list[AssignConversation | QueueConversation] = []
    for event in events:
        if isinstance(event, AgentAssigned):
            out.append(
                AssignConversation(
                    command_id=str(uuid.uuid5(_NAMESPACE, event.event_id)),
                    conversation_id=event.conversation_id,
                    tenant_id=event.tenant_id,
                    issued_at=event.occurred_at,
                    agent_id=event.agent_id,
                    queue=event.queue,
                    priority=event.priority,
                )
            )
    for waiting in after.waiting:
        place = after.position(waiting.conversation_id)
        if place != before.position(waiting.conversation_id):
            out.append(
                QueueConversation(
                    command_id=str(
                        uuid.uuid5(_NAMESPACE, f"{last.event_id}/{waiting.conversation_id}")
                    ),
                    conversation_id=waiting.conversation_id,
                    tenant_id=last.tenant_id,
                    issued_at=last.occurred_at,
                    queue=last.queue,
                    priority=waiting.priority,
                    position=place,
                )
            )
    return out


async def route(kefu: Any, table: Any, sticky: bool, event: Any, command: RoutingCommand) -> None:
    """Decide for the command's queue, append the decision, tell the conversations,
    then store the queue's new state. A Kafka hiccup is waited out (each send once);
    what still fails is dead-lettered, with the reason, for ``kefu deadletter redrive``."""
    try:
        stored = table.get(command.queue)
        state = Queue.from_json(stored) if stored else Queue()
        events = decide_queue(state, command, sticky)
        if not events:
            return
        after = state
        for appended in events:
            after = evolve_queue(after, appended)
        # The decision's queue events as one record (a ``Commit``): atomic on the log.
        sends: list[tuple[Any, str, Any]] = [
            (kefu.queue_events_out, command.queue, CODEC.commit(events, command.queue))
        ]
        sends += [
            (kefu.commands_out, told.conversation_id, told)
            for told in conversation_commands(state, after, events)
        ]
        await send_in_order(sends, f"router {position(event.message)}")
        table[command.queue] = after.to_json()
    except RoutingRejected as exc:
        await send_dead_letter(kefu.deadletter, event.message, str(exc), "router")
    except Exception as exc:  # one bad record must not stop the queue's partition
        log.exception("router failed at %s", position(event.message))
        await send_dead_letter(kefu.deadletter, event.message, repr(exc), "router")


def install(kefu: KefuApp, sticky: bool = True) -> Any:
    async def router(stream: Any) -> None:
        async for event, command in records(stream, RoutingCommand, kefu.deadletter, "router"):
            await route(kefu, kefu.queues, sticky, event, command)

    return kefu.app.agent(kefu.routing_in, name="kefu.router")(router)
