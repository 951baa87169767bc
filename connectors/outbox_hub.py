"""One Redis pub/sub connection per gateway process for every live chat socket.

A subscription per socket costs a Redis connection each, and the client's pool runs
out long before a gateway's socket count does. The hub pattern-subscribes once to
every conversation outbox (``schemas.keys.outbox_channel``) and hands each message to
the local sockets of that conversation. A slow socket loses its oldest frames, never
stalls the others (history on reconnect comes from the read model).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis

from schemas.keys import outbox_channel

log = logging.getLogger(__name__)
PATTERN = outbox_channel("*", "*")
QUEUE_FRAMES = 256


class OutboxHub:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._listeners: dict[str, set[asyncio.Queue[str]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def subscribe(self, channel: str) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_FRAMES)
        self._listeners.setdefault(channel, set()).add(queue)
        return queue

    def unsubscribe(self, channel: str, queue: asyncio.Queue[str]) -> None:
        listeners = self._listeners.get(channel)
        if listeners is not None:
            listeners.discard(queue)
            if not listeners:
                del self._listeners[channel]

    async def _run(self) -> None:
        delay = 0.1
        while True:  # Redis restarting: resubscribe, don't give up
            pubsub: Any = self._redis.pubsub()
            try:
                await pubsub.psubscribe(PATTERN)
                delay = 0.1
                async for message in pubsub.listen():
                    if message.get("type") == "pmessage":
                        self._dispatch(_text(message["channel"]), _text(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox hub lost Redis; resubscribing in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _dispatch(self, channel: str, data: str) -> None:
        for queue in self._listeners.get(channel, ()):
            if queue.full():
                queue.get_nowait()  # drop the oldest frame for a socket that lags
            queue.put_nowait(data)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
