"""The conversation side of routing: queue, assignment, handoff, close, CSAT, SLA."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from schemas.records import (
    AssignConversation,
    CloseConversation,
    Command,
    ConversationAssigned,
    ConversationHandedOff,
    ConversationRouted,
    CsatRated,
    Event,
    FlagSlaBreach,
    HandOff,
    RateConversation,
    RecordReply,
    ReplyProduced,
    ReplyRequested,
)
from streams.lifecycle import Conversation, Rejected, decide, evolve
from tests.test_lifecycle import POLICY, receive

_ids = itertools.count()
ENVELOPE: dict[str, Any] = {"conversation_id": "conv-1", "issued_at": 9000}


def command(cls: type[Command], tenant: str = "t1", **fields: Any) -> Any:
    return cls(command_id=f"cmd-{next(_ids)}", tenant_id=tenant, **ENVELOPE, **fields)


def step(state: Conversation, cmd: Command) -> tuple[Conversation, list[Event]]:
    events = decide(state, cmd, POLICY)
    for event in events:
        state = evolve(state, event)
    return state, events


def ai_reply(state: Conversation, action: str = "answer", intent: str | None = "x") -> RecordReply:
    reply: RecordReply = command(
        RecordReply,
        in_reply_to=state.awaiting_reply[0],
        text="…",
        author="ai",
        responder="offline-faq",
        confidence=0.5,
        intent=intent,
        action=action,
    )
    return reply


def test_tenant_without_ai_waits_for_a_human_who_answers() -> None:
    state, events = step(Conversation(), receive(1, tenant="humans-only"))
    routed = next(e for e in events if isinstance(e, ConversationRouted))
    assert routed.assignee == "" and state.queue == "humans-only:default"
    state, _ = step(state, receive(2, tenant="humans-only"))  # still waiting: not re-routed
    state, events = step(
        state,
        command(
            AssignConversation,
            tenant="humans-only",
            agent_id="agent-7",
            queue="humans-only:default",
            priority="normal",
        ),
    )
    assert [type(e) for e in events] == [ConversationAssigned]
    assert state.assignee == "agent-7" and state.waiting_for == "reply"
    reply = command(
        RecordReply,
        tenant="humans-only",
        in_reply_to="",
        text="Hello, I'm Ana",
        author="agent-7",
        responder="agent",
        confidence=1.0,
    )
    state, events = step(state, reply)
    assert isinstance(events[-1], ReplyProduced) and state.waiting_for == "customer"
    with pytest.raises(Rejected, match="not assigned"):
        decide(
            state,
            command(
                RecordReply,
                tenant="humans-only",
                **{
                    "in_reply_to": "",
                    "text": "me too",
                    "author": "agent-8",
                    "responder": "agent",
                    "confidence": 1.0,
                },
            ),
            POLICY,
        )
    state, _ = step(
        state, command(CloseConversation, tenant="humans-only", reason="done", closed_by="agent-7")
    )
    state, events = step(state, command(RateConversation, tenant="humans-only", rating=5))
    assert isinstance(events[0], CsatRated) and events[0].assignee == "agent-7"
    assert state.rating == 5 and state.waiting_for == ""


def test_responder_handoff_moves_the_conversation_to_a_human_queue() -> None:
    state, _ = step(Conversation(), receive(1))
    state, events = step(state, ai_reply(state, action="handoff", intent="human_agent"))
    assert [type(e) for e in events][-1] is ConversationHandedOff
    handoff = events[-1]
    assert isinstance(handoff, ConversationHandedOff)
    assert (handoff.from_assignee, handoff.to_assignee) == ("ai", "")
    assert state.assignee == "" and state.queue == "t1:default"
    state, events = step(state, receive(2))  # waiting for a human: no AI reply requested
    assert not any(isinstance(e, ReplyRequested) for e in events)


def test_handoff_after_repeated_failed_ai_turns() -> None:
    state, _ = step(Conversation(), receive(1))
    for n in range(2, 5):
        state, events = step(state, ai_reply(state, action="clarify", intent=None))
        if n < 4:
            state, _ = step(state, receive(n))
    assert isinstance(events[-1], ConversationHandedOff)
    assert "3 AI turns" in events[-1].reason


def test_agent_hands_back_to_ai_and_transfers_between_teams() -> None:
    state, _ = step(Conversation(), receive(1, tenant="humans-only"))
    state, _ = step(
        state,
        command(
            AssignConversation,
            tenant="humans-only",
            agent_id="a1",
            queue="humans-only:default",
            priority="normal",
        ),
    )
    state, events = step(
        state,
        command(
            HandOff,
            tenant="humans-only",
            to="human",
            team="billing",
            reason="billing question",
            requested_by="a1",
        ),
    )
    moved = events[0]
    assert isinstance(moved, ConversationHandedOff)
    assert (moved.from_queue, moved.queue) == ("humans-only:default", "humans-only:billing")
    state, events = step(
        state, command(HandOff, tenant="humans-only", to="ai", reason="resolved", requested_by="a1")
    )
    assert state.assignee == "ai"


def test_commands_for_unknown_conversations_are_rejected() -> None:
    for cmd in (
        command(CloseConversation, reason="x", closed_by="a"),
        command(HandOff, to="human", reason="x", requested_by="a"),
        command(RateConversation, rating=3),
        command(AssignConversation, agent_id="a", queue="t1:default", priority="normal"),
    ):
        with pytest.raises(Rejected, match="unknown conversation"):
            decide(Conversation(), cmd, POLICY)


def test_bad_rating_is_rejected() -> None:
    state, _ = step(Conversation(), receive(1))
    with pytest.raises(Rejected, match="1-5"):
        decide(state, command(RateConversation, rating=9), POLICY)


def test_sla_breach_is_flagged_once_per_unanswered_message() -> None:
    state, _ = step(Conversation(), receive(1, tenant="humans-only"))
    flag = command(
        FlagSlaBreach, tenant="humans-only", kind="first", due_at=state.unanswered_since + 60_000
    )
    state, events = step(state, flag)
    assert len(events) == 1 and state.breached_since == state.unanswered_since
    assert (
        decide(state, command(FlagSlaBreach, tenant="humans-only", kind="first", due_at=1), POLICY)
        == []
    )


def test_agent_transfers_to_a_named_colleague() -> None:
    state, _ = step(Conversation(), receive(1, tenant="humans-only"))
    state, _ = step(
        state,
        command(
            AssignConversation,
            tenant="humans-only",
            agent_id="a1",
            queue="humans-only:default",
            priority="normal",
        ),
    )
    handoff = command(
        HandOff, tenant="humans-only", to="human", reason="colleague", requested_by="a1", agent="a2"
    )
    state, events = step(state, handoff)
    moved = events[0]
    assert isinstance(moved, ConversationHandedOff)
    assert moved.preferred_agent == "a2" and moved.from_assignee == "a1"
    with pytest.raises(Rejected):
        decide(
            state,
            command(
                HandOff, tenant="humans-only", to="ai", reason="x", requested_by="a1", agent="a3"
            ),
            POLICY,
        )
