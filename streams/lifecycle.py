"""A conversation as a pure fold over its events, and the decisions that extend it.

``decide(state, command, policy)`` returns the events a command causes (none for a
command already applied); ``evolve(state, event)`` folds one event into the state.
Both are pure: the conversation agent owns the I/O, so replaying the log through
``evolve`` rebuilds exactly the state the agent held.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.records import (
    AddNote,
    AssignConversation,
    Attachment,
    CloseConversation,
    Command,
    ConversationAssigned,
    ConversationClosed,
    ConversationHandedOff,
    ConversationQueued,
    ConversationRouted,
    CsatRated,
    CsatRequested,
    CustomerErased,
    EraseCustomer,
    Event,
    FlagSlaBreach,
    HandOff,
    MessageDelivered,
    MessageModerated,
    MessageReceived,
    NoteAdded,
    QueueConversation,
    RateConversation,
    ReceiveMessage,
    RecordDelivery,
    RecordReply,
    ReplyProduced,
    ReplyRequested,
    SlaBreached,
    event_id_for,
)
from streams.moderation import (
    ACTION_ORDER,
    Moderates,
    SenderEntry,
    Verdict,
    remember,
    sender_entry,
)
from streams.responders import Answer, reply_command
from streams.routing import Route

log = logging.getLogger(__name__)

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
    priority: str = "normal"
    # Dialogue state: who the conversation waits for (reply = the AI or an agent owes
    # the customer an answer; customer; rating after close; "" = nothing).
    waiting_for: str = ""
    ai_failures: int = 0  # consecutive AI turns that did not answer
    last_activity_at: int = 0
    unanswered_since: int = 0  # first customer message not yet answered (SLA clock)
    breached_since: int = 0  # the unanswered_since an SLA breach was flagged for
    rating: int = 0
    last_agent: str = ""  # the human who last had it, for CSAT attribution
    # The customer's last inbound messages (time, fingerprint, links) for moderation's
    # spam signals: a conversation is one customer on one channel, so this is per sender.
    recent: tuple[SenderEntry, ...] = ()

    def to_json(self) -> dict[str, Any]:
        # Shallow on purpose: every field is a str, an int or a tuple of them, which
        # JSON writes as is; ``dataclasses.asdict`` deep-copies and was the agent's
        # single largest cost per command.
        return {name: getattr(self, name) for name in _CONVERSATION_FIELDS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Conversation:
        data = dict(data)
        data["awaiting_reply"] = tuple(data.get("awaiting_reply", ()))
        data["applied"] = tuple(data.get("applied", ()))
        data["undelivered"] = tuple(data.get("undelivered", ()))
        data["recent"] = tuple(tuple(entry) for entry in data.get("recent", ()))
        return cls(**data)


_CONVERSATION_FIELDS = tuple(f.name for f in dataclasses.fields(Conversation))


_SET = object.__setattr__


def _replace(state: Conversation, base: dict[str, Any], **changes: Any) -> Conversation:
    """``dataclasses.replace`` for the state, cut down: one new object with each field
    set once, no introspection and no keyword ``__init__`` (3 µs, not 15 for the two
    replaces ``evolve`` made per event: 10 % of the worker's CPU, py-spy, issue 16)."""
    changes.update(base)
    new = object.__new__(Conversation)
    for name in _CONVERSATION_FIELDS:
        _SET(new, name, changes[name] if name in changes else getattr(state, name))
    return new


def fold(events: Iterable[Event], state: Conversation | None = None) -> Conversation:
    for event in events:
        state = evolve(state or Conversation(), event)
    return state or Conversation()


def evolve(state: Conversation, event: Event) -> Conversation:
    base = {
        "conversation_id": event.conversation_id,
        "tenant_id": event.tenant_id,
        "seq": event.seq,
    }
    match event:
        case MessageReceived():
            reopened = state.status != "open"
            return _replace(
                state,
                base,
                status="open",
                channel=event.channel,
                customer_id=event.customer_id,
                messages=state.messages + 1,
                applied=_remember(state.applied, event.command_id),
                waiting_for="reply",
                last_activity_at=event.occurred_at,
                unanswered_since=state.unanswered_since or event.occurred_at,
                ai_failures=0 if reopened else state.ai_failures,
                rating=0 if reopened else state.rating,
                recent=remember(state.recent, sender_entry(event.text, event.occurred_at)),
            )
        case ConversationRouted():
            return _replace(
                state, base, assignee=event.assignee, queue=event.queue, priority=event.priority
            )
        case ConversationAssigned():
            return _replace(
                state, base, assignee=event.assignee, queue=event.queue, last_agent=event.assignee
            )
        case ConversationHandedOff():
            return _replace(
                state,
                base,
                assignee=event.to_assignee,
                queue=event.queue,
                priority=event.priority,
                ai_failures=0,
                awaiting_reply=() if event.to_assignee != "ai" else state.awaiting_reply,
            )
        case SlaBreached():
            return _replace(state, base, breached_since=state.unanswered_since)
        case CsatRequested():
            return _replace(state, base, waiting_for="rating")
        case CsatRated():
            return _replace(state, base, waiting_for="", rating=event.rating)
        case ReplyRequested():
            return _replace(state, base, awaiting_reply=(*state.awaiting_reply, event.event_id))
        case ReplyProduced():
            failed = event.author == "ai" and event.action != "answer"
            return _replace(
                state,
                base,
                replies=state.replies + 1,
                awaiting_reply=tuple(r for r in state.awaiting_reply if r != event.in_reply_to),
                undelivered=(*state.undelivered, event.event_id),
                waiting_for="customer",
                last_activity_at=event.occurred_at,
                unanswered_since=0,
                ai_failures=state.ai_failures + 1 if failed else 0,
                applied=state.applied
                if event.author == "ai"
                else _remember(state.applied, event.in_reply_to),
            )
        case MessageDelivered():
            return _replace(
                state,
                base,
                undelivered=tuple(r for r in state.undelivered if r != event.reply_event_id),
            )
        case CustomerErased():
            # The customer's words are gone: so are moderation's fingerprints of them.
            return _replace(
                state, base, recent=(), applied=_remember(state.applied, event.command_id)
            )
        case NoteAdded():
            # For the team only: no activity with the customer (idle and SLA clocks
            # stay as they were); the command id is remembered so a resend is dropped.
            return _replace(state, base, applied=_remember(state.applied, event.command_id))
        case ConversationClosed():
            return _replace(
                state,
                base,
                status="closed",
                assignee="",
                awaiting_reply=(),
                waiting_for="",
                unanswered_since=0,
            )
        case _:
            return _replace(state, base)


def _remember(applied: tuple[str, ...], command_id: str) -> tuple[str, ...]:
    return (*applied[-(APPLIED_WINDOW - 1) :], command_id)


@dataclass(frozen=True, slots=True)
class Policy:
    """What the conversation agent consults: moderation and routing, both pure."""

    moderator: Moderates
    route: Callable[[str, str, str, str], Route]  # (tenant, channel, customer, team)
    # Hand off to a human after this many consecutive AI turns without an answer.
    max_ai_failures: int = 3
    csat: bool = True  # ask for a rating when a conversation closes
    # The responder's answer when it needs no I/O (``Responder.answer_now``): given, a
    # reply request is answered in the same command, one hop and two records fewer.
    answer_now: Callable[[ReplyRequested], Answer | None] | None = None


BLOCKED_NOTICE = {
    "en": "Your message was not delivered because it breaks our community rules.",
    "zh": "您的消息因违反社区规则未被发送。",
}
_HAN = re.compile(r"[\u4e00-\u9fff]")


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
            return draft.events + _answered_at_once(draft, policy)
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
            _require_known(state)
            if state.status == "open":
                draft.add(
                    ConversationClosed,
                    reason=command.reason,
                    closed_by=command.closed_by,
                    assignee=state.assignee,
                    queue=state.queue,
                )
                if policy.csat:
                    draft.add(CsatRequested)
        case AssignConversation():
            _require_known(state)
            # Closed, handed back to the AI, or moved meanwhile: the release that
            # followed that event frees the router's slot, so this one is void.
            if state.status == "open" and state.assignee == "" and state.queue == command.queue:
                draft.add(
                    ConversationAssigned,
                    assignee=command.agent_id,
                    queue=command.queue,
                    priority=command.priority,
                )
        case QueueConversation():
            _require_known(state)
            if state.status == "open" and state.assignee == "" and state.queue == command.queue:
                draft.add(
                    ConversationQueued,
                    queue=command.queue,
                    priority=command.priority,
                    position=command.position,
                )
        case HandOff():
            _require_known(state)
            if state.status != "open":
                raise Rejected("cannot hand off a closed conversation")
            _hand_off(
                draft, command.to, command.team, command.reason, command.requested_by, command.agent
            )
        case RateConversation():
            _require_known(state)
            if not 1 <= command.rating <= 5:
                raise Rejected(f"rating must be 1-5, not {command.rating}")
            if state.waiting_for == "rating":
                draft.add(
                    CsatRated,
                    rating=command.rating,
                    comment=command.comment[:2000],
                    assignee=state.last_agent,
                )
        case AddNote():
            _require_known(state)
            # Any agent of the conversation's tenant (the tenant check above) may add
            # one, in any status: a note after close ("call back on Monday") is normal.
            text = command.text.strip()
            if not text or not command.author or command.author in ("ai", "system"):
                raise Rejected("a note needs text and an agent as its author")
            draft.add(
                NoteAdded, author=command.author, text=text[:8000], command_id=command.command_id
            )
        case EraseCustomer():
            _require_known(state)
            if command.customer_id != state.customer_id:
                raise Rejected("erasure of another customer than this conversation's")
            draft.add(
                CustomerErased,
                customer_id=command.customer_id,
                requested_by=command.requested_by[:200],
                reason=command.reason[:200],
                command_id=command.command_id,
                key_ids=list(command.key_ids),
            )
        case FlagSlaBreach():
            if state.unanswered_since and state.breached_since != state.unanswered_since:
                draft.add(
                    SlaBreached,
                    kind=command.kind,
                    due_at=command.due_at,
                    assignee=state.assignee,
                    priority=state.priority,
                )
    return draft.events


def _require_known(state: Conversation) -> None:
    if state.status == "new":
        raise Rejected("unknown conversation")


def _hand_off(
    draft: _Draft, to: str, team: str, reason: str, requested_by: str, agent: str = ""
) -> None:
    state = draft.state
    if to not in ("human", "ai"):
        raise Rejected(f"hand off to 'human' or 'ai', not {to!r}")
    queue = f"{state.tenant_id}:{team}" if team else state.queue
    to_assignee = "ai" if to == "ai" else ""
    if state.assignee == to_assignee and queue == state.queue and not agent:
        return  # already there
    if agent and (to != "human" or agent == state.assignee):
        raise Rejected(f"cannot transfer to agent {agent!r} from {state.assignee!r}")
    draft.add(
        ConversationHandedOff,
        from_assignee=state.assignee,
        to_assignee=to_assignee,
        queue=queue,
        from_queue=state.queue,
        priority=state.priority,
        reason=reason,
        requested_by=requested_by,
        preferred_agent=agent,
    )


class _Draft:
    """Numbers the events of one command: ids from the command, seqs from the state."""

    def __init__(self, state: Conversation, command: Command) -> None:
        self.state = state
        self.command = command
        self.events: list[Event] = []

    def add(self, cls: type[Event], **fields: Any) -> Event:
        index = len(self.events)
        event = cls(
            event_id=event_id_for(self.command.command_id, index, self.command.conversation_id),
            conversation_id=self.command.conversation_id,
            tenant_id=self.command.tenant_id,
            seq=self.state.seq + index + 1,
            occurred_at=self.command.issued_at,
            **fields,
        )
        self.events.append(event)
        return event


def _moderated(
    draft: _Draft,
    message_event_id: str,
    direction: str,
    text: str,
    policy: Policy,
    attachments: tuple[Attachment, ...] = (),
) -> Verdict:
    if direction == "in":  # the customer's own recent messages feed the spam signals
        verdict = policy.moderator.check(
            text, draft.command.tenant_id, recent=draft.state.recent, now=draft.command.issued_at
        )
    else:
        verdict = policy.moderator.check(text, draft.command.tenant_id)
    if attachments:
        verdict, attachments = _with_file_names(verdict, attachments, draft, policy)
    draft.add(
        MessageModerated,
        message_event_id=message_event_id,
        direction=direction,
        verdict=verdict.action,
        text=verdict.text,
        categories=list(verdict.categories),
        list_version=verdict.list_version,
        attachments=() if verdict.action == "block" else attachments,
    )
    return verdict


def _with_file_names(
    verdict: Verdict, attachments: tuple[Attachment, ...], draft: _Draft, policy: Policy
) -> tuple[Verdict, tuple[Attachment, ...]]:
    """File names are the customer's words too (a caption-less photo named with an
    insult is still an insult): moderated apart from the caption, so the listed text
    stays the caption; the stronger action wins and masked names are shown masked."""
    names = policy.moderator.check("\n".join(a.name for a in attachments), draft.command.tenant_id)
    if names.action == "pass":
        return verdict, attachments
    masked = names.text.split("\n")
    if len(masked) == len(attachments):  # names carry no newline (connectors.attachments)
        attachments = tuple(
            dataclasses.replace(a, name=name) for a, name in zip(attachments, masked, strict=True)
        )
    stronger = max(verdict.action, names.action, key=ACTION_ORDER.index)
    categories = tuple(dict.fromkeys((*verdict.categories, *names.categories)))
    return verdict._replace(action=stronger, categories=categories), attachments


def _receive(draft: _Draft, command: ReceiveMessage, policy: Policy) -> None:
    received = draft.add(
        MessageReceived,
        channel=command.channel,
        customer_id=command.customer_id,
        text=command.text,
        channel_message_id=command.channel_message_id,
        command_id=command.command_id,
        language=command.language,
        attachments=command.attachments,
    )
    # File names are the customer's words too: moderated with the caption.
    verdict = _moderated(draft, received.event_id, "in", command.text, policy, command.attachments)
    if verdict.action == "block":
        # Not passed on; the sender is told, through their own channel, like a reply.
        draft.add(
            ReplyProduced,
            in_reply_to=received.event_id,
            channel=command.channel,
            text=BLOCKED_NOTICE["zh" if _HAN.search(command.text) else "en"],
            author="system",
            responder="moderation",
            confidence=1.0,
            customer_id=command.customer_id,
        )
        return
    assignee = draft.state.assignee
    if draft.state.status != "open" or (not assignee and not draft.state.queue):
        route = policy.route(command.tenant_id, command.channel, command.customer_id, command.team)
        # Flagged content (a complaint, abuse) goes ahead of normal conversations.
        priority = (
            "high" if verdict.action == "flag" and route.priority == "normal" else route.priority
        )
        draft.add(
            ConversationRouted,
            assignee=route.assignee,
            queue=route.queue,
            priority=priority,
            reason=route.reason,
        )
        assignee = route.assignee
    if assignee == "ai":
        draft.add(
            ReplyRequested,
            message_event_id=received.event_id,
            channel=command.channel,
            text=_for_the_responder(verdict.text, draft),
            language=command.language,
        )


def _for_the_responder(text: str, draft: _Draft) -> str:
    """The responder reads text only: it is told a file came (kind and moderated name),
    so a photo without a caption is not an empty question."""
    moderated = next((e for e in reversed(draft.events) if isinstance(e, MessageModerated)), None)
    if moderated is None or not moderated.attachments:
        return text
    sent = [f"[{a.kind}: {a.name}]" for a in moderated.attachments]
    return "\n".join([text, *sent]) if text else "\n".join(sent)


def _answered_at_once(draft: _Draft, policy: Policy) -> list[Event]:
    """The events of the reply the responder would send back for the request just
    made, decided now when its answer needs no I/O: the same events (ids from the same
    reply command, seqs following on) as its ``RecordReply`` would give a hop later.
    The request is marked ``answered_inline`` so the responder skips it."""
    request = draft.events[-1] if draft.events else None
    if policy.answer_now is None or not isinstance(request, ReplyRequested):
        return []
    try:
        answer = policy.answer_now(request)
    except Exception:  # the customer's message still counts: the responder answers
        log.exception("inline answer failed for %s", request.conversation_id)
        return []
    if answer is None:
        return []
    draft.events[-1] = request = dataclasses.replace(request, answered_inline=True)
    reply = reply_command(request, answer, draft.command.issued_at, latency_ms=0)
    return decide(fold(draft.events, draft.state), reply, policy)


def _reply(draft: _Draft, command: RecordReply, policy: Policy) -> None:
    state = draft.state
    if command.author == "ai" and command.in_reply_to not in state.awaiting_reply:
        return  # the conversation moved on (closed, or handed to a human) meanwhile
    if command.author != "ai" and command.author != state.assignee:
        raise Rejected(f"agent {command.author!r} is not assigned to this conversation")
    verdict = _moderated(draft, command.in_reply_to, "out", command.text, policy)
    if verdict.action == "block":
        if command.author == "ai":  # the customer still deserves an answer: a human's
            _hand_off(draft, "human", "", "AI reply blocked by moderation", "system")
        return
    draft.add(
        ReplyProduced,
        # A human reply answers no request: its own command id makes it idempotent.
        in_reply_to=command.in_reply_to if command.author == "ai" else command.command_id,
        channel=state.channel,
        text=verdict.text,
        author=command.author,
        responder=command.responder,
        confidence=command.confidence,
        intent=command.intent,
        customer_id=state.customer_id,
        # The reply text is produced for every action, "handoff" included ("I'll get
        # a colleague"), so the customer always hears back.
        action=command.action,
        model=command.model,
        cache_hit=command.cache_hit,
        prompt_tokens=command.prompt_tokens,
        completion_tokens=command.completion_tokens,
        cost=command.cost,
        latency_ms=command.latency_ms,
        attachments=command.attachments,
    )
    if command.author == "ai":
        failures = state.ai_failures + (command.action != "answer")
        if command.action == "handoff":
            _hand_off(draft, "human", "", f"responder: {command.intent or 'low confidence'}", "ai")
        elif failures >= policy.max_ai_failures:
            _hand_off(draft, "human", "", f"{failures} AI turns without an answer", "system")


def replay(events: Sequence[Event]) -> Conversation:
    """The state after the given events, as the conversation agent would hold it."""
    return fold(events)
