"""Rebuild read models from the log.

A group-less consumer reads ``kefu.events`` from the beginning of every partition up
to the end offsets seen at the start (so a replay finishes while traffic goes on),
keeps the events that pass the filter, and applies them with the projections' own
rules: the Redis model folded per conversation (``projections.redis_fold``: the
contents the live script leaves, written once per conversation and batch) and
``row_of`` + an insert for ClickHouse. Both are idempotent, so replaying over a live
model changes nothing; ``reset`` first drops what the filter covers, so the model is
rebuilt from the log alone.

A Kafka record holds one event (records written before commits) or a ``Commit``: the
events of one decision, possibly of several conversations of its partition. Each
event is replayed on its own, with its own bytes; its position is its record's.

The stages overlap: a task reads and decodes batches into a bounded queue while the
targets write the previous ones, and each target keeps one write in flight (Redis:
one script call per 100 conversations; ClickHouse: inserts of ``batch`` rows) while it
prepares the next, so Kafka, the decoder and both stores work at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, cast

import clickhouse_connect
import httpx
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from projections.clickhouse_events import compact_rows, delete_sql, insert_compact_rows, row_of
from projections.redis_fold import FoldingWriter
from projections.redis_rebuild import holding_the_model
from schemas.codec import CODEC, DecodeError
from schemas.keys import tenant_prefix
from schemas.records import Event, QueueEvent, Record, as_projected
from schemas.topics import TopicNames

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with how many Kafka records were read since last


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    tenant: str = ""
    conversation: str = ""
    since_ms: int | None = None  # occurred_at >= since
    until_ms: int | None = None  # occurred_at < until

    def matches(self, fields: Mapping[str, Any], kind: type[Record] | None = None) -> bool:
        """For an event's fields (a conversation's or a queue's event) and its class."""
        if self.tenant and fields["tenant_id"] != self.tenant:
            return False
        if self.conversation and (
            fields.get("conversation_id") != self.conversation
            or (kind is not None and not issubclass(kind, Event))
        ):
            return False  # a queue's own history is not one conversation's, even where
            # its events name the conversation (ConversationEnqueued, ...)
        if self.since_ms is not None and fields["occurred_at"] < self.since_ms:
            return False
        return self.until_ms is None or fields["occurred_at"] < self.until_ms


class LogRecord(NamedTuple):
    """One per event replayed: a NamedTuple, at half the cost of a frozen dataclass.
    It holds the decoded fields; the record is built only where it is needed (the
    live script's path), not for the ClickHouse rows or the Redis fold. ``raw`` is the
    event's own bytes; ``partition`` and ``offset`` its Kafka record's (a commit's
    events share them)."""

    kind: type[Event] | type[QueueEvent]
    fields: dict[str, Any]
    raw: bytes
    partition: int
    offset: int
    appended_at: int | None = None  # its Kafka record's timestamp

    @property
    def event(self) -> Event | QueueEvent:
        """The event as the read models take it (``schemas.records.as_projected``: a
        reply at the time its record reached the log), as the live projection does."""
        event = as_projected(self.kind.from_avro(self.fields), self.appended_at)
        return cast(Event | QueueEvent, event)


@dataclass(slots=True)
class ReplayStats:
    read: int = 0  # events read from the log (a commit holds several)
    records: int = 0  # Kafka records read
    matched: int = 0
    applied: int = 0
    undecodable: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.read / self.seconds if self.seconds else 0.0


# Events per batch the reader hands over, about: the Redis fold writes a conversation
# once a batch, so in a log of many conversations at once bigger batches write less
# (20,000 conversations interleaved, one process: 21,900 events/s at 20,000, 37,500 at
# 40,000, 38,300 at 80,000); memory is ~3 KB an event held (read ahead, in flight).
BATCH_EVENTS = 40_000


