"""The hot path's consumer over confluent-kafka (librdkafka), with the surface of
aiokafka's that ``streams.batch_consumer`` uses.

aiokafka fetches, decodes and keeps its group membership in Python on the event loop:
at a trickle every message costs a fetch round of it per consumer (a profile at 100
msg/s: ~20 % of the worker's main thread in aiokafka's fetcher and client,
bench/RESULTS.md "Hot path"). librdkafka prefetches, heartbeats and rebalances in its
own threads in C; this side only collects what it has.

``consume`` blocks, so it runs on a thread of this consumer's own, one call at a time.
Group rebalances are delivered inside ``consume`` on that thread. Partitions going:
the listener's checkpoint runs on the event loop while that thread waits for it (the
partitions are still ours until the callback returns), and its commit is handed back
to that thread to run (librdkafka answers requests to the group from elsewhere only
once the callback returned: waiting for one there never ends). Partitions coming: the
listener (a table's recovery, the read model's catch-up) runs on the loop in the
``getmany`` that follows, before any record of them is handed out.
Offsets are Kafka's (the next offset to read), ``TopicPartition``s aiokafka's, so the
batch consumer's bookkeeping is the same with either client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException
from confluent_kafka import TopicPartition as RdPartition

log = logging.getLogger(__name__)


class Record:
    """What the hot path reads of a record (aiokafka's ``ConsumerRecord`` names)."""

    __slots__ = ("headers", "key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(self, message: Any) -> None:
        self.topic: str = message.topic()
        self.partition: int = message.partition()
        self.offset: int = message.offset()
        self.key: bytes | None = message.key()
        self.value: bytes | None = message.value()
        self.timestamp: int = message.timestamp()[1]
        self.headers: Sequence[tuple[str, bytes]] = message.headers() or ()


def _ours(partitions: Iterable[Any]) -> set[TopicPartition]:
    return {TopicPartition(p.topic, p.partition) for p in partitions}


class HotConsumer:
    """``start``, ``subscribe(topics, listener)``, ``getmany``, ``assignment``,
    ``commit``, ``committed``, ``highwater``, ``stop``: as aiokafka's consumer."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._config = dict(config)
        self._consumer: Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: Any = None
        self._assigned: set[TopicPartition] = set()
        self._highwater: dict[TopicPartition, int] = {}
        self._gained: set[TopicPartition] = set()  # assigned, listener not yet told
        self._untold = False  # an assignment (maybe empty) the listener has not heard of
        self._closed = False
        # Every call into the consumer runs on one thread of its own, in order: the
        # group's requests (commits, offset fetches) wait behind a read, and in a
        # revoke callback that thread runs them itself while it waits (``_wait_for``).
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._consumer = Consumer(self._config, error_cb=self._client_error)
        name = f"hot-consumer-{self._config.get('group.id')}"
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _client_error(self, error: Any) -> None:
        # Brokers away: librdkafka reconnects by itself. A fatal error surfaces in
        # ``getmany`` (a message carrying it), which ends the process.
        log.warning("%s: %s", self._config.get("group.id"), error)

    def subscribe(self, topics: Sequence[str], listener: Any) -> None:
        assert self._consumer is not None
        self._listener = listener
        self._consumer.subscribe(
            list(topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    # --- the consumer's thread ------------------------------------------------------------

    def _serve(self) -> None:
        while (request := self._requests.get()) is not _STOP:
            _run(request)

    async def _call(self, function: Callable[[], Any]) -> Any:
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._requests.put((function, result))
        return await asyncio.wrap_future(result)

    def _wait_for(self, coroutine: Any) -> None:
        """Run ``coroutine`` on the loop; meanwhile run the calls it makes (its commit)."""
        loop = self._loop
        assert loop is not None
        done_token = object()
        done = asyncio.run_coroutine_threadsafe(coroutine, loop)
        done.add_done_callback(lambda _: self._requests.put(done_token))
        while (request := self._requests.get()) is not done_token:
            if request is _STOP:  # not now: after the callback
                self._requests.put(_STOP)
                continue
            _run(request)
        done.result()

    # --- rebalances: called on the consumer's thread, inside ``consume`` ----------------

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        gained = _ours(partitions)
        self._assigned |= gained
        self._gained |= gained
        self._untold = True  # an empty share too: the listener learns it joined

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        gone = _ours(partitions)
        told = gone - self._gained  # the listener never heard of the others
        self._gained -= gone
        if self._listener is not None and told:
            self._wait_for(self._listener.on_partitions_revoked(told))
        self._assigned -= gone

    # --- reading ----------------------------------------------------------------------

    async def getmany(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Record]]:
        if self._consumer is None or self._closed:
            return {}
        messages = await self._call(partial(self._consume, timeout_ms / 1000, max_records or 2000))
        if self._untold:  # before any record of them
            gained, self._gained, self._untold = self._gained, set(), False
            if self._listener is not None:
                await self._listener.on_partitions_assigned(gained)
        out: dict[TopicPartition, list[Record]] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaError(f"{self._config.get('group.id')}: {error}")
                log.warning("%s: %s", self._config.get("group.id"), error)
                continue
            record = Record(message)
            out.setdefault(TopicPartition(record.topic, record.partition), []).append(record)
        return out

    def _consume(self, timeout_s: float, max_records: int) -> list[Any]:
        """The first record waited for up to ``timeout_s``, then whatever else is
        already fetched, up to ``max_records`` (librdkafka's batch call would wait out
        the whole timeout for a full batch: a trickle's latency)."""
        consumer = self._consumer
        if consumer is None or self._closed:
            return []
        first = consumer.consume(1, timeout_s)
        messages = list(first)
        if first and max_records > 1:
            messages += consumer.consume(max_records - 1, 0)
        self._note_highwater(consumer)
        return messages

    def _note_highwater(self, consumer: Any) -> None:
        """The partitions' high watermarks as librdkafka last fetched them, noted on
        this thread: asking for them on the event loop's thread blocked it while this
        one waited in a rebalance for the loop (a deadlock)."""
        for tp in list(self._assigned):
            try:
                _, high = consumer.get_watermark_offsets(
                    RdPartition(tp.topic, tp.partition), cached=True
                )
            except KafkaException:
                continue
            if high is not None and high >= 0:
                self._highwater[tp] = int(high)

    def assignment(self) -> set[TopicPartition]:
        """Partitions assigned whose listener has run (a table recovered, the read model
        caught up): the worker's readiness counts only these."""
        return self._assigned - self._gained

    # --- offsets ----------------------------------------------------------------------

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        consumer = self._consumer
        if consumer is None:
            raise CommitFailedError("the consumer is stopped")
        rd = [RdPartition(tp.topic, tp.partition, offset) for tp, offset in offsets.items()]
        try:
            done = await self._call(partial(consumer.commit, offsets=rd, asynchronous=False))
        except KafkaException as exc:  # a rebalance took them, the coordinator moved
            raise CommitFailedError(str(exc)) from exc
        failed = [p for p in done or () if p.error is not None]
        if failed:
            raise CommitFailedError(f"{failed[0].topic}-{failed[0].partition}: {failed[0].error}")

    async def committed(self, tp: TopicPartition) -> int | None:
        consumer = self._consumer
        assert consumer is not None
        found = await self._call(
            partial(consumer.committed, [RdPartition(tp.topic, tp.partition)], 30)
        )
        offset = found[0].offset if found else OFFSET_INVALID
        return None if offset < 0 else int(offset)

    def highwater(self, tp: TopicPartition) -> int | None:
        return self._highwater.get(tp)

    async def stop(self) -> None:
        if self._consumer is None or self._thread is None:
            return
        # On the consumer's thread, after a read in progress: closing leaves the group
        # (the listener's revoke runs first).
        try:
            await self._call(self._close)
        finally:
            self._requests.put(_STOP)

    def _close(self) -> None:
        consumer = self._consumer
        if consumer is not None and not self._closed:
            self._closed = True
            consumer.close()


_STOP = object()


def _run(request: tuple[Callable[[], Any], concurrent.futures.Future[Any]]) -> None:
    function, result = request
    try:
        result.set_result(function())
    except BaseException as exc:
        result.set_exception(exc)


def librdkafka_consumer_config(
    bootstrap: str,
    group_id: str,
    *,
    fetch_max_wait_ms: int,
    fetch_min_bytes: int,
    session_timeout_ms: int,
    heartbeat_interval_ms: int,
    max_poll_interval_ms: int,
    read_committed: bool,
    security: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "client.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": fetch_max_wait_ms,
        "fetch.min.bytes": fetch_min_bytes,
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": heartbeat_interval_ms,
        "max.poll.interval.ms": max_poll_interval_ms,
        "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        **dict(security or {}),
    }
