"""The dead-letter topic, for operators: what is in it, and sending a command back.

A consumer dead-letters a record it cannot take (undecodable, refused, or its own
failure) with the bytes as they were (``schemas.records.dead_letter``). Once the cause
is fixed, a dead-lettered *command* can be sent again to the topic it came from:
commands carry ids, the conversation agent drops one among its conversation's last
``streams.lifecycle.APPLIED_WINDOW`` (256) commands, and the router's commands are
idempotent in the domain, so sending one back twice does not double a message.
Records of the logs (events, queue events, word lists) are refused: they are still on
their topic, and the read models are rebuilt from it with ``kefu replay``.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from kefu.settings import Settings
from schemas.codec import CODEC, DecodeError
from schemas.records import Command, DeadLetter, Record, RoutingCommand
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
        record = CODEC.decode(letter.payload)
    except DecodeError as exc:
        return f"still undecodable: {exc.reason}"
    if not isinstance(record, expected):
        return f"a {record.type} does not belong on {letter.source_topic}"
    return ""


async def redrive(settings: Settings, offsets: list[int], dry_run: bool = False) -> list[Redriven]:
    """Send the dead letters at ``offsets`` back to their topics, with their keys."""
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
