"""The pipeline benchmark's traffic: the workload, the publishers, and the observer
that matches replies on the events topic to the messages published.

Built for long runs: messages are made on the fly (``Workload`` is a lazy sequence),
per-message times live in flat arrays (``Tracking``: 24 bytes a message), and the
observer keeps only in-flight ids plus a bounded window of finished ones (enough to
catch a late duplicate), so a 10-minute soak at thousands of msg/s costs the bench
tens of MB, not GBs of dicts.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, overload

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.timeseries import SecondBuckets
from connectors.identity import command_id_for, conversation_id_for
from kefu.settings import Settings
from schemas.codec import CODEC, DecodeError
from schemas.records import (
    MessageDelivered,
    MessageModerated,
    ReceiveMessage,
    ReplyProduced,
    ReplyRequested,
    event_id_for,
)
from schemas.time import now_ms
from schemas.topics import TopicNames
from streams.responders import HUMAN_INTENT

TENANT = "bench"
CHANNEL = "api"
# Finished ids kept to recognise a late duplicate (a redelivery shows up within a
# commit interval or two): beyond this many, a duplicate would count as unmatched.
RECENT_IDS = 100_000
# Every this many sends, wait for their acks: bounds the futures held.
ACK_BATCH = 10_000
# The only events the observer decodes; it skips the rest by schema fingerprint.
WATCHED: tuple[type[Any], ...] = (
    MessageModerated,
    ReplyRequested,
    ReplyProduced,
    MessageDelivered,
)


# ------------------------------------------------------------------------ workload


def faq_questions() -> list[str]:
    """Questions the AI answers. Asking for a person hands the conversation to a human
    queue (routing), after which the AI no longer replies: not this benchmark's path."""
    text = (resources.files("streams") / "knowledge" / "faq.json").read_text("utf-8")
    return [
        q for item in json.loads(text) if item["intent"] != HUMAN_INTENT for q in item["questions"]
    ]


@dataclass(frozen=True, slots=True)
class Message:
    index: int
    customer_id: str
    conversation_id: str
    message_id: str
    command_id: str
    text: str

    def command(self) -> ReceiveMessage:
        return ReceiveMessage(
            command_id=self.command_id,
            conversation_id=self.conversation_id,
            tenant_id=TENANT,
            issued_at=now_ms(),
            channel=CHANNEL,
            customer_id=self.customer_id,
            text=self.text,
            channel_message_id=self.message_id,
        )

    def received_id(self) -> str:
        """The id of its ``MessageReceived``: the first event id of its command."""
        return event_id_for(self.command_id, 0, self.conversation_id)


class Workload(Sequence[Message]):
    """Message ``i`` goes to conversation ``i % M``: every conversation gets its turns
    spread over the run, as customers writing at the same time would. Made on demand."""

    def __init__(self, messages: int, conversations: int, run: str) -> None:
        self._n = messages
        self._conversations = conversations
        self._run = run
        self._texts = faq_questions()

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> Message: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Message]: ...
    def __getitem__(self, i: int | slice) -> Message | Sequence[Message]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        customer = f"bench-{self._run}-c{i % self._conversations}"
        message_id = f"{customer}-m{i // self._conversations}"
        return Message(
            index=i,
            customer_id=customer,
            conversation_id=conversation_id_for(TENANT, CHANNEL, customer),
            message_id=message_id,
            command_id=command_id_for(TENANT, CHANNEL, message_id),
            text=self._texts[i % len(self._texts)],
        )


def workload(messages: int, conversations: int, run: str) -> Workload:
    return Workload(messages, conversations, run)


# ------------------------------------------------------------------------ tracking


class Tracking:
    """Per message, monotonic seconds (NaN = not yet), and the per-second buckets."""

    def __init__(self, messages: int) -> None:
        nan = array("d", [math.nan])
        self.sent_at = nan * messages
        self.requested_at = nan * messages
        self.replied_at = nan * messages
        self.delivered_at = nan * messages  # the reply's MessageDelivered on the log
        self.sent = 0
        self.buckets = SecondBuckets(origin=time.monotonic())

    def begin(self, origin: float) -> None:
        self.buckets = SecondBuckets(origin=origin)

    def on_sent(self, index: int) -> None:
        now = time.monotonic()
        self.sent_at[index] = now
        self.sent += 1
        self.buckets.add_published(now)


class _Ids:
    """id -> message index. Finished ids move to a bounded window of recent ones."""

    def __init__(self, keep: int = RECENT_IDS) -> None:
        self.live: dict[str, int] = {}
        self.recent: dict[str, int] = {}
        self._keep = keep

    def add(self, key: str, index: int) -> None:
        self.live[key] = index

    def get(self, key: str) -> int | None:
        index = self.live.get(key)
        return index if index is not None else self.recent.get(key)

    def retire(self, key: str) -> None:
        index = self.live.pop(key, None)
        if index is not None:
            self.recent[key] = index
            if len(self.recent) > self._keep:
                del self.recent[next(iter(self.recent))]  # dicts keep insertion order


@dataclass
class Observation:
    """Counts of what the observer saw on the events topic."""

    replies: int = 0
    reply_lag_ms: list[float] = field(default_factory=list)  # seen - record timestamp
    duplicates: int = 0
    unmatched: int = 0  # replies to requests we never saw
    delivered: int = 0  # replies whose MessageDelivered is on the log (the reader's work)
    blocked: int = 0  # inbound messages moderation blocked (they get no reply)
    undecodable: int = 0
    events: int = 0