class LogReader:
    """Reads topics (the conversations' and the queues' histories) from the beginning
    with no consumer group (commits nothing); with ``ranges``, only those offsets
    ``[start, end)`` of those partitions (clamped to what the log holds)."""

    def __init__(
        self,
        bootstrap: str,
        topics: str | Sequence[str],
        fetch_max_bytes: int = 64 << 20,
        kafka_options: Mapping[str, Any] | None = None,
        share: tuple[int, int] = (0, 1),
        ranges: Mapping[TopicPartition, tuple[int, int]] | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._ranges = dict(ranges) if ranges is not None else None
        # (i, n): only partitions p with p % n == i, so n readers split a replay.
        self._share = share
        self._kafka_options = dict(kafka_options or {})
        self._topics = [topics] if isinstance(topics, str) else list(topics)
        self._fetch_max_bytes = fetch_max_bytes
        self.total = 0  # records in range, known once ``batches`` starts
        self.ends: dict[TopicPartition, int] = {}  # where each partition was read to

    async def batches(
        self, flt: ReplayFilter, stats: ReplayStats, progress: Progress | None = None
    ) -> AsyncIterator[list[LogRecord]]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=self._fetch_max_bytes,
            max_partition_fetch_bytes=16 << 20,
            **self._kafka_options,
        )
        await consumer.start()
        try:
            index, of = self._share
            partitions = [
                tp
                for topic in self._topics
                for tp in await _partitions(consumer, topic)
                if tp.partition % of == index
            ]
            if self._ranges is not None:
                partitions = [tp for tp in partitions if tp in self._ranges]
            consumer.assign(partitions)
            starts = await consumer.beginning_offsets(partitions)
            ends = await consumer.end_offsets(partitions)
            for tp, (start, end) in (self._ranges or {}).items():
                if tp in starts:
                    starts[tp] = max(starts[tp], start)
                    ends[tp] = max(starts[tp], min(ends[tp], end))
            self.ends = dict(ends)
            remaining = {tp for tp in partitions if ends[tp] > starts[tp]}
            self.total = sum(ends[tp] - starts[tp] for tp in partitions)
            for tp in partitions:
                consumer.seek(tp, starts[tp])
            key = flt.conversation.encode() if flt.conversation else None
            everything = flt == ReplayFilter()
            while remaining:
                # About BATCH_EVENTS events a batch, whatever a record holds (a commit
                # holds ~2): memory goes by events.
                per_record = stats.read / stats.records if stats.records else 1.0
                fetched = await consumer.getmany(
                    *remaining,
                    timeout_ms=1000,
                    max_records=max(1_000, int(BATCH_EVENTS / max(per_record, 1.0))),
                )
                out: list[LogRecord] = []
                for tp, records in fetched.items():
                    kept = [r for r in records if r.offset < ends[tp]]
                    stats.records += len(kept)
                    if progress:
                        progress(len(kept))
                    for record in kept:
                        # A one-event record's key is its conversation: skip others
                        # before decoding. A commit may hold several conversations.
                        if (
                            key is not None
                            and record.key != key
                            and not CODEC.is_commit(record.value or b"")
                        ):
                            stats.read += 1
                            continue
                        if everything:
                            out += _decode(record, stats)
                        else:
                            out += [
                                e for e in _decode(record, stats) if flt.matches(e.fields, e.kind)
                            ]
                # Positions, not last offsets: control records leave gaps at the end.
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
                        consumer.pause(tp)
                stats.matched += len(out)
                if out:
                    yield out
        finally:
            await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    found = consumer.partitions_for_topic(topic)
    if not found:
        # A group-less consumer has no subscription, so the client's metadata lacks the
        # topic; the full metadata names every partition.
        cluster = await consumer._client.fetch_all_metadata()
        found = cluster.partitions_for_topic(topic)
    if not found:
        raise RuntimeError(f"no topic {topic!r}")
    return [TopicPartition(topic, p) for p in sorted(found)]


def _decode(record: ConsumerRecord[bytes, bytes], stats: ReplayStats) -> list[LogRecord]:
    """The events of one Kafka record (one, or a commit's), each with its own bytes."""
    value = record.value or b""
    try:
        raws = CODEC.unpack(value)
    except DecodeError as exc:
        return _skip(record, stats, exc.reason)
    if not raws:
        return _skip(record, stats, "an empty commit")
    stats.read += len(raws)
    out = []
    for raw in raws:
        try:
            kind, fields = CODEC.decode_fields(raw)
        except DecodeError as exc:
            stats.undecodable += 1
            _warn(record, exc.reason)
            continue
        replayed = _REPLAYED.get(kind)
        if replayed is None:
            replayed = _REPLAYED[kind] = issubclass(kind, Event | QueueEvent)
        if not replayed:
            stats.undecodable += 1
            continue
        out.append(
            LogRecord(
                cast(_EventClass, kind),
                fields,
                raw,
                record.partition,
                record.offset,
                record.timestamp,
            )
        )
    return out


