"""The Redis read model comes back from the log when Redis lost it.

Redis is a cache of the log: a ``FLUSHALL``, a new empty server or a restore of an old
snapshot would otherwise leave the read model with holes, and every later event would
be applied on top of them (its seq guard passes on an empty hash). So the model keeps
an epoch marker key (outside every tenant's prefix); each batch of the live projection
is applied in a transaction that ``WATCH``es it:

- marker present: the batch goes in (a flush between the check and ``EXEC`` aborts the
  transaction: ``FLUSHALL`` touches watched keys), and the check is retried;
- marker gone: one process (a ``SET NX`` lock, refreshed while it works) replays the
  whole log into Redis with the projection's own idempotent code
  (``projections.replay``), then sets the marker only if its lock survived (a flush
  during the rebuild drops the lock, and the rebuild starts over); the others wait
  for the marker. Live batches are held meanwhile, so no later seq lands before the
  history and the seq guards drop nothing they should not.

Nothing is duplicated: every write is guarded by the conversation's (or queue's) seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from projections.redis_state import APPLY_SCRIPT, RedisConversations, script_call
from schemas.records import Event, QueueEvent

log = logging.getLogger(__name__)

EPOCH_KEY = "kefu-system:redis-model:epoch"
LOCK_KEY = "kefu-system:redis-model:rebuilding"

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

Rebuild = Callable[[], Awaitable[int]]  # replays the log into the model; events applied


class RebuildingRedisModel:
    """An ``EventSink`` over :class:`RedisConversations` that rebuilds the model from
    the log whenever its epoch marker is missing (see the module docstring)."""

    name = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        model: RedisConversations,
        rebuild: Rebuild,
        lock_seconds: float = 30.0,
        poll_seconds: float = 0.2,
    ) -> None:
        self._redis = client
        self._model = model
        self._rebuild = rebuild
        self._lock_ms = int(lock_seconds * 1000)
        self._poll = poll_seconds
        self._script = client.register_script(APPLY_SCRIPT)
        self.rebuilds = 0  # rebuilds this process ran (tests, metrics)

    async def apply(self, events: Sequence[Event | QueueEvent]) -> None:
        while True:
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(EPOCH_KEY)
                    if await pipe.get(EPOCH_KEY) is None:
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        await self._rebuild_or_wait()
                        continue
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for event in events:
                        keys, args = script_call(event)
                        await self._script(keys=keys, args=args, client=pipe)
                    await pipe.execute()
                    return
                except WatchError:
                    log.warning("redis model: the epoch changed under a batch; checking again")

    async def ensure(self) -> None:
        """Rebuild now if the marker is missing (a worker may call it on start)."""
        if await self._redis.get(EPOCH_KEY) is None:
            await self._rebuild_or_wait()

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
        refresher = asyncio.create_task(self._keep_lock(token))
        try:
            applied = await self._rebuild()
            epoch = str(int(time.time() * 1000))
            done = await self._redis.eval(_SET_IF_LOCKED, 2, LOCK_KEY, EPOCH_KEY, token, epoch)
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            with contextlib.suppress(Exception):
                await self._redis.eval(_RELEASE, 1, LOCK_KEY, token)
        if done:
            self.rebuilds += 1
            log.warning(
                "redis model: rebuilt from %d events in %.2f s",
                applied,
                time.monotonic() - started,
            )
        else:
            log.warning("redis model: lost its lock while rebuilding (flushed?); again")

    async def _keep_lock(self, token: str) -> None:
        while True:
            await asyncio.sleep(self._lock_ms / 3000)
            with contextlib.suppress(Exception):
                await self._redis.eval(_REFRESH, 1, LOCK_KEY, token, self._lock_ms)


def log_rebuild(
    bootstrap: str,
    topics: Sequence[str],
    model: RedisConversations,
    kafka_options: Mapping[str, Any] | None = None,
) -> Rebuild:
    """A :data:`Rebuild` that replays ``topics`` (the events and the queues' events)
    from the beginning up to their end now, into ``model``."""
    from projections.replay import LogReader, ReplayFilter, ReplayStats

    async def rebuild() -> int:
        reader = LogReader(bootstrap, list(topics), kafka_options=kafka_options)
        stats = ReplayStats()
        applied = 0
        async for batch in reader.batches(ReplayFilter(), stats):
            await model.apply([record.event for record in batch])
            applied += len(batch)
        return applied

    return rebuild
