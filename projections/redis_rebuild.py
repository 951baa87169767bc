"""The Redis read model comes back from the log when Redis lost it.

Redis is a cache of the log: a ``FLUSHALL``, a new empty server or a restore of an old
snapshot would otherwise leave the read model with holes, and every later event would
be applied on top of them (its seq guard passes on an empty hash). So the model keeps
an epoch marker key (outside every tenant's prefix), and each batch of the live
projection is one ``MULTI``/``EXEC`` of batch-script calls that each check the marker
before writing (``redis_state.APPLY_IF_MARKED``): one round trip a batch, the check and
the writes atomic, so no flush falls between them and no ``WATCH`` is needed.

- marker present: the batch goes in;
- marker gone: nothing is written; one process (a ``SET NX`` lock, refreshed while it
  works) replays the whole log into Redis with the projection's own idempotent code
  (``projections.replay``), then sets the marker only if its lock survived (a flush
  during the rebuild drops the lock, and the rebuild starts over); the others wait
  for the marker. Live batches are held meanwhile, so no later seq lands before the
  history and the seq guards drop nothing they should not. Then the batch is sent
  again.

The script is called by its sha (``EVALSHA``), loaded once with ``SCRIPT LOAD`` and
again after a ``NOSCRIPT`` (Redis restarted, ``SCRIPT FLUSH``): every call of a batch
runs the one script in one ``EXEC``, so they all failed alike and the batch is resent.

Nothing is duplicated: every write is guarded by the conversation's (or queue's) seq.

Redis that lost only its *newest* writes keeps the marker: a SIGKILL (or a machine
crash) with ``appendfsync everysec`` loses up to a second of the append-only file, and
a restored backup is older still, while the readers' offsets, committed after those
writes, stay on Kafka. A conversation's hash is then at seq k while the log has k+n,
and nothing would bring the missing events back: the reader resumes after them, and
its next event of the conversation passes the guard over the gap. So each live batch
also records, in the same transaction, the log position it reached per partition
(``POSITIONS_KEY``: ``topic:partition`` -> next offset, written by the batch's last
script call, only with the marker), and the rebuild records where it read to. The
append-only file is replayed in order and an incomplete ``MULTI`` at its end is
dropped, so whatever Redis kept, the position it holds says truly how far its model
goes. When the reader is given a partition, before any batch of it,
:meth:`RebuildingRedisModel.catch_up` compares: a position below the reader's
committed offset (or none, with the marker present) means the model lost writes, and
the events in between are folded from the log into it (the guards apply exactly the
missing seqs of each conversation behind, and drop the rest) before the reader goes on.

``kefu replay --reset`` uses the same two keys (:func:`holding_the_model`): it takes the
lock and drops the marker, so live batches wait while it deletes and rebuilds; one that
slipped in between the delete and the replay would carry a later seq into an emptied
hash, and the guards would then refuse the history before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from aiokafka import TopicPartition
from redis.exceptions import NoScriptError, WatchError

from projections.redis_state import APPLY_IF_MARKED, MARKER_MISSING, RedisConversations
from schemas.records import Event, QueueEvent

log = logging.getLogger(__name__)

EPOCH_KEY = "kefu-system:redis-model:epoch"
LOCK_KEY = "kefu-system:redis-model:rebuilding"
# How far the model goes on the log: ``topic:partition`` -> the next offset to apply.
POSITIONS_KEY = "kefu-system:redis-model:positions"

# Set the marker only while our lock still holds (no flush since we took it).
_SET_IF_LOCKED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

Positions = Mapping[TopicPartition, int]  # the next offset to apply, per partition

# A batch with no events still checks the marker (and records its positions).
_NO_EVENTS = b"[]"


@dataclass(frozen=True, slots=True)
class Rebuilt:
    applied: int  # events replayed
    ends: Positions  # where the replay read each partition to


Rebuild = Callable[[], Awaitable[Rebuilt]]  # replays the whole log into the model
# Replays these ``[start, end)`` ranges of the log into the model; events applied.
Fold = Callable[[Mapping[TopicPartition, tuple[int, int]]], Awaitable[int]]


def position_field(tp: TopicPartition) -> str:
    return f"{tp.topic}:{tp.partition}"


class RebuildingRedisModel:
    """An ``EventSink`` over :class:`RedisConversations` that rebuilds the model from
    the log whenever its epoch marker is missing (see the module docstring)."""

    name = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        model: RedisConversations,
        rebuild: Rebuild,
        fold: Fold | None = None,
        lock_seconds: float = 30.0,
        poll_seconds: float = 0.2,
    ) -> None:
        self._redis = client
        self._model = model
        self._rebuild = rebuild
        self._fold = fold
        self._lock_ms = int(lock_seconds * 1000)
        self._poll = poll_seconds
        self.rebuilds = 0  # rebuilds this process ran (tests, metrics)
        self.caught_up = 0  # events folded in by ``catch_up`` (tests, metrics)
        self._sha: str | None = None  # APPLY_IF_MARKED's, once loaded

    async def apply(
        self, events: Sequence[Event | QueueEvent], positions: Positions | None = None
    ) -> None:
        """``events`` in one transaction, with ``positions`` (where the batch leaves
        each of its partitions) if given: one round trip (module docstring)."""
        payloads = self._model.payloads(events) or [_NO_EVENTS]
        marks = [
            part for tp, at in (positions or {}).items() for part in (position_field(tp), str(at))
        ]
        while True:
            if self._sha is None:
                self._sha = str(await self._redis.script_load(APPLY_IF_MARKED))
            try:
                results = await self._send(self._sha, payloads, marks)
            except NoScriptError:
                log.warning("redis model: the batch script is gone (restart? flush?); loading")
                self._sha = None
                continue
            if MARKER_MISSING not in results:
                return
            # Nothing was written: rebuild, then again (the seq guards drop repeats).
            await self._rebuild_or_wait()

    async def _send(self, sha: str, payloads: Sequence[bytes], marks: Sequence[str]) -> list[Any]:
        """One ``MULTI``/``EXEC`` of the batch script's calls, the positions with the last."""
        async with self._redis.pipeline(transaction=True) as pipe:
            last = len(payloads) - 1
            for i, payload in enumerate(payloads):
                tail = marks if i == last else ()
                pipe.evalsha(sha, 2, EPOCH_KEY, POSITIONS_KEY, payload, *tail)
            return await pipe.execute()

    async def ensure(self) -> None:
        """Rebuild now if the marker is missing (a worker may call it on start)."""
        if await self._redis.get(EPOCH_KEY) is None:
            await self._rebuild_or_wait()

    async def catch_up(self, starts: Positions) -> int:
        """Partitions the reader was given, with the offset it resumes each at (its
        committed one), before any batch of them: the events the model lost between
        the position it holds and there are folded from the log (module docstring).
        Returns how many were folded."""
        await self.ensure()  # a flushed model comes back whole first
        tps = sorted(starts, key=position_field)
        if not tps or self._fold is None:
            return 0
        held = await self._redis.hmget(POSITIONS_KEY, [position_field(tp) for tp in tps])
        # None: the model never recorded this partition (it predates positions, or it
        # lost every write of it): from the beginning, to be sure.
        ranges = {
            tp: (int(at or 0), starts[tp])
            for tp, at in zip(tps, held, strict=True)
            if int(at or 0) < starts[tp]
        }
        if not ranges:
            return 0
        started = time.monotonic()
        behind = ", ".join(f"{position_field(tp)} {a}..{b}" for tp, (a, b) in ranges.items())
        log.warning("redis model: behind the log (lost writes?) at %s; folding them in", behind)
        applied = await self._fold(ranges)
        async with self._redis.pipeline(transaction=True) as pipe:
            try:  # not onto a model flushed meanwhile (its rebuild records positions)
                await pipe.watch(EPOCH_KEY)
                if await pipe.get(EPOCH_KEY) is not None:
                    pipe.multi()  # type: ignore[no-untyped-call]
                    marks = {position_field(tp): end for tp, (_, end) in ranges.items()}
                    pipe.hset(POSITIONS_KEY, mapping=marks)  # type: ignore[arg-type]
                    await pipe.execute()
            except WatchError:
                pass
        self.caught_up += applied
        log.warning(
            "redis model: folded %d events of %d partitions in %.2f s",
            applied,
            len(ranges),
            time.monotonic() - started,
        )
        return applied

    async def _rebuild_or_wait(self) -> None:
        token = uuid.uuid4().hex
        if await self._redis.set(LOCK_KEY, token, nx=True, px=self._lock_ms):
            await self._rebuild_holding(token)
            return
        # Someone else rebuilds: wait for their marker (or for their lock to lapse,
        # after a crash, and then take over).
        while await self._redis.get(EPOCH_KEY) is None:
            if await self._redis.exists(LOCK_KEY) == 0:
                return
            await asyncio.sleep(self._poll)

    async def _rebuild_holding(self, token: str) -> None:
        started = time.monotonic()
        log.warning("redis model: epoch marker missing; rebuilding it from the log")
        async with _holding_lock(self._redis, token, self._lock_ms):
            rebuilt = await self._rebuild()
            if rebuilt.ends:  # before the marker: a model with one is never without them
                marks = {position_field(tp): at for tp, at in rebuilt.ends.items()}
                await self._redis.hset(POSITIONS_KEY, mapping=marks)  # type: ignore[arg-type]
            done = await _set_epoch_if_locked(self._redis, token)
        if done:
            self.rebuilds += 1
            log.warning(
                "redis model: rebuilt from %d events in %.2f s",
                rebuilt.applied,
                time.monotonic() - started,
            )
        else:
            log.warning("redis model: lost its lock while rebuilding (flushed?); again")