# Whether a record class is an event the read models take: a lookup, not issubclass.
_REPLAYED: dict[type[Record], bool] = {}
_EventClass = type[Event] | type[QueueEvent]


def _skip(record: ConsumerRecord[bytes, bytes], stats: ReplayStats, reason: str) -> list[LogRecord]:
    stats.read += 1
    stats.undecodable += 1
    _warn(record, reason)
    return []


def _warn(record: ConsumerRecord[bytes, bytes], reason: str) -> None:
    # The live projections dead-lettered it already; a replay only counts it.
    log.warning("replay skips %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)


class Target(Protocol):
    name: str

    async def reset(self, flt: ReplayFilter) -> None: ...

    async def apply(self, records: Sequence[LogRecord]) -> None:
        """Take a batch, in log order; the write may still be in flight on return."""

    async def flush(self) -> None:
        """Every batch taken is stored."""

    def exclusive(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held from a reset to the last write: live writers that a reset would race
        wait meanwhile."""


class _OneInFlight:
    """One write at a time, in order, while the caller prepares the next."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    async def submit(self, write: Awaitable[None]) -> None:
        await self.drain()
        self._task = asyncio.ensure_future(write)

    async def drain(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await task  # its failure surfaces here

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class RedisTarget:
    name = "redis"

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self.writer = FoldingWriter(client)
        self._writes = _OneInFlight()

    async def reset(self, flt: ReplayFilter) -> None:
        if flt.since_ms is not None or flt.until_ms is not None:
            raise ValueError("reset rebuilds whole conversations: drop --from/--to with it")
        if flt.conversation:
            from schemas.keys import conversation_key, messages_key

            tenants = [flt.tenant] if flt.tenant else await self._tenants_of(flt.conversation)
            for tenant in tenants:
                await self._redis.delete(
                    conversation_key(tenant, flt.conversation),
                    messages_key(tenant, flt.conversation),
                )
                # Its entries in the tenant's indexes are rewritten with the same scores.
            return
        pattern = f"{tenant_prefix(flt.tenant)}*" if flt.tenant else "kefu:*"
        batch: list[bytes] = []
        async for key in self._redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await self._redis.unlink(*batch)
                batch.clear()
        if batch:
            await self._redis.unlink(*batch)

    async def _tenants_of(self, conversation: str) -> list[str]:
        found = []
        async for key in self._redis.scan_iter(match=f"kefu:*:conv:{conversation}", count=1000):
            found.append(key.decode().split(":")[1])
        return found

    def exclusive(self) -> contextlib.AbstractAsyncContextManager[None]:
        # A live batch between the reset and the replay would put a later seq in an
        # emptied hash, and the seq guards would refuse the history before it.
        return holding_the_model(self._redis)

    async def apply(self, records: Sequence[LogRecord]) -> None:
        # Folded here, while the previous batch is written.
        prepared = self.writer.prepare(records)
        await self._writes.submit(self.writer.write(prepared))

    async def flush(self) -> None:
        await self._writes.drain()


class ClickHouseTarget:
    """Writes through the chdb owner's loopback endpoint (embedded) or straight to a
    server: only one process may open a chdb data directory."""

    name = "clickhouse"

    def __init__(self, url: str, database: str, query_port: int, batch: int = 100_000) -> None:
        self._embedded = url.startswith("chdb://")
        self._base = f"http://127.0.0.1:{query_port}"
        self._url = url
        self._database = database
        self._batch = batch
        self._client: Any = None
        self._http = httpx.AsyncClient(base_url=self._base, timeout=300)
        # Rows wait here until a full insert: each insert is a part ClickHouse merges.
        self._rows: list[list[Any]] = []
        self._writes = _OneInFlight()

    def _server(self) -> Any:
        if self._client is None:
            self._client = clickhouse_connect.get_client(dsn=self._url)
        return self._client

    async def reset(self, flt: ReplayFilter) -> None:
        if self._embedded:
            body = {
                "tenant": flt.tenant,
                "conversation": flt.conversation,
                "since_ms": flt.since_ms,
                "until_ms": flt.until_ms,
            }
            response = await self._http.post("/events/delete", json=body)
            _check(response)
        else:
            self._server().command(
                delete_sql(self._database, flt.tenant, flt.conversation, flt.since_ms, flt.until_ms)
            )

    def exclusive(self) -> contextlib.AbstractAsyncContextManager[None]:
        # Rows fold by (tenant, conversation, seq) (ReplacingMergeTree): a live insert
        # racing the reset merges with the replayed copy, so nothing needs holding.
        return contextlib.nullcontext()

    async def apply(self, records: Sequence[LogRecord]) -> None:
        self._rows.extend(
            row_of(r.kind, r.fields, r.partition, r.offset, r.raw, r.appended_at) for r in records
        )
        if len(self._rows) >= self._batch:
            await self._send()

    async def flush(self) -> None:
        if self._rows:
            await self._send()
        await self._writes.drain()

    async def _send(self) -> None:
        rows, self._rows = self._rows, []
        if self._embedded:
            # Encoded here, before the write is queued: the event loop sends while the
            # owner inserts the previous batch.
            await self._writes.submit(self._post(compact_rows(rows)))
        else:
            await self._writes.submit(asyncio.to_thread(self._insert, compact_rows(rows)))

    async def _post(self, body: bytes) -> None:
        _check(await self._http.post("/events", content=body))

    def _insert(self, body: bytes) -> None:
        insert_compact_rows(self._server(), self._database, body)

    async def close(self) -> None:
        self._writes.cancel()
        await self._http.aclose()
        if self._client is not None:
            self._client.close()


def _check(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise RuntimeError(f"clickhouse owner: {response.status_code} {response.text[:500]}")


async def replay(
    reader: LogReader,
    targets: Sequence[Target],
    flt: ReplayFilter,
    reset: bool = False,
    progress: Progress | None = None,
    read_ahead: int = 2,
) -> ReplayStats:
    """Apply the log's events that pass ``flt`` to every target, in log order per
    partition (so per conversation)."""
    stats = ReplayStats()
    started = time.perf_counter()
    async with reset_held(targets, flt, reset):
        await _replay_into(reader, targets, flt, stats, progress, read_ahead)
    stats.seconds = time.perf_counter() - started
    return stats


@contextlib.asynccontextmanager
async def reset_held(
    targets: Sequence[Target], flt: ReplayFilter, reset: bool
) -> AsyncIterator[None]:
    """With ``reset``: each target's ``exclusive`` hold, then its reset, for the body
    (the replay); without, nothing."""
    async with contextlib.AsyncExitStack() as held:
        if reset:
            for target in targets:
                await held.enter_async_context(target.exclusive())
                await target.reset(flt)
        yield


async def _replay_into(
    reader: LogReader,
    targets: Sequence[Target],
    flt: ReplayFilter,
    stats: ReplayStats,
    progress: Progress | None,
    read_ahead: int,
) -> None:
    # A few batches read ahead: Kafka and the decoder run while the targets write.
    queue: asyncio.Queue[list[LogRecord] | None] = asyncio.Queue(maxsize=read_ahead)

    async def read() -> None:
        try:
            async for batch in reader.batches(flt, stats, progress):
                await queue.put(batch)
        finally:
            await queue.put(None)

    reading = asyncio.create_task(read())
    try:
        with _no_collections():
            batches = 0
            while (batch := await queue.get()) is not None:
                await asyncio.gather(*(target.apply(batch) for target in targets))
                stats.applied += len(batch)
                batches += 1
                if batches % COLLECT_EVERY == 0:
                    gc.collect(1)  # what cycles the batches left, now and then
            await reading  # a reader failure surfaces here
            await asyncio.gather(*(target.flush() for target in targets))
    finally:
        if not reading.done():
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading


# Batches between collections of the young generations during a replay.
COLLECT_EVERY = 64


@contextlib.contextmanager
def _no_collections() -> Iterator[None]:
    """A replay holds batches of tens of thousands of decoded events: with the default
    thresholds the cyclic collector walks them again and again (~20 % of the CPU), and
    collecting every 100,000 allocations still cost ~10 % (1.5-2.3 µs an event, A/B in
    one process). Its objects are freed by their counts (decoded fields, folds, rows:
    no cycles), so the collector is off for the replay, and the replay collects the
    young generations every ``COLLECT_EVERY`` batches itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def replay_topics(names: TopicNames) -> list[str]:
    """Every history the read models are built from."""
    return [names.events, names.queue_events]
