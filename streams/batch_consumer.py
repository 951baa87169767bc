"""A batch consumer driven inside the Faust app: the worker's hot path.

Faust's per-event stream (one trip through its conductor, channel queue and ack
bookkeeping per record, fetched by a consumer thread of its own) was measured to be
the wall on the hot path (bench/RESULTS.md "Hot path"). This is the shape that
replaces it there: an aiokafka consumer in a group of its own, on the Faust app's
event loop, started with the app as a runtime dependency (after table recovery) and
stopped before its producer. Each ``getmany`` batch goes through ``apply``; every
``commit_interval_s`` (and before partitions are given up) a checkpoint runs, the
commit order written out in one function (``_complete``):

1. the batches' effects (``apply``: sends handed to the producer, stores written);
   then, between two batches, what the checkpoint will commit is captured: the
   offsets applied (never past ``held``: work still running in the background), the
   sends made, and ``commit_writes`` (a table's changelog as of this moment);
2. the producer flushed and every captured send checked: the effects are on the log;
3. the captured ``commit_writes`` sent (only now, so a changelog never records a
   state whose events are not on the log), flushed and checked too;
4. the offsets committed.

Steps 2-4 run in the background while the next batches are applied (one checkpoint
at a time): waiting for their round trips in the read loop stalled every message
that arrived meanwhile (the p99 at a steady rate). A rebalance and a stop wait for
the checkpoint in flight, then run one more to the end (``checkpoint``).

A send the producer gave up on (after its own retries), or any error escaping
``apply``, ends the process (``_fail``): its in-memory state is ahead of the log.

A crash anywhere before 4 makes the batch come again, and every effect absorbs a
repeat (command ids, event seqs, idempotency keys). Each partition arrives in order
and resumes from its committed offset, so the hole repair Faust's shared consumer
needs (``streams.consumer``) has no work here. A rebalance waits for the batch in
flight and its checkpoint (``revoked``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from mode import Service

from schemas.codec import CODEC
from schemas.records import Record
from streams import telemetry
from streams.app import KefuApp, StreamsConfig
from streams.faust_private import topic_partitions
from streams.hot_consumer import HotConsumer, librdkafka_consumer_config

log = logging.getLogger(__name__)


class HotPathFailed(RuntimeError):
    """A send of the hot path the producer gave up on."""


EXIT_HOT_PATH_FAILED = 70  # EX_SOFTWARE: the supervisor (compose, the tests) restarts it


@dataclass(frozen=True, slots=True)
class BatchConfig:
    group_id: str
    topics: tuple[str, ...]
    max_records: int = 2000  # per fetch: bounds a batch's effects (and a redelivery)
    poll_ms: int = 100
    # A checkpoint (changelog, flush, commit) at most this often, not after every
    # batch: at a steady trickle each batch holds a record or two, and waiting for the
    # flush and the commit round trips after each put them into every message's
    # latency. A crash repeats up to this much work, which every effect absorbs.
    commit_interval_s: float = 0.5
    # Seeds a new group from this one's committed offsets (the Faust group that read
    # these topics before), so an upgrade neither skips nor repeats history.
    legacy_group_id: str = ""
    # A batch gives the event loop a turn at least this often (``fair_turn``): the
    # process's other consumers share the loop with it.
    turn_s: float = 0.005


CommitWrites = Callable[[], Awaitable[list[Any]]]  # sends them; their delivery futures


@dataclass(frozen=True, slots=True)
class _Captured:
    """What one checkpoint commits, taken between two batches."""

    offsets: dict[TopicPartition, int]
    sent: list[Any]
    writes: CommitWrites | None


class TopicSender:
    """``send(key=, value=, headers=)`` like a Faust topic, straight to a producer with
    the surface of Faust's (``send(topic, key, value, partition, timestamp, headers)``:
    the worker's ``streams.hot_producer.HotProducer``, or the Faust app's): it returns
    the delivery future without waiting for the broker (a Faust topic's ``send``
    outside an agent waits for each ack), so a batch's sends are in flight together
    and the checkpoint's flush waits for them all. Records are encoded with the Avro
    codec; headers get the open hop's trace context."""

    def __init__(self, producer: Callable[[], Any], topic: str) -> None:
        self._producer = producer  # taken when first used (Faust makes its own lazily)
        self.topic = topic

    async def send(self, key: str, value: Record, headers: Any = None) -> Any:
        tenant_id = getattr(value, "tenant_id", None)
        return await self._producer().send(
            self.topic,
            key.encode(),
            CODEC.encode(value),
            None,
            None,
            telemetry.outgoing(headers, tenant_id),
        )


