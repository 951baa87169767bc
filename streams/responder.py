"""The responder agent: answers reply requests off the hot path.

It takes requests in batches, skipping other events unread, and answers a batch's
conversations concurrently (a few actors, each with a batch in flight), so a slow
responder never holds a conversation partition (the AI responder also bounds every
model call: see ``streams.llm`` and ``streams.breaker``); the answer goes back as a ``RecordReply``
command whose id derives from the request, so a redelivered request cannot produce a
second reply. ``latency_ms`` on the reply is the time the responder took. A request
the conversation agent answered itself (``answered_inline``: an answer that needed no
I/O) is skipped: its reply is already on the log.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from schemas.records import ReplyRequested
from schemas.time import now_ms
from streams import telemetry
from streams.app import KefuApp
from streams.inbox import (
    batches,
    each_conversation,
    outlasting,
    position,
    send_dead_letter,
    send_in_order,
)
from streams.responders import Responder, reply_command

log = logging.getLogger(__name__)
STAGE = "responder"
ACTORS = 4


def install(kefu: KefuApp, responder: Responder) -> Any:
    async def answer(event: Any, record: ReplyRequested) -> None:
        with telemetry.hop(STAGE, event.message, record):
            await _answer(kefu, responder, event, record)

    async def responder_agent(stream: Any) -> None:
        requests = batches(
            stream, ReplyRequested, kefu.deadletter, STAGE, only=(ReplyRequested,), in_order=False
        )
        async for batch in requests:
            # Answered by the conversation agent already (its reply is on the log).
            wanted = [(event, record) for event, record in batch if not record.answered_inline]
            await each_conversation(wanted, answer, kefu.config.concurrency)

    # A few actors, each with its batch in flight: one slow model call holds one batch.
    return kefu.app.agent(kefu.events_in, name="kefu.responder", concurrency=ACTORS)(
        responder_agent
    )


async def _answer(kefu: KefuApp, responder: Responder, event: Any, record: ReplyRequested) -> None:
    started = time.perf_counter()
    try:
        answer = await outlasting(lambda: responder.answer(record), f"{STAGE} {record.event_id}")
    except Exception as exc:
        log.exception("responder failed at %s", position(event.message))
        await send_dead_letter(kefu.deadletter, event.message, repr(exc), STAGE)
        return
    latency_ms = round((time.perf_counter() - started) * 1000)
    command = reply_command(record, answer, now_ms(), latency_ms)
    # The model's answer is paid for: a Kafka hiccup must not lose it.
    await send_in_order(
        [(kefu.commands_out, record.conversation_id, command)], f"{STAGE} {record.event_id}"
    )
