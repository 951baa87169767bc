"""Decode what an agent consumes, or dead-letter it: one poison record never stops a
partition, and never disappears without a trace."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from aiokafka.errors import KafkaError, KafkaTimeoutError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.codec import CODEC, DecodeError
from schemas.records import Command, Record, dead_letter
from schemas.time import now_ms
from streams import telemetry
from streams.breaker import backoff
from streams.consumer import InOrder

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Record)
T = TypeVar("T")
# Failures of the infrastructure that leave nothing half done, so trying again is
# safe: Redis unreachable, restarting or loading its data, a refused connection.
TRANSIENT: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionRefusedError,
)


def transient(exc: BaseException) -> bool:
    """``TRANSIENT``, or a Kafka send that could not even be queued: no metadata or no
    room in the producer's buffer in time (KafkaTimeoutError), or a broker error
    aiokafka marks retriable (leader moving, broker unreachable). A record too large
    or a closed producer is not: trying again cannot help."""
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, KafkaError) and (exc.retriable or isinstance(exc, KafkaTimeoutError))


# How long an agent waits such a failure out before it dead-letters the record.
TRANSIENT_BUDGET_S = 30.0
# Far above any record kefu writes (texts are cut at 8,000 characters) and below
# Kafka's 1 MB message limit, so a dead letter that carries the bytes still fits.
MAX_RECORD_BYTES = 512 * 1024


def position(message: Any) -> str:
    return f"{message.topic}[{message.partition}]@{message.offset}"


async def send_dead_letter(
    deadletter_topic: Any, message: Any, reason: str, consumer: str, payload: bytes | None = None
) -> None:
    """Dead-letter ``message`` (its position, key and bytes), or with ``payload`` only
    the part of it that failed (one command of a ``Commit``)."""
    log.warning("dead-letter %s consumer=%s reason=%s", position(message), consumer, reason)
    telemetry.dead_lettered(consumer, reason)
    record = dead_letter(
        source_topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        reason=reason,
        consumer=consumer,
        failed_at=now_ms(),
        payload=(bytes(message.value or b"") if payload is None else payload)[:MAX_RECORD_BYTES],
        key=message.key,
    )
    await deadletter_topic.send(key=message.key, value=record)


async def outlasting(
    call: Callable[[], Awaitable[T]], what: str, budget_s: float = TRANSIENT_BUDGET_S
) -> T:
    """``call()``, tried again with backoff while it fails for a ``transient`` reason,
    for up to ``budget_s`` seconds: a Redis restart or a Kafka leader election must not
    dead-letter the records that arrive meanwhile (each would need a redrive). Any
    other error, or one that outlasts the budget, is raised for the agent to
    dead-letter."""
    deadline = time.monotonic() + budget_s
    attempt = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            if not transient(exc):
                raise
            attempt += 1
            delay = backoff(attempt, 0.1, cap=2.0)
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%r); try %d in %.2f s", what, exc, attempt + 1, delay)
            await asyncio.sleep(delay)


async def send_in_order(
    sends: Sequence[tuple[Any, Any, Any]], what: str, budget_s: float = TRANSIENT_BUDGET_S
) -> list[Any]:
    """Send each ``(topic, key, value)`` in order, each once: a transient failure is
    waited out (``outlasting``) and only the send that failed is tried again, never
    the ones before it, so the log gets no second copy of a decision's first events.
    Returns what each send returned (the delivery futures, for a checkpoint)."""
    results: list[Any] = []

    async def rest() -> None:
        while len(results) < len(sends):
            topic, key, value = sends[len(results)]
            results.append(await topic.send(key=key, value=value))

    await outlasting(rest, what, budget_s)
    return results


def decode(value: bytes, expected: type[R]) -> R:
    if len(value) > MAX_RECORD_BYTES:  # a huge record is poison, not work
        raise DecodeError(f"record of {len(value)} bytes is over the {MAX_RECORD_BYTES}-byte limit")
    record = CODEC.decode(value)
    if not isinstance(record, expected):
        raise DecodeError(f"expected a {expected.__name__}, got {record.type}")
    return record


async def records(
    stream: Any, expected: type[R], deadletter_topic: Any, consumer: str, in_order: bool = True
) -> AsyncIterator[tuple[Any, R]]:
    """Yield ``(faust event, record)`` in offset order (``streams.consumer.InOrder``);
    undecodable records go to the dead-letter topic."""
    gate = InOrder(stream.app.consumer) if in_order else None
    async for event in stream.events():
        if gate is not None and not gate.admit(event.message):
            continue
        record = await _decoded(event, expected, deadletter_topic, consumer)
        if record is not None:
            with telemetry.hop(consumer, event.message, record):  # span + latency, on output
                yield event, record


async def _decoded(event: Any, expected: type[R], deadletter_topic: Any, consumer: str) -> R | None:
    try:
        return decode(event.value, expected)
    except DecodeError as exc:
        await send_dead_letter(deadletter_topic, event.message, exc.reason, consumer)
        return None


def decode_commands(value: bytes) -> list[tuple[bytes, Command]]:
    """The commands a record holds (one, or a ``Commit`` of several), each with its own
    bytes: a command that fails is dead-lettered alone."""
    if len(value) > MAX_RECORD_BYTES:
        raise DecodeError(f"record of {len(value)} bytes is over the {MAX_RECORD_BYTES}-byte limit")
    out = []
    for raw in CODEC.unpack(value):
        out.append((raw, decode(raw, Command)))
    if not out:
        raise DecodeError("an empty commit")
    return out


async def each_conversation(
    batch: list[tuple[Any, R]],
    handle: Callable[[Any, R], Awaitable[None]],
    concurrency: int,
) -> None:
    """Run ``handle`` over a batch: one conversation's records one after another, in
    log order (a customer reads replies in the order they were written), different
    conversations at once, at most ``concurrency`` at a time. Returns when all are done,
    so the batch is acked only after every effect."""
    groups: dict[str, list[tuple[Any, R]]] = {}
    for item in batch:
        groups.setdefault(getattr(item[1], "conversation_id", ""), []).append(item)
    limit = asyncio.Semaphore(concurrency)

    async def run(items: list[tuple[Any, R]]) -> None:
        async with limit:
            for event, record in items:
                await handle(event, record)

    if len(groups) == 1:
        await run(next(iter(groups.values())))
        return
    await asyncio.gather(*(run(items) for items in groups.values()))