class Observer:
    """Tails the events topic from its end (no consumer group, every partition)."""

    def __init__(self, settings: Settings, tracking: Tracking) -> None:
        self._settings = settings
        self._topic = TopicNames(settings.topic_prefix).events
        self._tracking = tracking
        self._received = _Ids()  # MessageReceived id -> message, set at publish
        self._requests = _Ids()  # ReplyRequested id -> message
        self._replies = _Ids()  # ReplyProduced id -> message, until delivered
        self.seen = Observation()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.servers,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
        )
        self._stopping = False
        self.progress = asyncio.Event()

    def expect(self, message: Message) -> None:
        """Called just before ``message`` is published."""
        self._received.add(message.received_id(), message.index)

    async def start(self) -> None:
        await self._consumer.start()
        tps = [TopicPartition(self._topic, p) for p in range(self._settings.kafka.partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the positions now, before anything is published
            await self._consumer.position(tp)

    async def run(self) -> None:
        while not self._stopping:
            batch = await self._consumer.getmany(timeout_ms=100)
            now = time.monotonic()
            wall_ms = time.time() * 1000
            for records in batch.values():
                for record in records:
                    self._handle(record.value, now, wall_ms - record.timestamp)

    def _handle(self, value: bytes, now: float, lag_ms: float) -> None:
        """One Kafka record: one event (written before commits) or a ``Commit``."""
        try:
            events = CODEC.unpack(value)
        except DecodeError:
            self.seen.events += 1
            self.seen.undecodable += 1
            return
        for raw in events:
            self._handle_event(raw, now, lag_ms)

    def _handle_event(self, value: bytes, now: float, lag_ms: float) -> None:
        seen = self.seen
        seen.events += 1
        kind = CODEC.peek(value)
        if kind is None:
            seen.undecodable += 1
            return
        if kind not in WATCHED:
            return
        try:
            event = CODEC.decode(value)
        except DecodeError:
            seen.undecodable += 1
            return
        t = self._tracking
        if isinstance(event, MessageModerated):
            blocked = event.direction == "in" and event.verdict == "block"
            if blocked and self._received.get(event.message_event_id) is not None:
                self._received.retire(event.message_event_id)
                seen.blocked += 1
                self.progress.set()
        elif isinstance(event, ReplyRequested):
            index = self._received.get(event.message_event_id)
            if index is not None:
                self._received.retire(event.message_event_id)
                self._requests.add(event.event_id, index)
                if math.isnan(t.requested_at[index]):
                    t.requested_at[index] = now - max(0.0, lag_ms) / 1000
        elif isinstance(event, ReplyProduced):
            index = self._requests.get(event.in_reply_to)
            if index is None:
                seen.unmatched += 1
            elif not math.isnan(t.replied_at[index]):
                seen.duplicates += 1
            else:
                self._requests.retire(event.in_reply_to)
                self._replies.add(event.event_id, index)
                # When the reply was appended (its record's timestamp, on this
                # machine's clock), not when this observer got to it: its own fetch
                # lag is reported apart (``reply_lag_ms``).
                appended = now - max(0.0, lag_ms) / 1000
                t.replied_at[index] = appended
                seen.replies += 1
                seen.reply_lag_ms.append(lag_ms)
                t.buckets.add_reply(now, (appended - t.sent_at[index]) * 1000)
                self.progress.set()
        elif isinstance(event, MessageDelivered):
            index = self._replies.get(event.reply_event_id)
            if index is not None and math.isnan(t.delivered_at[index]):
                self._replies.retire(event.reply_event_id)
                t.delivered_at[index] = now - max(0.0, lag_ms) / 1000
                seen.delivered += 1
                self.progress.set()

    async def stop(self) -> None:
        self._stopping = True
        await self._consumer.stop()


# ------------------------------------------------------------------------ publishing


async def _pace(rate: float, index: int, start: float) -> None:
    if rate > 0:
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


OnPublish = Callable[[Message], None]


async def publish_to_kafka(
    settings: Settings, messages: Sequence[Message], rate: float, on_publish: OnPublish
) -> None:
    """Like ``connectors.publisher``: keyed by conversation, acks=all, idempotent."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=2,
        client_id="kefu-bench",
    )
    topic = TopicNames(settings.topic_prefix).commands
    await producer.start()
    try:
        pending: list[Awaitable[Any]] = []
        start = time.monotonic()
        for message in messages:
            await _pace(rate, message.index, start)
            value = CODEC.encode(message.command())
            on_publish(message)
            pending.append(
                await producer.send(topic, key=message.conversation_id.encode(), value=value)
            )
            if len(pending) >= ACK_BATCH:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def publish_via_gateway(
    settings: Settings, messages: Sequence[Message], rate: float, on_publish: OnPublish
) -> None:
    """``POST /v1/messages``, at most 64 requests in flight."""
    g = settings.gateway
    key = settings.tenants[TENANT].api_key.get_secret_value()
    gate = asyncio.Semaphore(64)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=f"http://{g.host}:{g.port}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
        limits=limits,
    ) as http:
        failures: list[BaseException] = []

        async def post(message: Message) -> None:
            try:
                body = {
                    "customer_id": message.customer_id,
                    "text": message.text,
                    "message_id": message.message_id,
                }
                on_publish(message)
                response = await http.post("/v1/messages", json=body)
                response.raise_for_status()
            except Exception as error:  # raised after the loop: keep the gate moving
                failures.append(error)
            finally:
                gate.release()

        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        for message in messages:
            if failures:
                raise failures[0]
            await _pace(rate, message.index, start)
            await gate.acquire()
            task = asyncio.create_task(post(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        if failures:
            raise failures[0]
