"""Every event into ClickHouse, in batches, offsets committed after the batch is stored.

A Kafka record holds one event (records written before commits) or a ``Commit`` of
several (``CODEC.unpack``): one row per event either way, ``avro_base64`` the event's
own bytes. The events of one commit share a partition and offset, so the table's key
is the event's stream and seq (``events.sql``), never the log position: a redelivered
commit folds into the rows it made the first time.

The same clickhouse-connect client serves ``chdb://<dir>`` (the embedded engine) and
``http://host:8123`` (a server). chdb lets one process open a data directory, so in the
embedded stack this projector is that process; it also answers read-only queries for
the others (``projections.clickhouse_query``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import clickhouse_connect
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from projections.clickhouse_views import view_statements
from schemas import tracing
from schemas.codec import CODEC, DecodeError
from schemas.records import Event, Record, dead_letter, projected_ms
from schemas.sealing import redact_fields
from schemas.time import now_ms

log = logging.getLogger(__name__)
STAGE = "projection.clickhouse"  # the span name, as the workers' "projection.redis"

COLUMNS = (
    "event_id",
    "type",
    "tenant_id",
    "conversation_id",
    "seq",
    "occurred_at",
    "channel",
    "schema_version",
    "kafka_partition",
    "kafka_offset",
    "payload",
    "avro_base64",
)


def schema_statements(database: str) -> list[str]:
    ddl = (resources.files("projections") / "sql" / "events.sql").read_text("utf-8")
    return [
        f"CREATE DATABASE IF NOT EXISTS {database}",
        ddl.format(database=database),
        # Tables created before the archive column existed get it (empty for old rows).
        f"ALTER TABLE {database}.events ADD COLUMN IF NOT EXISTS avro_base64 String "
        "DEFAULT '' CODEC(ZSTD(3))",
        *view_statements(database),
    ]


def stream_of(kind: type[Record], fields: Mapping[str, Any]) -> str:
    """The stream a record's seq counts in: its conversation, or for an event of a
    queue (routing's queue events) ``queue:<queue>``, so the table key stays unique."""
    if issubclass(kind, Event) or "queue" not in fields:
        return str(fields.get("conversation_id", ""))
    return f"queue:{fields['queue']}"


def is_event(kind: type[Record], fields: Mapping[str, Any]) -> bool:
    """A conversation's event, or any other record with an event's envelope."""
    return issubclass(kind, Event) or all(
        name in fields for name in ("event_id", "tenant_id", "seq", "occurred_at")
    )


def row_of(
    kind: type[Record],
    fields: Mapping[str, Any],
    partition: int,
    offset: int,
    raw: bytes,
    appended_at: int | None = None,
) -> list[Any]:
    """The row of one event from its fields as decoded (``CODEC.decode_fields``): no
    record is built, and the payload is those fields. ``raw`` is its own bytes on the
    log (inside a commit too), kept for audits; ``partition``/``offset`` its record's,
    ``appended_at`` its record's timestamp: ``occurred_at`` is the time the read
    models take the event at (``schemas.records.projected_ms``: a reply's is when it
    reached the log), the payload and the bytes keep the event's own."""
    occurred_at = projected_ms(kind.__name__, fields["occurred_at"], appended_at)
    return [
        fields["event_id"],
        kind.__name__,
        fields["tenant_id"],
        stream_of(kind, fields),
        fields["seq"],
        # Seconds: DateTime64(3) reads a number as seconds. Exact: the shortest repr
        # of ms / 1000 is the ms with three decimals, which ClickHouse parses as text.
        occurred_at / 1000,
        str(fields.get("channel") or ""),
        fields["schema_version"],  # as written: old events keep their version
        partition,
        offset,
        orjson.dumps(fields, default=str).decode(),
        base64.b64encode(raw).decode("ascii"),
    ]


def row_for(event: Record, partition: int, offset: int, raw: bytes = b"") -> list[Any]:
    """The row of an event its bytes decode to (``raw`` or its encoding)."""
    kind, fields = CODEC.decode_fields(raw or CODEC.encode(event))
    return row_of(kind, fields, partition, offset, raw)


@dataclass(frozen=True, slots=True)
class Poison:
    """What of a Kafka record cannot be stored, and the bytes to dead-letter for it."""

    reason: str
    payload: bytes


def rows_of_record(
    partition: int, offset: int, value: bytes, max_bytes: int, appended_at: int | None = None
) -> tuple[list[list[Any]], list[Poison]]:
    """The rows of one Kafka record (one per event, old single-event record or commit)
    and what is poison in it. A bad event inside a commit is dead-lettered alone (its
    own bytes, the reason naming its place), so its siblings are still stored; a
    record over ``max_bytes`` or a commit that does not decode is poison whole."""
    if len(value) > max_bytes:
        reason = f"record of {len(value)} bytes is over the {max_bytes}-byte limit"
        return [], [Poison(reason, value[:max_bytes])]
    try:
        events = CODEC.unpack(value)
    except DecodeError as exc:
        return [], [Poison(exc.reason, value)]
    in_commit = f" of {len(events)} in a commit" if CODEC.is_commit(value) else ""
    rows: list[list[Any]] = []
    poison: list[Poison] = []
    for n, raw in enumerate(events, start=1):
        try:
            kind, fields = CODEC.decode_fields(raw)
            if not is_event(kind, fields):
                raise DecodeError(f"expected an event, got {kind.__name__}")
        except DecodeError as exc:
            where = f"event {n}{in_commit}: " if in_commit else ""
            poison.append(Poison(where + exc.reason, raw))
            continue
        rows.append(row_of(kind, fields, partition, offset, raw, appended_at))
    return rows, poison


def compact_rows(rows: Sequence[Sequence[Any]]) -> bytes:
    """Rows of ``row_for`` as a ClickHouse ``JSONCompactEachRow`` body (rows separated
    by commas). ClickHouse parses it in C++, where the Python client converted every
    value: ~11 µs of CPU per row became ~6 (chdb, 100,000 rows)."""
    return orjson.dumps(rows)[1:-1]


def insert_compact_rows(client: Any, database: str, body: bytes) -> None:
    """Insert a :func:`compact_rows` body through a clickhouse-connect client (chdb or a
    server): ClickHouse parses it."""
    client.raw_insert(f"{database}.events", list(COLUMNS), body, fmt="JSONCompactEachRow")


def delete_sql(
    database: str,
    tenant: str = "",
    conversation: str = "",
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> str:
    """Drop the rows a replay with the same filter rewrites (``kefu replay --reset``)."""
    from projections.clickhouse_views import quote

    where = ["1"]
    if tenant:
        where.append(f"tenant_id = {quote(tenant)}")
    if conversation:
        where.append(f"conversation_id = {quote(conversation)}")
    if since_ms is not None:
        where.append(f"occurred_at >= fromUnixTimestamp64Milli(toInt64({int(since_ms)}), 'UTC')")
    if until_ms is not None:
        where.append(f"occurred_at < fromUnixTimestamp64Milli(toInt64({int(until_ms)}), 'UTC')")
    return (
        f"ALTER TABLE {database}.events DELETE WHERE {' AND '.join(where)} "
        "SETTINGS mutations_sync = 2"
    )


def erased_in(rows: Sequence[Sequence[Any]]) -> list[tuple[str, str, int]]:
    """(tenant, conversation, seq) of each ``CustomerErased`` row among ``rows``."""
    return [(str(r[2]), str(r[3]), int(r[4])) for r in rows if r[1] == "CustomerErased"]


async def redact_conversation(
    store: ClickHouseStore, tenant: str, conversation: str, seq: int
) -> int:
    """The rows of the conversation's events before ``seq`` (a ``CustomerErased``)
    with every personal field of their payload erased, as a replay from the log (the
    customer's keys gone) would write them; rows changed. One mutation, waited for:
    the clear values leave the table's parts, not just the query results."""
    from projections.clickhouse_views import quote

    _, found = await store.query(
        f"SELECT DISTINCT seq, type, payload FROM {store.database}.events "
        "WHERE tenant_id = {t:String} AND conversation_id = {c:String} AND seq < {s:UInt64}",
        parameters={"t": tenant, "c": conversation, "s": seq},
    )
    changed: dict[int, str] = {}
    for row_seq, type_name, payload in found:
        try:
            fields = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if isinstance(fields, dict) and redact_fields(str(type_name), fields):
            changed[int(row_seq)] = orjson.dumps(fields, default=str).decode()
    if not changed:
        return 0
    seqs = ", ".join(str(n) for n in changed)
    payloads = ", ".join(quote(p) for p in changed.values())
    await store.command(
        f"ALTER TABLE {store.database}.events UPDATE payload = "
        f"transform(seq, CAST([{seqs}], 'Array(UInt64)'), [{payloads}], payload) "
        f"WHERE tenant_id = {quote(tenant)} AND conversation_id = {quote(conversation)} "
        f"AND seq IN ({seqs}) SETTINGS mutations_sync = 2"
    )
    return len(changed)


class ClickHouseStore:
    """One client on one thread: chdb is not safe to drive from several at once."""

    def __init__(self, url: str, database: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self._url = url
        self.database = database
        self._client: Any = None

    def _connect(self) -> Any:
        if self._client is None:
            self._client = clickhouse_connect.get_client(dsn=self._url)
            for statement in schema_statements(self.database):
                self._client.command(statement)
        return self._client

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> None:
        await self._run(self._connect)

    async def insert(self, rows: Sequence[Sequence[Any]]) -> None:
        if rows:  # nothing to send
            await self.insert_compact(compact_rows(rows))

    async def insert_compact(self, body: bytes) -> None:
        """Rows made by :func:`compact_rows`."""

        await self._run(lambda: insert_compact_rows(self._connect(), self.database, body))

    async def command(self, sql: str) -> None:
        await self._run(lambda: self._connect().command(sql))

    async def query(
        self, sql: str, readonly: bool = True, parameters: Mapping[str, Any] | None = None
    ) -> tuple[list[str], list[list[Any]]]:
        """``parameters`` fill the SQL's ``{name:Type}`` placeholders server-side (the
        engine binds them: values never become SQL text)."""

        def query() -> tuple[list[str], list[list[Any]]]:
            settings = {"readonly": 1} if readonly else {}
            result = self._connect().query(sql, parameters=parameters, settings=settings)
            return list(result.column_names), [list(r) for r in result.result_rows]

        result: tuple[list[str], list[list[Any]]] = await self._run(query)
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass(frozen=True, slots=True)
class ProjectorConfig:
    bootstrap: str
    events_topic: str
    deadletter_topic: str
    group_id: str
    batch_size: int = 5000
    batch_seconds: float = 0.5
    # More topics of events (routing's queue events): one consumer, same batches.
    extra_topics: tuple[str, ...] = ()
    # A record over this is poison (dead-lettered, bytes cut to it), as in the workers.
    max_record_bytes: int = 512 * 1024
    # aiokafka security options (SASL/TLS); empty = PLAINTEXT.
    kafka_options: Mapping[str, Any] = field(default_factory=dict)


def _trace_stored(
    records: Sequence[ConsumerRecord[bytes, bytes]], start_ns: int, end_ns: int
) -> None:
    """Each event's "stored in ClickHouse" leg (decode, insert, commit: the batch's
    time) as a span under the hop that produced it, so a message's trace shows when
    its events became queryable."""
    for record in records:
        attributes = {
            **tracing.kafka_attributes(record.topic, record.partition, record.offset),
            "kefu.batch_records": len(records),
        }
        tracing.finished_span_under(record.headers, STAGE, attributes, start_ns, end_ns)


class ClickHouseProjector:
    """Consume → decode → insert the batch → commit. A crash between insert and commit
    re-inserts the batch; the ReplacingMergeTree key (stream, seq: per event, not per
    log position) folds the twins together."""

    def __init__(self, config: ProjectorConfig, store: ClickHouseStore) -> None:
        self._config = config
        self._store = store
        self._stopping = asyncio.Event()
        self.stored = 0
        self.redacted = 0  # conversations redacted (CustomerErased)
        self._consumer: AIOKafkaConsumer | None = None
        self._done: dict[tuple[str, int], int] = {}  # next offset per partition, stored

    def lag(self) -> dict[tuple[str, ...], float]:
        """Records on the log not yet stored, per ``(topic, partition)`` this projector
        holds: the broker's high watermark (as of the last fetch) less the offset after
        the last stored record."""
        consumer = self._consumer
        if consumer is None:
            return {}
        found: dict[tuple[str, ...], float] = {}
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            done = self._done.get((tp.topic, tp.partition), highwater)
            found[(tp.topic, str(tp.partition))] = float(max(highwater - done, 0))
        return found

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            self._config.events_topic,
            *self._config.extra_topics,
            bootstrap_servers=self._config.bootstrap,
            group_id=self._config.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self._config.batch_size,
            **self._config.kafka_options,
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self._config.bootstrap, acks="all", **self._config.kafka_options
        )
        await consumer.start()
        await producer.start()
        self._consumer = consumer
        try:
            while not self._stopping.is_set():
                records = await self._next_batch(consumer)
                if not records:
                    continue
                started_ns = time.time_ns()
                rows = await self._rows(records, producer)
                if rows:
                    await self._insert_until_done(rows)
                    # A customer erased: what the table holds of them goes, before the
                    # commit (a crash in between redacts again: idempotent).
                    for tenant, conversation, seq in erased_in(rows):
                        await self._redact_until_done(tenant, conversation, seq)
                await consumer.commit()
                if tracing.enabled():
                    _trace_stored(records, started_ns, time.time_ns())
                self.stored += len(rows)
                for record in records:
                    key = (record.topic, record.partition)
                    self._done[key] = max(self._done.get(key, 0), record.offset + 1)
        finally:
            self._consumer = None
            await consumer.stop()
            await producer.stop()

    def stop(self) -> None:
        self._stopping.set()

    async def _next_batch(self, consumer: AIOKafkaConsumer) -> list[ConsumerRecord[bytes, bytes]]:
        """Up to ``batch_size`` records, gathered for up to ``batch_seconds`` after the
        first: every insert makes a part that ClickHouse merges later, so a trickle
        inserted fetch by fetch costs far more CPU than the same rows in one insert."""
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while len(records) < self._config.batch_size and not self._stopping.is_set():
            wait = self._config.batch_seconds if deadline is None else deadline - loop.time()
            if wait <= 0:
                break
            fetched = await consumer.getmany(
                timeout_ms=max(1, int(wait * 1000)),
                max_records=self._config.batch_size - len(records),
            )
            for batch in fetched.values():
                records.extend(batch)
            if records and deadline is None:
                deadline = loop.time() + self._config.batch_seconds
            elif not records:
                return records  # idle: let run() check for stop
        return records

    async def _rows(
        self, records: Sequence[ConsumerRecord[bytes, bytes]], producer: AIOKafkaProducer
    ) -> list[list[Any]]:
        rows: list[list[Any]] = []
        for record in records:
            value = record.value or b""
            made, poison = rows_of_record(
                record.partition,
                record.offset,
                value,
                self._config.max_record_bytes,
                record.timestamp,
            )
            rows += made
            for bad in poison:
                where = f"{record.topic}[{record.partition}]@{record.offset}"
                log.warning("dead-letter %s consumer=clickhouse reason=%s", where, bad.reason)
                letter = dead_letter(
                    source_topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                    reason=bad.reason,
                    consumer="projection.clickhouse",
                    failed_at=now_ms(),
                    payload=bad.payload,
                    key=record.key,
                )
                await producer.send_and_wait(
                    self._config.deadletter_topic, key=record.key, value=CODEC.encode(letter)
                )
        return rows

    async def _redact_until_done(self, tenant: str, conversation: str, seq: int) -> None:
        delay = 0.2
        while True:
            try:
                await redact_conversation(self._store, tenant, conversation, seq)
                self.redacted += 1
                return
            except Exception:
                log.exception("clickhouse redaction of %s failed; retrying", conversation)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _insert_until_done(self, rows: list[list[Any]]) -> None:
        """ClickHouse down means wait and retry, never skip: the offsets stay put."""
        delay = 0.2
        while True:
            try:
                await self._store.insert(rows)
                return
            except Exception:
                log.exception("clickhouse insert of %d rows failed; retrying", len(rows))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