@contextlib.asynccontextmanager
async def _holding_lock(client: aioredis.Redis, token: str, lock_ms: int) -> AsyncIterator[None]:
    """Keeps the lock ``token`` took alive while the body runs, and releases it after."""

    async def refresh() -> None:
        while True:
            await asyncio.sleep(lock_ms / 3000)
            with contextlib.suppress(Exception):
                await client.eval(_REFRESH, 1, LOCK_KEY, token, lock_ms)

    refresher = asyncio.create_task(refresh())
    try:
        yield
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        with contextlib.suppress(Exception):
            await client.eval(_RELEASE, 1, LOCK_KEY, token)


async def _set_epoch_if_locked(client: aioredis.Redis, token: str) -> bool:
    """A new marker, only if the lock is still ours (no flush since we took it)."""
    epoch = str(int(time.time() * 1000))
    return bool(await client.eval(_SET_IF_LOCKED, 2, LOCK_KEY, EPOCH_KEY, token, epoch))


class ModelLockLost(RuntimeError):
    """The rebuild lock lapsed or was flushed while a replay held it."""


@contextlib.asynccontextmanager
async def holding_the_model(
    client: aioredis.Redis,
    lock_seconds: float = 30.0,
    wait_seconds: float = 120.0,
    poll_seconds: float = 0.2,
) -> AsyncIterator[None]:
    """Live projections hold their batches while the body runs (a reset and a replay).

    Takes the rebuild lock (waiting up to ``wait_seconds`` for another rebuild), drops
    the epoch marker so every live batch waits, and sets the marker again when the body
    returns. If the body fails, the marker stays missing and the lock is released: a
    worker then rebuilds the whole model from the log, which repairs a half-done reset.
    Only workers running with ``reliability.redis_rebuild`` watch the marker."""
    token = uuid.uuid4().hex
    lock_ms = int(lock_seconds * 1000)
    deadline = time.monotonic() + wait_seconds
    while not await client.set(LOCK_KEY, token, nx=True, px=lock_ms):
        if time.monotonic() > deadline:
            raise TimeoutError(f"another rebuild of the Redis model held {LOCK_KEY} too long")
        await asyncio.sleep(poll_seconds)
    async with _holding_lock(client, token, lock_ms):
        # A live batch checks the marker in its transaction: one after this writes
        # nothing and waits.
        await client.delete(EPOCH_KEY)
        yield
        if not await _set_epoch_if_locked(client, token):
            raise ModelLockLost(
                "the Redis model's lock was lost during the replay (Redis flushed or "
                "restarted?): the workers rebuild the model from the log"
            )


