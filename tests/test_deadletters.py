"""kefu.deadletters and ``kefu deadletter``, on the running pipeline: a command a
consumer dead-lettered (as the router did for minutes when a changelog was missing) is
answered once sent back, and stays one message when sent back twice; poison and log
records are refused with the reason."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from click.testing import CliRunner, Result

import kefu.cli_deadletter
from connectors.identity import conversation_id_for
from kefu.cli import main
from kefu.settings import Settings
from schemas.codec import CODEC
from schemas.records import MessageReceived, ReceiveMessage, dead_letter
from schemas.time import now_ms
from schemas.topics import TopicNames
from tests.conftest import wait_for
from tests.kafka_helpers import read_topic
from tests.test_pipeline import webhooks

CONSUMER = "test-redrive"  # marks this test's letters among the session's


def cli(settings: Settings, *args: str) -> Result:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kefu.cli_deadletter, "_settings", lambda: settings)
        return CliRunner().invoke(main, ["deadletter", *args])


def _message(conversation: str, customer: str, message_id: str) -> ReceiveMessage:
    return ReceiveMessage(
        command_id=str(uuid.uuid4()),
        conversation_id=conversation,
        tenant_id="demo",
        issued_at=now_ms(),
        channel="api",
        customer_id=customer,
        text="where is my order?",
        channel_message_id=message_id,
    )


async def _publish(settings: Settings, topic: str, value: bytes, key: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.servers, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def _bury(settings: Settings, source_topic: str, payload: bytes, key: bytes, reason: str) -> None:
    """A dead letter as a consumer writes one (streams.inbox.send_dead_letter)."""
    letter = dead_letter(
        source_topic=source_topic,
        partition=0,
        offset=0,
        reason=reason,
        consumer=CONSUMER,
        failed_at=now_ms(),
        payload=payload,
        key=key,
    )
    names = TopicNames(settings.topic_prefix)
    asyncio.run(_publish(settings, names.deadletter, CODEC.encode(letter), key))


def _received(settings: Settings, conversation: str) -> list[MessageReceived]:
    log = asyncio.run(read_topic(settings, _names(settings).events))
    events = [CODEC.decode(value) for value in log]
    mine = [e for e in events if isinstance(e, MessageReceived)]
    return [e for e in mine if e.conversation_id == conversation]


def _names(settings: Settings) -> TopicNames:
    return TopicNames(settings.topic_prefix)


def test_a_dead_command_is_sent_back_once_and_poison_and_logs_are_refused(
    pipeline: Settings,
) -> None:
    names = _names(pipeline)
    who = f"cust-{uuid.uuid4().hex[:10]}"
    conversation = conversation_id_for("demo", "api", who)
    key = conversation.encode()
    failed = CODEC.encode(_message(conversation, who, "dead-1"))
    _bury(pipeline, names.commands, failed, key, "PartitionsMismatch('…')")
    _bury(pipeline, names.commands, b"\xc3\x01garbage", key, "not Avro single-object encoding")
    _bury(pipeline, names.events, failed, key, "projection failed")

    listed = cli(pipeline, "list", "--consumer", CONSUMER, "--limit", "0", "--json")
    assert listed.exit_code == 0, listed.output
    rows: list[dict[str, Any]] = [json.loads(line) for line in listed.output.splitlines()]
    mine = [row for row in rows if row["key"] == conversation]
    assert [(row["type"], row["source"].split("[")[0]) for row in mine] == [
        ("ReceiveMessage", names.commands),
        ("?", names.commands),
        ("ReceiveMessage", names.events),
    ]
    valid, poison, logged = (row["offset"] for row in mine)
    table = cli(pipeline, "list", "--consumer", CONSUMER, "--reason", "PartitionsMismatch")
    assert table.exit_code == 0 and str(valid) in table.output and "dead letters" in table.output

    # Nothing was sent on a dry run; nothing happened to the conversation yet.
    dry = cli(pipeline, "redrive", str(valid), "--dry-run")
    assert dry.exit_code == 0 and "dry run" in dry.output
    assert not _received(pipeline, conversation)

    sent = cli(pipeline, "redrive", str(valid), str(poison), str(logged), "999999999")
    assert sent.exit_code == 1, sent.output
    said = dict(line.split(": ", 1) for line in sent.output.splitlines())
    assert said[str(valid)].startswith(f"sent to {names.commands}[")
    assert said[str(poison)].startswith("not sent: still undecodable")
    assert "is a log" in said[str(logged)] and "kefu replay" in said[str(logged)]
    assert said["999999999"] == "not sent: no dead letter at this offset"
    wait_for(lambda: webhooks(pipeline, conversation), what="the reply to the redriven message")

    # Sent back again, then a new message behind it on the same partition: once that
    # one is answered, the second redrive has been read, and it made no second message.
    again = cli(pipeline, "redrive", str(valid))
    assert again.exit_code == 0 and "sent to" in again.output
    later = _message(conversation, who, "after-redrive")
    asyncio.run(_publish(pipeline, names.commands, CODEC.encode(later), key))
    wait_for(lambda: len(webhooks(pipeline, conversation)) >= 2, what="the reply after it")
    received = _received(pipeline, conversation)
    assert sorted(e.channel_message_id for e in received) == ["after-redrive", "dead-1"]
    assert len(webhooks(pipeline, conversation)) == 2
