"""The worker's producer for the hot path: confluent-kafka (librdkafka), not aiokafka.

aiokafka builds every produce request in Python on the event loop (the accumulator,
the murmur2 partitioner, the sender's request encoding): ~13 % of the worker's main
thread at full speed, and a fixed cost per request that a trickle pays per message
(bench/RESULTS.md "Hot path"). librdkafka batches, encodes, sends and retries in its
own threads in C; here ``produce`` only hands it the record.

The surface is the one the hot path used of the Faust app's producer:
``await send(topic, key, value, partition, timestamp, headers)`` returns a future of
the record's delivery, and ``flush()`` waits for every record sent so far. Delivery
reports are served by a thread of our own (``poll``) and handed to the event loop in
bunches (one ``call_soon_threadsafe`` per bunch, not per record).

Partitioning is Java's (``murmur2_random``), the same as aiokafka's and the gateway's:
a conversation's records land in the same partition whichever client wrote them.
Idempotence is on: librdkafka's retries neither duplicate nor reorder a partition.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

from aiokafka.errors import KafkaError, KafkaTimeoutError
from confluent_kafka import KafkaException, Producer
from mode import Service

log = logging.getLogger(__name__)

# A full local queue (librdkafka's ``queue.buffering.max.*``) is waited out this long
# before the send fails as transient (``streams.inbox.transient``: the caller retries).
QUEUE_FULL_WAIT_S = 5.0
POLL_S = 0.1


class Delivered(NamedTuple):
    topic: str
    partition: int
    offset: int


class DeliveryFailed(KafkaError):  # type: ignore[misc]
    """The broker refused a record, or librdkafka gave up on it after its retries."""

    retriable = False

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"{topic}: {reason}")


def librdkafka_config(
    bootstrap: str,
    client_id: str,
    linger_ms: float,
    security: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """librdkafka's settings for the hot path's producer (``security``: the
    ``KafkaSettings.librdkafka_security()`` of the deployment)."""
    return {
        "bootstrap.servers": bootstrap,
        "client.id": client_id,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": linger_ms,
        "partitioner": "murmur2_random",
        **dict(security or {}),
    }


class HotProducer:
    """See the module docstring. Started on first use (it needs the running loop);
    ``close`` flushes and stops the delivery thread."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._config = dict(config)
        self._producer: Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reports: deque[tuple[asyncio.Future[Delivered], Any, Any]] = deque()
        self._scheduled = False
        self._outstanding: set[asyncio.Future[Delivered]] = set()
        self._thread: threading.Thread | None = None
        self._running = False

    def _start(self) -> Producer:
        self._loop = asyncio.get_running_loop()
        self._producer = Producer(self._config, error_cb=self._client_error)
        self._running = True
        self._thread = threading.Thread(target=self._poll, name="hot-producer", daemon=True)
        self._thread.start()
        return self._producer

    @staticmethod
    def _client_error(error: Any) -> None:
        # Broker down, all brokers down: librdkafka keeps retrying on its own; a fatal
        # error (idempotence state lost) fails the records, which ends the worker.
        log.warning("hot producer: %s", error)

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        timestamp: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Delivered]:
        producer = self._producer or self._start()
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[Delivered] = loop.create_future()
        kwargs: dict[str, Any] = {"on_delivery": partial(self._delivered, future)}
        if partition is not None:
            kwargs["partition"] = partition
        if timestamp is not None:
            kwargs["timestamp"] = timestamp
        if headers:
            kwargs["headers"] = list(headers)
        deadline = time.monotonic() + QUEUE_FULL_WAIT_S
        while True:
            try:
                producer.produce(topic, value, key, **kwargs)
                break
            except BufferError:  # librdkafka's queue is full: let it drain
                if time.monotonic() > deadline:
                    raise KafkaTimeoutError(f"{topic}: the producer's queue stayed full") from None
                await asyncio.sleep(0.005)
            except KafkaException as exc:
                raise DeliveryFailed(topic, str(exc)) from exc
        self._outstanding.add(future)
        return future

    async def flush(self) -> None:
        """Every record sent so far delivered (or failed: its future says which)."""
        pending = list(self._outstanding)
        if pending:
            await asyncio.wait(pending)

    async def close(self) -> None:
        if self._producer is None:
            return
        await self.flush()
        self._running = False
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, 2 * POLL_S + 1)
        self._producer = None

    # --- delivery reports: served on the poll thread, resolved on the loop ------------

    def _poll(self) -> None:
        producer = self._producer
        while self._running and producer is not None:
            producer.poll(POLL_S)

    def _delivered(self, future: asyncio.Future[Delivered], error: Any, message: Any) -> None:
        self._reports.append((future, error, message))
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        self._scheduled = False  # before draining: a report added meanwhile schedules again
        reports = self._reports
        while reports:
            future, error, message = reports.popleft()
            self._outstanding.discard(future)
            if future.done():
                continue
            if error is not None:
                future.set_exception(DeliveryFailed(message.topic(), str(error)))
            else:
                future.set_result(Delivered(message.topic(), message.partition(), message.offset()))


class ClosedLast(Service):
    """Closes ``producer`` when the app stops: added as a runtime dependency before the
    batch consumers, so it stops after them (mode stops children in reverse), after
    their last checkpoint has flushed through it."""

    def __init__(self, producer: HotProducer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hot = producer

    async def on_stop(self) -> None:
        await self._hot.close()
