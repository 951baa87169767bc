"""The responder: answers reply requests off the hot path.

The worker's reader (``streams.event_reader``) hands it each ``ReplyRequested`` the
conversation agent did not answer itself (``answered_inline``: an answer that needed
no I/O is already on the log). Requests are answered concurrently, one conversation's
in log order, at most ``concurrency`` at a time, so a slow model never holds the
reader (the AI responder also bounds every call: see ``streams.llm`` and
``streams.breaker``). The answer goes back as a ``RecordReply`` command whose id
derives from the request, so a redelivered request cannot produce a second reply;
``latency_ms`` on the reply is the time the responder took.

A request's offset is *held* until its answer is on its way (``holding``): the reader
commits no further on that partition, so a crash in between makes the request come
again instead of losing it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from aiokafka import TopicPartition

from schemas.codec import CODEC
from schemas.records import ReplyRequested
from schemas.time import now_ms
from streams import telemetry
from streams.app import KefuApp
from streams.inbox import outlasting, position, send_dead_letter, send_in_order
from streams.responders import Responder, reply_command

log = logging.getLogger(__name__)
STAGE = "responder"


class ResponderPool:
    def __init__(
        self, kefu: KefuApp, responder: Responder, concurrency: int = 16, backlog: int = 1000
    ) -> None:
        self._kefu = kefu
        self._responder = responder
        self._running = asyncio.Semaphore(concurrency)
        self._backlog = backlog
        self._held: dict[TopicPartition, Counter[int]] = {}
        self._last: dict[str, asyncio.Task[None]] = {}  # conversation -> its latest answer
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._room.set()

    def wanted(self, request: Any) -> bool:
        return isinstance(request, ReplyRequested) and not request.answered_inline

    async def submit(self, message: Any, request: ReplyRequested) -> None:
        """Start answering; waits while ``backlog`` requests are still open (the reader
        then reads no further: backpressure, not an unbounded queue)."""
        while len(self._tasks) >= self._backlog:
            self._room.clear()
            await self._room.wait()
        tp = TopicPartition(message.topic, message.partition)
        self._held.setdefault(tp, Counter())[message.offset] += 1
        before = self._last.get(request.conversation_id)
        task = asyncio.ensure_future(self._answer(message, request, before))
        self._last[request.conversation_id] = task
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._done(done, tp, message.offset, request))

    def holding(self, tp: TopicPartition) -> int | None:
        """The lowest offset of ``tp`` with a request still being answered."""
        held = self._held.get(tp)
        return min(held) if held else None

    def forget(self, tps: set[TopicPartition]) -> None:
        """Partitions given up: their open requests come again at their new owner (and
        an answer that still goes out here is the same command, dropped there)."""
        for tp in tps:
            self._held.pop(tp, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _done(
        self, task: asyncio.Task[None], tp: TopicPartition, offset: int, request: ReplyRequested
    ) -> None:
        self._tasks.discard(task)
        held = self._held.get(tp)
        failed = not task.cancelled() and task.exception() is not None
        if failed:  # neither answered nor dead-lettered: it stays held (comes again)
            log.error("request at %s[%d]@%d stays unanswered", tp.topic, tp.partition, offset)
        if held is not None and not task.cancelled() and not failed:
            held[offset] -= 1
            if held[offset] <= 0:
                del held[offset]
        if self._last.get(request.conversation_id) is task:
            del self._last[request.conversation_id]
        self._room.set()

    async def _answer(
        self, message: Any, request: ReplyRequested, before: asyncio.Task[None] | None
    ) -> None:
        if before is not None:  # a customer reads replies in the order they asked
            await asyncio.wait([before])
        async with self._running:
            with telemetry.hop(STAGE, message, request):
                await answer(self._kefu, self._responder, message, request)


async def answer(
    kefu: KefuApp, responder: Responder, message: Any, request: ReplyRequested
) -> None:
    started = time.perf_counter()
    try:
        answered = await outlasting(
            lambda: responder.answer(request), f"{STAGE} {request.event_id}"
        )
    except Exception as exc:
        log.exception("responder failed at %s", position(message))
        await _dead_letter(kefu, message, request, repr(exc))
        return
    latency_ms = round((time.perf_counter() - started) * 1000)
    command = reply_command(request, answered, now_ms(), latency_ms)
    # The model's answer is paid for: a Kafka hiccup must not lose it. Waiting for the
    # broker's ack keeps the request's offset held until the answer is on the log.
    try:
        sent = await send_in_order(
            [(kefu.commands_out, request.conversation_id, command)],
            f"{STAGE} {request.event_id}",
        )
        await asyncio.gather(*(f for f in sent if isinstance(f, asyncio.Future)))
    except Exception as exc:  # released only once it is kept somewhere: a redrive redoes it
        log.exception("the answer to %s could not be sent", position(message))
        await _dead_letter(kefu, message, request, f"answer not sent: {exc!r}")


async def _dead_letter(kefu: KefuApp, message: Any, request: ReplyRequested, reason: str) -> None:
    # The request alone, not the record it came in (a redrive repeats only it).
    raw = CODEC.encode(request)
    await send_dead_letter(kefu.deadletter, message, reason, STAGE, payload=raw)