def log_rebuild(
    bootstrap: str,
    topics: Sequence[str],
    model: RedisConversations,
    kafka_options: Mapping[str, Any] | None = None,
) -> Rebuild:
    """A :data:`Rebuild` that replays ``topics`` (the events and the queues' events)
    from the beginning up to their end now, into ``model``."""
    from projections.replay import LogReader, ReplayFilter, ReplayStats

    async def rebuild() -> Rebuilt:
        reader = LogReader(bootstrap, list(topics), kafka_options=kafka_options)
        stats = ReplayStats()
        applied = 0
        async for batch in reader.batches(ReplayFilter(), stats):
            await model.apply([record.event for record in batch])
            applied += len(batch)
        return Rebuilt(applied, reader.ends)

    return rebuild


def log_fold(
    bootstrap: str,
    model: RedisConversations,
    kafka_options: Mapping[str, Any] | None = None,
) -> Fold:
    """A :data:`Fold` that replays ranges of the log into ``model``, in log order per
    partition (the seq guards drop what the model already holds)."""
    from projections.replay import LogReader, ReplayFilter, ReplayStats

    async def fold(ranges: Mapping[TopicPartition, tuple[int, int]]) -> int:
        topics = sorted({tp.topic for tp in ranges})
        reader = LogReader(bootstrap, topics, kafka_options=kafka_options, ranges=ranges)
        applied = 0
        async for batch in reader.batches(ReplayFilter(), ReplayStats()):
            await model.apply([record.event for record in batch])
            applied += len(batch)
        return applied

    return fold
