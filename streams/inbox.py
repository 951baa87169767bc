"""Decode what an agent consumes, or dead-letter it: one poison record never stops a
partition, and never disappears without a trace."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from schemas.codec import CODEC, DecodeError
from schemas.records import Record, dead_letter
from schemas.time import now_ms

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Record)


def position(message: Any) -> str:
    return f"{message.topic}[{message.partition}]@{message.offset}"


async def send_dead_letter(deadletter_topic: Any, message: Any, reason: str, consumer: str) -> None:
    log.warning("dead-letter %s consumer=%s reason=%s", position(message), consumer, reason)
    record = dead_letter(
        source_topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        reason=reason,
        consumer=consumer,
        failed_at=now_ms(),
        payload=bytes(message.value or b""),
        key=message.key,
    )
    await deadletter_topic.send(key=message.key, value=record)


def decode(value: bytes, expected: type[R]) -> R:
    record = CODEC.decode(value)
    if not isinstance(record, expected):
        raise DecodeError(f"expected a {expected.__name__}, got {record.type}")
    return record


async def records(
    stream: Any, expected: type[R], deadletter_topic: Any, consumer: str
) -> AsyncIterator[tuple[Any, R]]:
    """Yield ``(faust event, record)``; undecodable records go to the dead-letter topic."""
    async for event in stream.events():
        try:
            record = decode(event.value, expected)
        except DecodeError as exc:
            await send_dead_letter(deadletter_topic, event.message, exc.reason, consumer)
            continue
        yield event, record
