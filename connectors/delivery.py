"""Outbound delivery per channel, as the delivery agent's ``Deliverer``.

- ``web``: published on the conversation's Redis outbox channel; the gateway pushes it
  down the widget's WebSocket (history on reconnect comes from the Redis read model).
- ``api``: POSTed to the tenant's webhook with an HMAC-SHA256 signature of the body and
  the reply's event id as idempotency key, retried with exponential backoff. The client
  is aiohttp's: a webhook POST cost ~1.3 ms more CPU with httpx, which made delivery
  the pipeline's slowest agent (bench/RESULTS.md "Pipeline").
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import redis.asyncio as aioredis

from connectors.attachments import UrlSigner, with_urls
from connectors.metrics import delivering
from schemas.keys import outbox_channel
from schemas.outcomes import DeliveryOutcome as Outcome
from schemas.records import (
    ConversationClosed,
    ConversationQueued,
    CsatRated,
    Event,
    MessageReceived,
    ReplyProduced,
)

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Kefu-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
TENANT_HEADER = "X-Kefu-Tenant"


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    url: str
    secret: bytes


# The frame type of each notice (``streams.delivery.noticed``) on the outbox.
NOTICE_TYPES = {
    "ConversationQueued": "queue",
    "MessageReceived": "received",
    "ConversationClosed": "closed",
    "CsatRequested": "csat",
    "CsatRated": "rated",
}


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def reply_payload(reply: ReplyProduced, signer: UrlSigner | None = None) -> dict[str, object]:
    """The reply as the web chat and webhooks get it; attachments as signed, expiring
    absolute links (a receiver downloads them; the bytes never ride in the payload)."""
    payload: dict[str, object] = {
        "type": "reply",
        "event_id": reply.event_id,
        "conversation_id": reply.conversation_id,
        "in_reply_to": reply.in_reply_to,
        "text": reply.text,
        "author": reply.author,
        "intent": reply.intent,
        "occurred_at": reply.occurred_at,
    }
    if reply.attachments and signer is not None:
        listed = [a.to_avro() for a in reply.attachments]
        payload["attachments"] = with_urls(listed, signer, absolute=True)
    return payload


class ChannelSender(Protocol):
    """Delivers a reply on one channel (WeChat, Telegram, email, ...)."""

    async def send(self, reply: ReplyProduced) -> Outcome: ...


class ChannelDeliverer:
    """Web chat and REST webhooks here; other channels register a ``ChannelSender``
    under their channel name (one module per channel in ``connectors/``)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        webhooks: Mapping[str, WebhookTarget],
        attempts: int = 5,
        backoff: float = 0.2,
        senders: Mapping[str, ChannelSender] | None = None,
        signer: UrlSigner | None = None,
    ) -> None:
        self._redis = redis
        self._signer = signer
        self._webhooks = webhooks
        self._session: aiohttp.ClientSession | None = None  # made on first use, in the loop
        self._attempts = attempts
        self._backoff = backoff
        self._senders = dict(senders or {})

    async def deliver(self, reply: ReplyProduced) -> Outcome:
        with delivering(reply.tenant_id, reply.channel) as outcome:
            result = await self._deliver(reply)
            outcome(result.status)
        return result

    async def _deliver(self, reply: ReplyProduced) -> Outcome:
        sender = self._senders.get(reply.channel)
        if sender is not None:
            return await sender.send(reply)
        payload = reply_payload(reply, self._signer)
        if reply.channel == "web":
            message = json.dumps(payload, ensure_ascii=False)
            await self._redis.publish(
                outbox_channel(reply.tenant_id, reply.conversation_id), message
            )
            return Outcome("delivered", 1, "outbox")
        if reply.channel == "api":
            target = self._webhooks.get(reply.tenant_id)
            if target is None or not target.url:
                return Outcome("delivered", 0, "no webhook: available via GET")
            return await self._post(target, payload, reply.event_id, reply.tenant_id)
        return Outcome("failed", 0, f"no delivery for channel {reply.channel!r}")

    async def notify(self, event: Event) -> None:
        # Live sockets show it; other channels see it in GET /v1/conversations/{id}.
        # "type" first: the gateway keeps the newer kinds from sockets of clients that
        # did not ask for them by this prefix (connectors/webchat.py NOTICE_PREFIXES).
        frame: dict[str, object] = {"type": NOTICE_TYPES.get(event.type, event.type)}
        frame["conversation_id"] = event.conversation_id
        frame["event_id"] = event.event_id
        frame["at"] = event.occurred_at
        if isinstance(event, ConversationQueued):
            frame["position"] = event.position
        elif isinstance(event, MessageReceived):
            frame["message_id"] = event.event_id  # the id the ack and the history give it
        elif isinstance(event, ConversationClosed):
            frame["reason"] = event.reason
        elif isinstance(event, CsatRated):
            frame["rating"] = event.rating
        message = json.dumps(frame, ensure_ascii=False)
        await self._redis.publish(outbox_channel(event.tenant_id, event.conversation_id), message)

    async def _post(
        self, target: WebhookTarget, payload: dict[str, object], key: str, tenant_id: str
    ) -> Outcome:
        body = json.dumps(payload, ensure_ascii=False).encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(target.secret, body),
            IDEMPOTENCY_HEADER: key,
            TENANT_HEADER: tenant_id,
        }
        detail = ""
        for attempt in range(1, self._attempts + 1):
            try:
                async with self._http().post(target.url, data=body, headers=headers) as response:
                    status = response.status
                    await response.read()
                if status < 300:
                    return Outcome("delivered", attempt, f"HTTP {status}")
                detail = f"HTTP {status}"
                if 400 <= status < 500 and status != 429:
                    break  # the receiver rejects it; retrying will not help
            except (aiohttp.ClientError, TimeoutError) as exc:
                detail = type(exc).__name__
            if attempt < self._attempts:
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
        log.warning("webhook failed after %d attempts: %s", attempt, detail)
        return Outcome("failed", attempt, detail)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=5.0),
                connector=aiohttp.TCPConnector(limit=100),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
