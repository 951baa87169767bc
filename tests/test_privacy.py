"""A customer's data on request: ``kefu privacy export`` finds every conversation the
customer wrote in (on the log, by the customer id its events carry) and none of
another customer's."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx

from kefu.privacy import export_customer
from kefu.settings import Settings
from schemas.topics import TopicNames
from tests.conftest import wait_for


def test_export_holds_the_customers_conversations_in_words(pipeline: Settings) -> None:
    me, other = (f"priv-{uuid.uuid4().hex[:8]}" for _ in range(2))
    g = pipeline.gateway
    with httpx.Client(base_url=f"http://{g.host}:{g.port}", timeout=30) as http:
        for who, text in ((me, "我的订单 A-1 还没到"), (other, "someone else's words")):
            sent = http.post(
                "/v1/messages",
                json={"customer_id": who, "text": text, "message_id": f"{who}-1"},
                headers={"X-Api-Key": "demo-test-key"},
            )
            assert sent.status_code == 202, sent.text

    def exported() -> dict[str, object] | None:
        data = asyncio.run(
            export_customer(
                pipeline.kafka.servers,
                TopicNames(pipeline.topic_prefix).events,
                pipeline.redis.dsn,
                "demo",
                me,
            )
        )
        conversations = data["conversations"]
        assert isinstance(conversations, list)
        replied = any(e["type"] == "ReplyProduced" for c in conversations for e in c["events"])
        return data if replied else None

    data = wait_for(exported, 60, "the customer's conversation, answered")
    text = json.dumps(data, ensure_ascii=False)
    assert "我的订单 A-1 还没到" in text and "someone else's words" not in text
    conversations = data["conversations"]
    assert isinstance(conversations, list) and len(conversations) == 1
    assert conversations[0]["channel"] == "api"
    assert [e["seq"] for e in conversations[0]["events"]][:2] == [1, 2]
