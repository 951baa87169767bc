"""The responder agent: answers reply requests off the hot path.

It takes requests in batches, skipping other events unread, and answers a batch's
conversations concurrently (a few actors, each with a batch in flight), so a slow
responder never holds a conversation partition (the AI responder also bounds every
model call: see ``streams.llm`` and ``streams.breaker``); the answer goes back as a ``RecordReply``
command whose id derives from the request, so a redelivered request cannot produce a
second reply. ``latency_ms`` on the reply is the time the responder took.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from schemas.records import RecordReply, ReplyRequested
from schemas.time import now_ms
from streams import telemetry
from streams.app import KefuApp
from streams.inbox import batches, each_conversation, position, send_dead_letter
from streams.responders import Responder

log = logging.getLogger(__name__)
_REPLY_NAMESPACE = uuid.UUID("0b8f5a8e-2f4e-4f0c-8d7e-5b1c9e3a6d42")
STAGE = "responder"
ACTORS = 4


def reply_command_id(request_event_id: str) -> str:
    return str(uuid.uuid5(_REPLY_NAMESPACE, request_event_id))


def install(kefu: KefuApp, responder: Responder) -> Any:
    async def answer(event: Any, record: ReplyRequested) -> None:
        with telemetry.hop(STAGE, event.message, record):
            await _answer(kefu, responder, event, record)

    async def responder_agent(stream: Any) -> None:
        requests = batches(
            stream, ReplyRequested, kefu.deadletter, STAGE, only=(ReplyRequested,), in_order=False
        )
        async for batch in requests:
            await each_conversation(batch, answer, kefu.config.concurrency)

    # A few actors, each with its batch in flight: one slow model call holds one batch.
    return kefu.app.agent(kefu.events_in, name="kefu.responder", concurrency=ACTORS)(
        responder_agent
    )


async def _answer(kefu: KefuApp, responder: Responder, event: Any, record: ReplyRequested) -> None:
    started = time.perf_counter()
    try:
        answer = await responder.answer(record)
    except Exception as exc:
        log.exception("responder failed at %s", position(event.message))
        await send_dead_letter(kefu.deadletter, event.message, repr(exc), STAGE)
        return
    await kefu.commands_out.send(
        key=record.conversation_id,
        value=RecordReply(
            command_id=reply_command_id(record.event_id),
            conversation_id=record.conversation_id,
            tenant_id=record.tenant_id,
            issued_at=now_ms(),
            in_reply_to=record.event_id,
            text=answer.text,
            author="ai",
            responder=answer.responder,
            confidence=answer.confidence,
            intent=answer.intent,
            action=answer.action,
            model=answer.model,
            cache_hit=answer.cache_hit,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            cost=answer.cost,
            latency_ms=round((time.perf_counter() - started) * 1000),
        ),
    )
