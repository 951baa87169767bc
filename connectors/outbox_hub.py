"""One Redis pub/sub connection per gateway process for every live chat socket.

A subscription per socket costs a Redis connection each, and the client's pool runs
out long before a gateway's socket count does. The hub pattern-subscribes once to
every conversation outbox (``schemas.keys.outbox_channel``) and hands each message to
the local sockets of that conversation. A slow socket loses its oldest frames, never
stalls the others (history on reconnect comes from the read model).

A socket's frames wait in its ``Mailbox``, sent in order by a task that exists only
while frames wait: an idle socket (almost all of them) costs no task and no queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from schemas.keys import outbox_channel

log = logging.getLogger(__name__)
PATTERN = outbox_channel("*", "*")
QUEUE_FRAMES = 256


class Mailbox:
    """One socket's frames in waiting. Held (frames kept, none sent) until ``open``, so
    a socket subscribes before it reads its history and sends the history first."""

    __slots__ = ("_frames", "_open", "_send", "_task")

    def __init__(self, send: Callable[[str], Awaitable[None]]) -> None:
        self._send = send
        self._frames: deque[str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._open = False

    def push(self, data: str) -> None:
        if self._frames is None:
            self._frames = deque(maxlen=QUEUE_FRAMES)  # full: the oldest frame goes
        self._frames.append(data)
        self._drain_soon()

    def open(self) -> None:
        self._open = True
        self._drain_soon()

    async def close(self) -> None:
        self._open = False
        self._frames = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _drain_soon(self) -> None:
        if self._open and self._task is None and self._frames:
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._open and self._frames:
                await self._send(self._frames.popleft())
        except Exception:  # the socket went away; its handler is closing it
            self._frames = None
        finally:
            self._task = None


class OutboxHub:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._listeners: dict[str, set[Mailbox]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def subscribe(self, channel: str, send: Callable[[str], Awaitable[None]]) -> Mailbox:
        """Frames of ``channel`` go to ``send`` once the returned mailbox is opened."""
        mailbox = Mailbox(send)
        self._listeners.setdefault(channel, set()).add(mailbox)
        return mailbox

    async def unsubscribe(self, channel: str, mailbox: Mailbox) -> None:
        listeners = self._listeners.get(channel)
        if listeners is not None:
            listeners.discard(mailbox)
            if not listeners:
                del self._listeners[channel]
        await mailbox.close()

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
        for mailbox in self._listeners.get(channel, ()):
            mailbox.push(data)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
