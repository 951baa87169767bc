"""The dead-letter topic, for operators: what is in it, and sending a command back.

A consumer dead-letters a record it cannot take (undecodable, refused, or its own
failure) with the bytes as they were (``schemas.records.dead_letter``). Once the cause
is fixed, a dead-lettered *command* can be sent again to the topic it came from:
commands carry ids, the conversation agent drops one among its conversation's last
``streams.lifecycle.APPLIED_WINDOW`` (256) commands, and the router's commands are
idempotent in the domain, so sending one back twice does not double a message.
Records of the logs (events, queue events, word lists) are refused: they are still on
their topic, and the read models are rebuilt from it with ``kefu replay``.

A record may be a ``Commit``: the events of one decision, or on the commands topic a
batch of delivery receipts (``RecordDelivery`` of several conversations). It is listed
with the records it holds; a commit of commands is sent back whole, as the same bytes
(never re-encoded), when every record in it belongs on its topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from kefu.settings import Settings
from schemas.codec import CODEC, DecodeError
from schemas.records import Command, Commit, DeadLetter, Record, RoutingCommand
from schemas.topics import TopicNames

REDRIVEN_HEADER = "kefu-redriven-from"


@dataclass(frozen=True, slots=True)
class Letter:
    offset: int  # on the dead-letter topic: what an operator names to redrive it
    letter: DeadLetter

    @property
    def record_type(self) -> str:
        """The dead record's type by its schema fingerprint ('?' when unknown)."""
        kind = CODEC.peek(self.letter.payload)
        return kind.__name__ if kind is not None else "?"

    def events(self) -> list[dict[str, Any]]:
        """For a dead ``Commit``: what each record in it is (type, conversation or
        queue, seq, event or command id), in order; ``[]`` for any other record. One
        that does not decode shows its reason; a commit that does not (cut at the size
        limit) shows one entry saying so."""
        if CODEC.peek(self.letter.payload) is not Commit:
            return []
        try:
            events = CODEC.unpack(self.letter.payload)
        except DecodeError as exc:
            return [{"type": "?", "error": exc.reason}]
        out: list[dict[str, Any]] = []
        for raw in events:
            try:
                kind, fields = CODEC.decode_fields(raw)
            except DecodeError as exc:
                out.append({"type": "?", "error": exc.reason})
                continue
            about: dict[str, Any] = {"type": kind.__name__}
            about.update({k: fields[k] for k in ("conversation_id", "queue") if k in fields})
            about.update(seq=fields.get("seq"), id=fields.get("event_id", fields.get("command_id")))
            out.append(about)
        return out

    def summary(self) -> str:
        """The record type, and for a commit its events: ``Commit: A #2, B #3``."""
        events = self.events()
        if not events:
            return self.record_type
        shown = [
            f"{e['type']} #{e['seq']}" if e.get("seq") is not None else e["type"] for e in events
        ]
        return f"{self.record_type}: {', '.join(shown)}"


@dataclass(frozen=True, slots=True)
class Redriven:
    offset: int
    sent_to: str = ""  # "topic[partition]@offset" when sent
    refused: str = ""  # why not, when not


def _commands_of(names: TopicNames) -> dict[str, type[Record]]:
    """The topics a redrive may write to, with the record type each carries."""
    return {names.commands: Command, names.routing: RoutingCommand}


async def read_letters(settings: Settings) -> list[Letter]:
    """Every dead letter, oldest first (one partition: the topic is created so)."""
    topic = TopicPartition(TopicNames(settings.topic_prefix).deadletter, 0)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.servers,
        enable_auto_commit=False,
        **settings.kafka.client_options(),
    )
    try:
        await consumer.start()
        consumer.assign([topic])
        await consumer.seek_to_beginning(topic)
        end = (await consumer.end_offsets([topic]))[topic]
        out: list[Letter] = []
        while await consumer.position(topic) < end:
            for record in (await consumer.getmany(topic, timeout_ms=1000)).get(topic, []):
                letter = CODEC.decode(record.value or b"")
                if isinstance(letter, DeadLetter):
                    out.append(Letter(record.offset, letter))
        return out
    finally:
        await consumer.stop()


def refusal(letter: DeadLetter, names: TopicNames) -> str:
    """Why this letter cannot be sent back ('' when it can)."""
    expected = _commands_of(names).get(letter.source_topic)
    if expected is None:
        return (
            f"{letter.source_topic} is a log, not a command topic: the record is still "
            "there; rebuild what read it with kefu replay"
        )
    try:
        records = CODEC.decode_all(letter.payload)  # one record, or a commit's
    except DecodeError as exc:
        return f"still undecodable: {exc.reason}"
    if not records:
        return "an empty commit: nothing to send"
    for record in records:
        if not isinstance(record, expected):
            inside = " (in a commit)" if CODEC.is_commit(letter.payload) else ""
            return f"a {record.type}{inside} does not belong on {letter.source_topic}"
    return ""


async def redrive(settings: Settings, offsets: list[int], dry_run: bool = False) -> list[Redriven]:
    """Send the dead letters at ``offsets`` back to their topics, with their keys and
    their bytes as they were (a commit stays one record)."""
    names = TopicNames(settings.topic_prefix)
    letters = {letter.offset: letter.letter for letter in await read_letters(settings)}
    plan: list[tuple[int, DeadLetter | None, str]] = []
    for offset in offsets:
        letter = letters.get(offset)
        why = "no dead letter at this offset" if letter is None else refusal(letter, names)
        plan.append((offset, letter, why))
    if dry_run or all(why for _, _, why in plan):
        return [Redriven(offset, refused=why or "dry run") for offset, _, why in plan]
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.servers,
        acks="all",
        enable_idempotence=True,
        **settings.kafka.client_options(),
    )
    await producer.start()
    try:
        out: list[Redriven] = []
        for offset, letter, why in plan:
            if why or letter is None:
                out.append(Redriven(offset, refused=why))
                continue
            sent = await producer.send_and_wait(
                letter.source_topic,
                letter.payload,
                key=letter.key,
                headers=[(REDRIVEN_HEADER, f"{names.deadletter}@{offset}".encode())],
            )
            out.append(Redriven(offset, sent_to=f"{sent.topic}[{sent.partition}]@{sent.offset}"))
        return out
    finally:
        await producer.stop()
