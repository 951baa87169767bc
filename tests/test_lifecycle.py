import dataclasses

import pytest

from schemas.records import (
    CloseConversation,
    ConversationClosed,
    ConversationRouted,
    CsatRequested,
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
from streams.lifecycle import Conversation, Policy, Rejected, decide, evolve, fold
from streams.moderation import Moderator, WordList
from streams.responders import OfflineResponder, reply_command
from streams.routing import TenantRouting, router
from tests.samples import PHOTO

POLICY = Policy(
    Moderator(), router(lambda tenant: TenantRouting(ai_enabled=tenant != "humans-only"))
)


def receive(n: int, text: str = "where is my order", tenant: str = "t1") -> ReceiveMessage:
    return ReceiveMessage(
        command_id=f"msg-{n}",
        conversation_id="conv-1",
        tenant_id=tenant,
        issued_at=1000 + n,
        channel="api",
        customer_id="u1",
        text=text,
        channel_message_id=f"m{n}",
    )


def apply(state: Conversation, events: list) -> Conversation:  # type: ignore[type-arg]
    for event in events:
        state = evolve(state, event)
    return state


def test_first_message_is_received_moderated_routed_and_asks_for_a_reply() -> None:
    events = decide(Conversation(), receive(1), POLICY)

    assert [type(e) for e in events] == [
        MessageReceived,
        MessageModerated,
        ConversationRouted,
        ReplyRequested,
    ]
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert events[0].event_id == event_id_for("msg-1", 0, "conv-1")
    assert {e.conversation_id for e in events} == {"conv-1"}


def test_the_same_command_twice_yields_nothing_the_second_time() -> None:
    state = apply(Conversation(), decide(Conversation(), receive(1), POLICY))
    assert decide(state, receive(1), POLICY) == []


def test_event_ids_and_seqs_are_deterministic_on_retry() -> None:
    assert decide(Conversation(), receive(1), POLICY) == decide(Conversation(), receive(1), POLICY)


@pytest.mark.parametrize(
    ("tenant", "team", "queue"),
    [
        ("humans-only", "billing", "humans-only:billing"),  # the web chat's team
        ("t1", "billing", "t1:billing"),  # with the AI first: a hand-off goes there
        ("humans-only", "", "humans-only:default"),
        ("humans-only", "a:b", "humans-only:default"),  # never a malformed queue
    ],
)
def test_a_message_naming_a_team_starts_its_conversation_in_that_teams_queue(
    tenant: str, team: str, queue: str
) -> None:
    message = dataclasses.replace(receive(1, tenant=tenant), team=team)
    routed = next(
        e for e in decide(Conversation(), message, POLICY) if e.type == "ConversationRouted"
    )
    assert routed.queue == queue  # type: ignore[attr-defined]
    state = apply(Conversation(), decide(Conversation(), message, POLICY))
    later = dataclasses.replace(receive(2, tenant=tenant), team="other")
    assert not any(e.type == "ConversationRouted" for e in decide(state, later, POLICY))


def test_second_message_is_not_routed_again() -> None:
    state = apply(Conversation(), decide(Conversation(), receive(1), POLICY))
    events = decide(state, receive(2), POLICY)
    assert [type(e) for e in events] == [MessageReceived, MessageModerated, ReplyRequested]
    assert events[0].seq == state.seq + 1


def test_reply_is_produced_once_then_delivered_once() -> None:
    state = apply(Conversation(), decide(Conversation(), receive(1), POLICY))
    request = state.awaiting_reply[0]
    reply = RecordReply(
        command_id="r-1",
        conversation_id="conv-1",
        tenant_id="t1",
        issued_at=2000,
        in_reply_to=request,
        text="Your order ships today",
        author="ai",
        responder="offline-faq",
        confidence=1.0,
    )
    events = decide(state, reply, POLICY)
    assert [type(e) for e in events] == [MessageModerated, ReplyProduced]
    state = apply(state, events)
    assert decide(state, reply, POLICY) == []  # a redelivered reply

    produced = events[-1]
    receipt = RecordDelivery(
        command_id="d-1",
        conversation_id="conv-1",
        tenant_id="t1",
        issued_at=2100,
        reply_event_id=produced.event_id,
        channel="api",
        status="delivered",
        attempts=1,
    )
    delivered = decide(state, receipt, POLICY)
    assert [type(e) for e in delivered] == [MessageDelivered]
    state = apply(state, delivered)
    assert decide(state, receipt, POLICY) == []


def test_an_answer_that_needs_no_io_is_given_in_the_same_command() -> None:
    faq = OfflineResponder()
    inline = dataclasses.replace(POLICY, answer_now=faq.answer_now)
    events = decide(Conversation(), receive(1), inline)

    assert [type(e) for e in events] == [
        MessageReceived,
        MessageModerated,
        ConversationRouted,
        ReplyRequested,
        MessageModerated,
        ReplyProduced,
    ]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    request, produced = events[3], events[5]
    assert isinstance(request, ReplyRequested) and request.answered_inline
    assert isinstance(produced, ReplyProduced)
    assert produced.in_reply_to == request.event_id and produced.responder == "offline-faq"
    # The very events the responder's reply command would have caused a hop later
    # (the same ids: a copy of that command sent anyway changes nothing).
    requested = apply(Conversation(), events[:4])
    answer = faq.answer_text(request.text, request.language)
    later = decide(requested, reply_command(request, answer, 1001, latency_ms=0), POLICY)
    assert later == events[4:]
    state = apply(Conversation(), events)
    assert state.awaiting_reply == () and state.replies == 1
    assert decide(state, reply_command(request, answer, 5000, latency_ms=3), inline) == []
    assert decide(state, receive(1), inline) == []  # a redelivered message
    assert decide(Conversation(), receive(1), inline) == events  # deterministic


def test_an_answer_that_needs_io_is_left_to_the_responder() -> None:
    inline = dataclasses.replace(POLICY, answer_now=lambda request: None)
    events = decide(Conversation(), receive(1), inline)
    assert events == decide(Conversation(), receive(1), POLICY)
    request = events[-1]
    assert isinstance(request, ReplyRequested) and not request.answered_inline


def test_a_failing_inline_answer_leaves_the_request_to_the_responder() -> None:
    def broken(request: ReplyRequested) -> None:
        raise RuntimeError("a bug in the FAQ lookup")

    events = decide(Conversation(), receive(1), dataclasses.replace(POLICY, answer_now=broken))
    assert events == decide(Conversation(), receive(1), POLICY)  # the message still counts


def test_an_inline_handoff_answer_moves_the_conversation_to_a_human() -> None:
    faq = OfflineResponder()
    inline = dataclasses.replace(POLICY, answer_now=faq.answer_now)
    events = decide(Conversation(), receive(1, "I want to talk to a human agent"), inline)
    produced = events[-2]
    assert isinstance(produced, ReplyProduced) and produced.action == "handoff"
    assert type(events[-1]).__name__ == "ConversationHandedOff"
    assert apply(Conversation(), events).assignee == ""


def test_masking_replaces_the_text_passed_on() -> None:
    events = decide(Conversation(), receive(1, "you idiot, where is my order"), POLICY)
    moderated = events[1]
    assert isinstance(moderated, MessageModerated)
    assert moderated.verdict == "mask" and moderated.categories == ["abuse"]
    request = events[-1]
    assert isinstance(request, ReplyRequested)
    assert request.text == "you *****, where is my order"


def test_blocked_message_is_not_passed_on_and_the_sender_is_told() -> None:
    blocking = Policy(Moderator(WordList({"spam": ("casino",)}, {"spam": "block"})), POLICY.route)
    events = decide(Conversation(), receive(1, "best CASINO bonus"), blocking)
    assert [type(e) for e in events] == [MessageReceived, MessageModerated, ReplyProduced]
    notice = events[-1]
    assert isinstance(notice, ReplyProduced)
    assert notice.author == "system" and "not delivered" in notice.text


def test_blocked_ai_reply_hands_off_to_a_human() -> None:
    blocking = Policy(Moderator(WordList({"spam": ("casino",)}, {"spam": "block"})), POLICY.route)
    state = apply(Conversation(), decide(Conversation(), receive(1), blocking))
    reply = RecordReply(
        command_id="r-1",
        conversation_id="conv-1",
        tenant_id="t1",
        issued_at=2000,
        in_reply_to=state.awaiting_reply[0],
        text="visit our casino",
        author="ai",
        responder="llm",
        confidence=1.0,
    )
    events = decide(state, reply, blocking)
    assert [type(e).__name__ for e in events] == ["MessageModerated", "ConversationHandedOff"]


def test_tenant_without_ai_is_routed_to_its_queue_and_gets_no_ai_reply() -> None:
    events = decide(Conversation(), receive(1, tenant="humans-only"), POLICY)
    routed = events[2]
    assert isinstance(routed, ConversationRouted)
    assert routed.assignee == "" and routed.queue == "humans-only:default"
    assert not any(isinstance(e, ReplyRequested) for e in events)


def test_another_tenants_command_is_rejected() -> None:
    state = apply(Conversation(), decide(Conversation(), receive(1), POLICY))
    with pytest.raises(Rejected):
        decide(state, receive(2, tenant="intruder"), POLICY)


def test_close_once() -> None:
    state = apply(Conversation(), decide(Conversation(), receive(1), POLICY))
    close = CloseConversation(
        command_id="x-1",
        conversation_id="conv-1",
        tenant_id="t1",
        issued_at=3000,
        reason="resolved",
        closed_by="u1",
    )
    events = decide(state, close, POLICY)
    assert [type(e) for e in events] == [ConversationClosed, CsatRequested]
    state = apply(state, events)
    assert state.status == "closed" and state.awaiting_reply == ()
    assert state.waiting_for == "rating"
    assert decide(state, dataclasses.replace(close, command_id="x-2"), POLICY) == []


def test_state_is_a_fold_of_the_events_and_survives_json() -> None:
    log = []
    state = Conversation()
    for n in range(1, 4):
        events = decide(state, receive(n), POLICY)
        log.extend(events)
        state = apply(state, events)
    assert fold(log) == state
    assert Conversation.from_json(state.to_json()) == state


def _with(command: ReceiveMessage, *names: str) -> ReceiveMessage:
    files = tuple(dataclasses.replace(PHOTO, name=name) for name in names)
    return dataclasses.replace(command, attachments=files)


def test_a_photo_without_a_caption_is_a_message_the_responder_is_told_of() -> None:
    events = decide(Conversation(), _with(receive(1, ""), "破损.jpg"), POLICY)
    received, moderated, *_, request = events
    assert isinstance(received, MessageReceived) and received.attachments[0].name == "破损.jpg"
    assert isinstance(moderated, MessageModerated) and moderated.verdict == "pass"
    assert moderated.attachments == received.attachments  # what the read models list
    assert isinstance(request, ReplyRequested) and request.text == "[image: 破损.jpg]"


def test_file_names_are_moderated_apart_from_the_caption() -> None:
    events = decide(Conversation(), _with(receive(1, "see photo"), "idiot.jpg", "ok.jpg"), POLICY)
    moderated = events[1]
    assert isinstance(moderated, MessageModerated)
    assert moderated.verdict == "mask" and moderated.text == "see photo"  # caption unchanged
    assert [a.name for a in moderated.attachments] == ["*****.jpg", "ok.jpg"]
    blocking = Policy(Moderator(WordList({"spam": ("casino",)}, {"spam": "block"})), POLICY.route)
    events = decide(Conversation(), _with(receive(1, "hello"), "casino-bonus.png"), blocking)
    assert [type(e) for e in events] == [MessageReceived, MessageModerated, ReplyProduced]
    blocked = events[1]
    assert isinstance(blocked, MessageModerated)
    assert blocked.verdict == "block" and blocked.attachments == ()  # never shown


def test_an_agents_reply_carries_its_attachments() -> None:
    humans = Policy(Moderator(), router(lambda tenant: TenantRouting(ai_enabled=False)))
    state = apply(Conversation(), decide(Conversation(), receive(1), humans))
    state = dataclasses.replace(state, assignee="alice")
    reply = RecordReply(
        command_id="r-1",
        conversation_id="conv-1",
        tenant_id="t1",
        issued_at=2000,
        in_reply_to="",
        text="",
        author="alice",
        responder="console",
        confidence=1.0,
        attachments=(PHOTO,),
    )
    produced = [e for e in decide(state, reply, humans) if isinstance(e, ReplyProduced)]
    assert produced and produced[0].attachments == (PHOTO,)
