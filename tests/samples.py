"""One valid instance of every record type, for round trips and fixtures."""

from __future__ import annotations

from typing import Any

from schemas.records import (
    CloseConversation,
    ConversationClosed,
    ConversationRouted,
    DeadLetter,
    MessageDelivered,
    MessageModerated,
    MessageReceived,
    ReceiveMessage,
    Record,
    RecordDelivery,
    RecordReply,
    ReplyProduced,
    ReplyRequested,
)

CMD: dict[str, Any] = {
    "command_id": "c-1",
    "conversation_id": "conv-1",
    "tenant_id": "t1",
    "issued_at": 1_700_000_000_000,
}
EVT: dict[str, Any] = {
    "event_id": "e-1",
    "conversation_id": "conv-1",
    "tenant_id": "t1",
    "seq": 3,
    "occurred_at": 1_700_000_000_123,
}

SAMPLES: list[Record] = [
    ReceiveMessage(**CMD, channel="api", customer_id="u1", text="你好 hi", channel_message_id="m1"),
    RecordReply(
        **CMD,
        in_reply_to="e-0",
        text="hello",
        author="ai",
        responder="offline-faq",
        confidence=0.9,
        intent="greeting",
    ),
    RecordDelivery(**CMD, reply_event_id="e-2", channel="web", status="delivered", attempts=1),
    CloseConversation(**CMD, reason="resolved", closed_by="agent-7"),
    MessageReceived(
        **EVT,
        channel="web",
        customer_id="u1",
        text="退款",
        channel_message_id="m1",
        command_id="c-1",
        language="zh",
    ),
    MessageModerated(
        **EVT,
        message_event_id="e-0",
        direction="in",
        verdict="mask",
        text="****",
        categories=["abuse"],
        list_version=4,
    ),
    ConversationRouted(**EVT, assignee="ai", queue="t1:default", reason="ai-first"),
    ReplyRequested(**EVT, message_event_id="e-0", channel="api", text="hi"),
    ReplyProduced(
        **EVT,
        in_reply_to="e-0",
        channel="api",
        text="hello",
        author="ai",
        responder="offline-faq",
        confidence=1.0,
        customer_id="u1",
    ),
    MessageDelivered(
        **EVT, reply_event_id="e-2", channel="api", status="failed", attempts=5, detail="HTTP 500"
    ),
    ConversationClosed(**EVT, reason="idle", closed_by="system"),
    DeadLetter(
        source_topic="kefu.commands",
        partition=2,
        offset=41,
        reason="unknown schema fingerprint",
        consumer="conversation",
        failed_at=1_700_000_000_000,
        payload=b"\x00\x01",
        key=b"conv-1",
    ),
]