def hot_producer_of(kefu: KefuApp) -> Callable[[], Any]:
    """What the hot path sends with: ``kefu``'s hot producer, else the Faust app's
    (taken when first used: Faust makes its own lazily)."""
    return lambda: kefu.hot_producer if kefu.hot_producer is not None else kefu.app.producer


def direct_sends(kefu: KefuApp, producer: Any = None) -> KefuApp:
    """``kefu`` whose conversation, command and routing sends are ``TopicSender``s on
    ``producer`` (None: the Faust app's): for the batch consumers (Faust's own agents
    keep the Faust topics)."""
    names = kefu.config.topics
    hot = dataclasses.replace(kefu, hot_producer=producer)
    chosen = hot_producer_of(hot)
    return dataclasses.replace(
        hot,
        events_out=TopicSender(chosen, names.events),
        commands_out=TopicSender(chosen, names.commands),
        routing_out=TopicSender(chosen, names.routing),
    )


class _Rebalances(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: BatchConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._owner.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._owner.assigned(set(assigned))


class BatchConsumer(Service):
    """Subclasses implement ``apply``; see the module docstring for the order."""

    def __init__(
        self,
        streams: StreamsConfig,
        config: BatchConfig,
        app: Any,
        producer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._streams = streams
        self._config = config
        self._app = app  # the Faust app
        # What the effects are sent with and flushed on: the worker's hot producer
        # (streams.hot_producer), or the Faust app's when None (tests' small stacks).
        self._producer = producer
        self._consumer: Any = None  # aiokafka's, or streams.hot_consumer's
        self._lock = asyncio.Lock()  # a batch and a rebalance never overlap
        self._processed: dict[TopicPartition, int] = {}  # next offset, effects done
        self._committed: dict[TopicPartition, int] = {}
        self._sent: list[Any] = []  # delivery futures of the sends since the checkpoint
        self._checkpoint_due = 0.0  # monotonic
        self._in_flight: asyncio.Task[None] | None = None  # steps 2-4 of a checkpoint
        self.records = 0  # records applied by this process (tests, metrics)
        self._turn_ends = 0.0  # perf_counter
        # The group gave this member its share (maybe none) and the share is ready:
        # before that, records of this consumer's topics are not handled at all.
        self.joined = False

    # --- what subclasses provide -----------------------------------------------------

    async def apply(self, batch: Mapping[TopicPartition, Sequence[Any]]) -> None:
        raise NotImplementedError

    def commit_writes(self) -> CommitWrites | None:
        """Writes made once per checkpoint (a table's changelog), captured now, between
        two batches, and sent by the checkpoint after the flush of the effects."""
        return None

    def held(self, tp: TopicPartition) -> int | None:
        """The lowest offset of ``tp`` whose work still runs (None: nothing)."""
        return None

    async def on_assigned(self, tps: set[TopicPartition]) -> None:
        """Partitions gained (a table recovers them here, before any record of them)."""

    def on_revoked(self, tps: set[TopicPartition]) -> None:
        """Partitions lost, after their last checkpoint."""

    async def fair_turn(self) -> None:
        """Called between records of a batch: a turn for every other task once this
        one has had the loop for ``turn_s``. A fetched batch's records need no I/O to
        read and their sends are only queued, so a batch may never suspend by itself:
        under a backlog of commands the events reader (projection, delivery) would
        wait for the whole backlog."""
        if time.perf_counter() >= self._turn_ends:
            await asyncio.sleep(0)
            self._turn_ends = time.perf_counter() + self._config.turn_s

    def track(self, futures: Iterable[Any]) -> None:
        """Delivery futures of sends this batch made: checked after the flush, so a
        send the producer gave up on never has its offsets committed."""
        self._sent.extend(f for f in futures if isinstance(f, asyncio.Future))

    # --- lifecycle -------------------------------------------------------------------

    async def on_start(self) -> None:
        streams = self._streams
        await self._seed_offsets()
        consumer: Any
        if streams.librdkafka_consumer:  # streams/hot_consumer.py: off the event loop
            consumer = HotConsumer(
                librdkafka_consumer_config(
                    streams.broker,
                    self._config.group_id,
                    fetch_max_wait_ms=streams.fetch_max_wait_ms,
                    fetch_min_bytes=streams.fetch_min_bytes,
                    session_timeout_ms=int(streams.session_timeout * 1000),
                    heartbeat_interval_ms=int(streams.heartbeat_interval * 1000),
                    max_poll_interval_ms=600_000,
                    read_committed=streams.processing_guarantee == "exactly_once",
                    security=streams.librdkafka_options,
                )
            )
            await consumer.start()
            consumer.subscribe(list(self._config.topics), listener=_Rebalances(self))
            self._consumer = consumer
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=streams.broker,
            group_id=self._config.group_id,
            client_id=self._config.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=streams.fetch_max_wait_ms,
            fetch_min_bytes=streams.fetch_min_bytes,
            session_timeout_ms=int(streams.session_timeout * 1000),
            heartbeat_interval_ms=int(streams.heartbeat_interval * 1000),
            rebalance_timeout_ms=int(streams.rebalance_timeout * 1000),
            # A batch waits for channels (bounded) and Redis (waited out): generous.
            max_poll_interval_ms=600_000,
            isolation_level="read_committed"
            if streams.processing_guarantee == "exactly_once"
            else "read_uncommitted",
            **dict(streams.kafka_options),
        )
        await consumer.start()
        consumer.subscribe(list(self._config.topics), listener=_Rebalances(self))
        self._consumer = consumer

    async def on_stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        async with self._lock:
            try:
                await self.checkpoint(consumer)
            except Exception as exc:
                self._fail(exc)
        await consumer.stop()

    @Service.task
    async def _read(self) -> None:
        while not self.should_stop:
            consumer = self._consumer
            if consumer is None:
                await asyncio.sleep(0.05)
                continue
            try:
                fetched = await consumer.getmany(
                    timeout_ms=self._config.poll_ms, max_records=self._config.max_records
                )
            except KafkaError as exc:  # the broker away: fetch again
                log.warning("%s: fetch failed: %r", self._config.group_id, exc)
                await asyncio.sleep(0.5)
                continue
            try:
                await self._step(consumer, fetched)
            except Exception as exc:  # whatever it is, this process must stop
                self._fail(exc)
            await self.fair_turn()

    async def _step(self, consumer: Any, fetched: Mapping[Any, Any]) -> None:
        async with self._lock:
            owned = consumer.assignment()
            batch = {tp: records for tp, records in fetched.items() if tp in owned and records}
            if batch:
                await self.apply(batch)
                for tp, records in batch.items():
                    self._processed[tp] = records[-1].offset + 1
                self.records += sum(len(records) for records in batch.values())
            if time.monotonic() >= self._checkpoint_due and self._in_flight is None:
                captured = self._capture()
                if captured is not None:
                    task = asyncio.create_task(self._complete(consumer, captured))
                    task.add_done_callback(self._checkpoint_done)
                    self._in_flight = task

    def _checkpoint_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight = None
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())  # type: ignore[arg-type]

    def _fail(self, exc: BaseException) -> None:
        """A batch that cannot complete (a send the producer gave up on, a bug that
        escaped the per-record dead-lettering) leaves this process's state ahead of
        the log: it must not go on, nor commit. It exits at once, uncommitted work
        comes again to the restarted worker (or the partitions' next owner), which
        recovers its table from the changelog (written only after the events)."""
        log.critical("%s: the hot path failed; exiting", self._config.group_id, exc_info=exc)
        logging.shutdown()
        os._exit(EXIT_HOT_PATH_FAILED)

    # --- the commit order --------------------------------------------------------------

    async def checkpoint(self, consumer: Any) -> None:
        """A whole checkpoint, now (no batch may run: the caller holds the lock): the
        one in flight finishes first."""
        await self._settled()
        captured = self._capture()
        if captured is not None:
            await self._complete(consumer, captured)

    async def _settled(self) -> None:
        task = self._in_flight
        if task is not None:
            await asyncio.wait([task])  # its failure ends the process (_checkpoint_done)
            self._in_flight = None

    def _capture(self) -> _Captured | None:
        """Step 1's end (module docstring): what the next commit holds, taken between
        two batches; None when nothing was applied since the last commit."""
        self._checkpoint_due = time.monotonic() + self._config.commit_interval_s
        offsets: dict[TopicPartition, int] = {}
        for tp, done in self._processed.items():
            held = self.held(tp)
            offset = done if held is None else min(done, held)
            if offset > self._committed.get(tp, -1):
                offsets[tp] = offset
        if not offsets:
            return None
        sent, self._sent = self._sent, []
        return _Captured(offsets, sent, self.commit_writes())

    async def _complete(self, consumer: Any, captured: _Captured) -> None:
        """Steps 2-4. A commit refused by a rebalance is only logged: the records come
        again to the partition's next owner, and every effect absorbs the repeat."""
        # The effects on the log first, then the states that record them: a changelog
        # never holds a state whose events did not make it (the command would be
        # dropped as applied when it comes again).
        await self._flushed(captured.sent)
        written = await captured.writes() if captured.writes is not None else []
        await self._flushed(written)
        try:
            await consumer.commit(captured.offsets)
        except KafkaError as exc:
            log.warning("%s: commit refused (%r): records come again", self._config.group_id, exc)
            return
        self._committed.update(captured.offsets)

    async def _flushed(self, sent: list[Any]) -> None:
        """Flush the producer and check ``sent``: a send it gave up on (after its own
        retries) is fatal (``HotPathFailed``)."""
        producer = self._producer if self._producer is not None else self._app.producer
        await producer.flush()
        sent = [f for f in sent if isinstance(f, asyncio.Future)]
        failed = [f.exception() for f in sent if f.done() and not f.cancelled() and f.exception()]
        if failed:
            group = self._config.group_id
            raise HotPathFailed(f"{group}: {len(failed)} sends failed: {failed[0]!r}")

    # --- rebalances ------------------------------------------------------------------

    async def revoked(self, gone: set[TopicPartition]) -> None:
        consumer = self._consumer
        async with self._lock:  # the batch in flight finishes and commits first
            if consumer is not None:
                try:
                    await self.checkpoint(consumer)
                except Exception as exc:  # as in ``_read``: the state is ahead of the log
                    self._fail(exc)
            for tp in gone:
                self._processed.pop(tp, None)
                self._committed.pop(tp, None)
            self.on_revoked(gone)

    async def assigned(self, gained: set[TopicPartition]) -> None:
        names = ", ".join(sorted(f"{tp.topic}-{tp.partition}" for tp in gained))
        log.info("%s assigned %s", self._config.group_id, names or "nothing")
        async with self._lock:
            await self.on_assigned(gained)
        self.joined = True

    def assignment(self) -> set[TopicPartition]:
        consumer = self._consumer
        return set(consumer.assignment()) if consumer is not None else set()

    # --- upgrade ---------------------------------------------------------------------

    async def _seed_offsets(self) -> None:
        """A new group starts where the legacy group (Faust's agents) stopped, not at
        the beginning: history must not be delivered twice after an upgrade.

        Offsets are read through consumers (the coordinator lookup with its retries),
        not the admin client: its OffsetFetch ignores a response-level error such as
        "coordinator loading" and answers "no offsets", which would seed over offsets
        the group already has."""
        legacy = self._config.legacy_group_id
        if not legacy:
            return
        streams = self._streams
        options = dict(streams.kafka_options)
        seeder = AIOKafkaConsumer(
            bootstrap_servers=streams.broker,
            group_id=self._config.group_id,
            enable_auto_commit=False,
            **options,
        )
        previous = AIOKafkaConsumer(
            bootstrap_servers=streams.broker, group_id=legacy, enable_auto_commit=False, **options
        )
        await seeder.start()
        await previous.start()
        try:
            partitions = [
                TopicPartition(topic, partition)
                for topic in self._config.topics
                for partition in sorted(await topic_partitions(seeder, topic))
            ]
            for tp in partitions:
                if await seeder.committed(tp) is not None:
                    return  # the group has offsets of its own: never overwrite them
            offsets = {}
            for tp in partitions:
                offset = await previous.committed(tp)
                if offset is not None:
                    offsets[tp] = offset
            if offsets:
                seeder.assign(list(offsets))
                await seeder.commit(offsets)
                log.info("%s seeded from %s", self._config.group_id, legacy)
        finally:  # an error propagates: starting from scratch would redeliver history
            await previous.stop()
            await seeder.stop()

    # --- figures ---------------------------------------------------------------------

    def lag(self) -> list[tuple[str, int, int]]:
        """``(topic, partition, records not yet committed)`` per assigned partition."""
        consumer = self._consumer
        if consumer is None:
            return []
        out = []
        for tp in sorted(consumer.assignment()):
            highwater = consumer.highwater(tp)
            committed = self._committed.get(tp)
            if highwater is None or committed is None:
                continue
            out.append((tp.topic, tp.partition, max(0, highwater - committed)))
        return out
