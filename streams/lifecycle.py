"""A conversation as a pure fold over its events, and the decisions that extend it.

``decide(state, command, policy)`` returns the events a command causes (none for a
command already applied); ``evolve(state, event)`` folds one event into the state.
Both are pure: the conversation agent owns the I/O, so replaying the log through
``evolve`` rebuilds exactly the state the agent held.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.records import (
    CloseConversation,
    Command,
    ConversationClosed,
    ConversationRouted,
    Event,
    MessageDelivered,
    MessageModerated,
    MessageReceived,
    ReceiveMessage,
    RecordDelivery,
    RecordReply,
    ReplyProduced,
    ReplyRequested,
    event_id_for,
)
from streams.moderation import Moderator, Verdict
from streams.routing import Route

# How many recent command ids a conversation remembers to drop redeliveries. A
# redelivery arrives within one rebalance of the original, far fewer commands back.
APPLIED_WINDOW = 256


@dataclass(frozen=True, slots=True)
class Conversation:
    conversation_id: str = ""
    tenant_id: str = ""
    seq: int = 0
    status: str = "new"  # new | open | closed
    channel: str = ""
    customer_id: str = ""
    assignee: str = ""  # "" until routed; "ai" or an agent id
    queue: str = ""
    messages: int = 0
    replies: int = 0
    awaiting_reply: tuple[str, ...] = ()  # ReplyRequested ids not yet answered
    undelivered: tuple[str, ...] = ()  # ReplyProduced ids without a delivery outcome
    applied: tuple[str, ...] = ()  # recent command ids, oldest first

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Conversation:
        data = dict(data)
        data["awaiting_reply"] = tuple(data.get("awaiting_reply", ()))
        data["applied"] = tuple(data.get("applied", ()))
        data["undelivered"] = tuple(data.get("undelivered", ()))
        return cls(**data)


def fold(events: Iterable[Event], state: Conversation | None = None) -> Conversation:
    for event in events:
        state = evolve(state or Conversation(), event)
    return state or Conversation()


def evolve(state: Conversation, event: Event) -> Conversation:
    base = dataclasses.replace(
        state,
        conversation_id=event.conversation_id,
        tenant_id=event.tenant_id,
        seq=event.seq,
    )
    match event:
        case MessageReceived():
            return dataclasses.replace(
                base,
                status="open",
                channel=event.channel,
                customer_id=event.customer_id,
                messages=state.messages + 1,
                applied=_remember(state.applied, event.command_id),
            )
        case ConversationRouted():
            return dataclasses.replace(base, assignee=event.assignee, queue=event.queue)
        case ReplyRequested():
            return dataclasses.replace(base, awaiting_reply=(*state.awaiting_reply, event.event_id))
        case ReplyProduced():
            return dataclasses.replace(
                base,
                replies=state.replies + 1,
                awaiting_reply=tuple(r for r in state.awaiting_reply if r != event.in_reply_to),
                undelivered=(*state.undelivered, event.event_id),
            )
        case MessageDelivered():
            return dataclasses.replace(
                base, undelivered=tuple(r for r in state.undelivered if r != event.reply_event_id)
            )
        case ConversationClosed():
            return dataclasses.replace(base, status="closed", assignee="", awaiting_reply=())
        case _:
            return base


def _remember(applied: tuple[str, ...], command_id: str) -> tuple[str, ...]:
    return (*applied[-(APPLIED_WINDOW - 1) :], command_id)


@dataclass(frozen=True, slots=True)
class Policy:
    """What the conversation agent consults: moderation and routing, both pure."""

    moderator: Moderator
    route: Callable[[str, str], Route]  # (tenant, channel) -> Route


class Rejected(ValueError):
    """A command this conversation must never apply (it goes to the dead-letter topic)."""


def decide(state: Conversation, command: Command, policy: Policy) -> list[Event]:
    """The events ``command`` causes. Each command type is idempotent in the domain:
    a message by its id, a reply by the request it answers, a receipt by the reply it
    reports on, a close by the status."""
    if state.tenant_id and command.tenant_id != state.tenant_id:
        # Conversation ids are global: one tenant must not write into another's.
        raise Rejected(f"command of tenant {command.tenant_id!r} for another tenant's conversation")
    if command.command_id in state.applied:
        return []
    draft = _Draft(state, command)
    match command:
        case ReceiveMessage():
            _receive(draft, command, policy)
        case RecordReply():
            _reply(draft, command, policy)
        case RecordDelivery():
            if command.reply_event_id not in state.undelivered:
                return []  # a redelivered receipt: the outcome is already on the log
            draft.add(
                MessageDelivered,
                reply_event_id=command.reply_event_id,
                channel=command.channel,
                status=command.status,
                attempts=command.attempts,
                detail=command.detail,
            )
        case CloseConversation():
            if state.status == "open":
                draft.add(ConversationClosed, reason=command.reason, closed_by=command.closed_by)
    return draft.events


class _Draft:
    """Numbers the events of one command: ids from the command, seqs from the state."""

    def __init__(self, state: Conversation, command: Command) -> None:
        self.state = state
        self.command = command
        self.events: list[Event] = []

    def add(self, cls: type[Event], **fields: Any) -> Event:
        index = len(self.events)
        event = cls(
            event_id=event_id_for(self.command.command_id, index),
            conversation_id=self.command.conversation_id,
            tenant_id=self.command.tenant_id,
            seq=self.state.seq + index + 1,
            occurred_at=self.command.issued_at,
            **fields,
        )
        self.events.append(event)
        return event


def _moderated(
    draft: _Draft, message_event_id: str, direction: str, text: str, policy: Policy
) -> Verdict:
    verdict = policy.moderator.check(text, draft.command.tenant_id)
    draft.add(
        MessageModerated,
        message_event_id=message_event_id,
        direction=direction,
        verdict=verdict.action,
        text=verdict.text,
        categories=list(verdict.categories),
        list_version=verdict.list_version,
    )
    return verdict


def _receive(draft: _Draft, command: ReceiveMessage, policy: Policy) -> None:
    received = draft.add(
        MessageReceived,
        channel=command.channel,
        customer_id=command.customer_id,
        text=command.text,
        channel_message_id=command.channel_message_id,
        command_id=command.command_id,
        language=command.language,
    )
    verdict = _moderated(draft, received.event_id, "in", command.text, policy)
    if verdict.action == "block":
        return
    assignee = draft.state.assignee
    if draft.state.status != "open" or not assignee:
        route = policy.route(command.tenant_id, command.channel)
        draft.add(
            ConversationRouted,
            assignee=route.assignee,
            queue=route.queue,
            priority=route.priority,
            reason=route.reason,
        )
        assignee = route.assignee
    if assignee == "ai":
        draft.add(
            ReplyRequested,
            message_event_id=received.event_id,
            channel=command.channel,
            text=verdict.text,
            language=command.language,
        )


def _reply(draft: _Draft, command: RecordReply, policy: Policy) -> None:
    state = draft.state
    if command.author == "ai" and command.in_reply_to not in state.awaiting_reply:
        return  # the conversation moved on (closed, or handed to a human) meanwhile
    verdict = _moderated(draft, command.in_reply_to, "out", command.text, policy)
    if verdict.action == "block":
        return
    draft.add(
        ReplyProduced,
        in_reply_to=command.in_reply_to,
        channel=state.channel,
        text=verdict.text,
        author=command.author,
        responder=command.responder,
        confidence=command.confidence,
        intent=command.intent,
        customer_id=state.customer_id,
    )


def replay(events: Sequence[Event]) -> Conversation:
    """The state after the given events, as the conversation agent would hold it."""
    return fold(events)
