"""kefu.deadletters and ``kefu deadletter``, on the running pipeline: a command a
consumer dead-lettered (as the router did for minutes when a changelog was missing) is
answered once sent back, and stays one message when sent back twice; poison and log
records are refused with the reason. A dead ``Commit`` (the events of one decision as
one record) is listed with its events and kept byte for byte."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from click.testing import CliRunner, Result

import kefu.cli_deadletter
from connectors.identity import conversation_id_for
from kefu.cli import main
from kefu.deadletters import Letter, read_letters
from kefu.settings import Settings
from schemas.codec import CODEC
from schemas.records import (
    MessageModerated,
    MessageReceived,
    ReceiveMessage,
    Record,
    dead_letter,
)
from schemas.time import now_ms
from schemas.topics import TopicNames
from tests.conftest import wait_for
from tests.kafka_helpers import read_events
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
    events = asyncio.run(read_events(settings, _names(settings).events))  # commits unpacked
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


def _commit(conversation: str) -> tuple[bytes, list[Record]]:
    env: dict[str, Any] = {"conversation_id": conversation, "tenant_id": "demo"}
    env["occurred_at"] = now_ms()
    events: list[Record] = [
        MessageReceived(
            event_id=str(uuid.uuid4()),
            seq=1,
            channel="api",
            customer_id="c",
            text="hi",
            channel_message_id="m1",
            command_id="c1",
            **env,
        ),
        MessageModerated(
            event_id=str(uuid.uuid4()),
            seq=2,
            message_event_id="m1",
            direction="in",
            verdict="pass",
            text="hi",
            **env,
        ),
    ]
    return CODEC.encode(CODEC.commit(events, conversation)), events


def test_a_dead_commit_shows_its_events_without_kafka() -> None:
    value, events = _commit("conv-dead")
    letter = dead_letter(
        source_topic="kefu.events",
        partition=3,
        offset=7,
        reason="projection failed",
        consumer=CONSUMER,
        failed_at=now_ms(),
        payload=value,
        key=b"conv-dead",
    )
    item = Letter(0, letter)
    assert item.record_type == "Commit"
    assert [(e["type"], e["conversation_id"], e["seq"]) for e in item.events()] == [
        ("MessageReceived", "conv-dead", 1),
        ("MessageModerated", "conv-dead", 2),
    ]
    assert item.summary() == "Commit: MessageReceived #1, MessageModerated #2"
    # One event alone (a record written before commits) lists no events.
    single = Letter(1, dataclasses.replace(letter, payload=CODEC.encode(events[0])))
    assert single.events() == [] and single.summary() == "MessageReceived"
    # A commit cut at the size limit still lists, saying why its events are not shown.
    cut = Letter(2, dataclasses.replace(letter, payload=value[:40]))
    assert cut.record_type == "Commit" and "corrupt Commit" in cut.events()[0]["error"]


def test_a_dead_commit_is_listed_with_its_events_and_kept_byte_for_byte(
    pipeline: Settings,
) -> None:
    names = _names(pipeline)
    conversation = f"conv-{uuid.uuid4().hex[:10]}"
    value, _ = _commit(conversation)
    _bury(pipeline, names.events, value, conversation.encode(), "commit-test")

    listed = cli(pipeline, "list", "--reason", "commit-test", "--limit", "0", "--json")
    assert listed.exit_code == 0, listed.output
    (row,) = [r for r in map(json.loads, listed.output.splitlines()) if r["key"] == conversation]
    assert row["type"] == "Commit"
    assert [(e["type"], e["seq"]) for e in row["events"]] == [
        ("MessageReceived", 1),
        ("MessageModerated", 2),
    ]
    table = cli(pipeline, "list", "--reason", "commit-test", "--limit", "0")
    assert "Commit: MessageReceived #1, MessageModerated #2" in table.output, table.output

    (kept,) = [item for item in asyncio.run(read_letters(pipeline)) if item.offset == row["offset"]]
    assert kept.letter.payload == value  # exactly the bytes the log held
    sent = cli(pipeline, "redrive", str(row["offset"]))
    assert sent.exit_code == 1 and "is a log" in sent.output, sent.output


def test_a_dead_commit_of_commands_is_sent_back_as_the_same_bytes(pipeline: Settings) -> None:
    """A batch of commands as one record (as delivery receipts are sent) goes back
    whole: one record, byte for byte; one with a record of the wrong kind is refused."""
    names = _names(pipeline)
    who = f"cust-{uuid.uuid4().hex[:10]}"
    conversation = conversation_id_for("demo", "api", who)
    commands = [_message(conversation, who, f"batched-{n}") for n in range(2)]
    value = CODEC.encode(CODEC.commit(commands, conversation))
    wrong, _ = _commit(conversation)  # events have no place on the commands topic
    for payload in (value, wrong):
        _bury(pipeline, names.commands, payload, conversation.encode(), "commit-redrive")
    listed = cli(pipeline, "list", "--reason", "commit-redrive", "--limit", "0", "--json")
    rows = [r for r in map(json.loads, listed.output.splitlines()) if r["key"] == conversation]
    assert [[e["type"] for e in r["events"]] for r in rows] == [
        ["ReceiveMessage", "ReceiveMessage"],
        ["MessageReceived", "MessageModerated"],
    ]
    assert [e["id"] for e in rows[0]["events"]] == [c.command_id for c in commands]

    sent = cli(pipeline, "redrive", str(rows[0]["offset"]), str(rows[1]["offset"]))
    assert sent.exit_code == 1, sent.output
    said = dict(line.split(": ", 1) for line in sent.output.splitlines())
    assert said[str(rows[1]["offset"])] == (
        f"not sent: a MessageReceived (in a commit) does not belong on {names.commands}"
    )
    where = said[str(rows[0]["offset"])].removeprefix("sent to ")
    topic, position = where.split("[", 1)
    partition, offset = position.split("]@")
    assert asyncio.run(_value_at(pipeline, topic, int(partition), int(offset))) == value


async def _value_at(settings: Settings, topic: str, partition: int, offset: int) -> bytes | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.servers, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        async with asyncio.timeout(30):
            record = await consumer.getone(tp)
        value: bytes | None = record.value
        return value
    finally:
        await consumer.stop()
