"""Telegram: Bot API webhook in, ``sendMessage`` out.

In: ``POST /v1/telegram/{tenant}/webhook`` (register it with ``setWebhook`` and a
``secret_token``; Telegram echoes it in ``X-Telegram-Bot-Api-Secret-Token``). An update
whose message has text becomes a ``ReceiveMessage`` keyed by chat id; its command id
derives from chat id + message id, so a redelivered update (Telegram retries until it
gets a 2xx) is dropped by the conversation agent, and a recently seen ``update_id`` is
acknowledged without publishing again. Other updates are acknowledged and ignored.

Out: ``POST {api_base}/bot{token}/sendMessage``, split at Telegram's 4096-character
limit, retried with backoff on network errors, 5xx and 429 (``retry_after`` honoured).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Header, HTTPException, Request, status

from connectors.edge import read_body, same_secret
from connectors.identity import command_id_for, conversation_id_for
from schemas.outcomes import DeliveryOutcome as Outcome
from schemas.records import ReceiveMessage, ReplyProduced
from schemas.time import now_ms

log = logging.getLogger(__name__)
router = APIRouter(tags=["telegram"])
CHANNEL = "telegram"
MAX_TEXT = 8000
MAX_OUT = 4096  # Telegram's limit per message
_SEEN_SECONDS = 24 * 3600  # Telegram keeps an update for 24 h


@dataclass(frozen=True, slots=True)
class TelegramEdge:
    secrets: Mapping[str, str] = field(default_factory=dict)  # tenant -> secret token
    max_body: int = 64 * 1024


def seen_key(tenant_id: str, update_id: int) -> str:
    return f"kefu:{tenant_id}:telegram:update:{update_id}"


def parse_update(tenant: str, body: bytes) -> tuple[int, ReceiveMessage | None]:
    """(update_id, the command or None for updates without text). ValueError = 400."""
    try:
        update = json.loads(body)
    except ValueError as exc:
        raise ValueError("malformed JSON") from exc
    if not isinstance(update, dict) or not isinstance(update.get("update_id"), int):
        raise ValueError("an update needs an integer update_id")
    update_id: int = update["update_id"]
    message = update.get("message")
    if message is None:
        return update_id, None  # edits, callbacks, channel posts: not customer messages
    if not isinstance(message, dict):
        raise ValueError("message must be an object")
    chat = message.get("chat")
    message_id = message.get("message_id")
    if not isinstance(chat, dict) or not isinstance(chat.get("id"), int):
        raise ValueError("message.chat.id must be an integer")
    if not isinstance(message_id, int):
        raise ValueError("message.message_id must be an integer")
    text = message.get("text")
    if text is None:
        return update_id, None  # photos, stickers, ...
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        raise ValueError(f"message.text must be 1-{MAX_TEXT} characters")
    chat_id = str(chat["id"])
    sender = message.get("from")
    language = sender.get("language_code") if isinstance(sender, dict) else None
    return update_id, ReceiveMessage(
        command_id=command_id_for(tenant, CHANNEL, f"{chat_id}/{message_id}"),
        conversation_id=conversation_id_for(tenant, CHANNEL, chat_id),
        tenant_id=tenant,
        issued_at=now_ms(),
        channel=CHANNEL,
        customer_id=chat_id,
        text=text,
        channel_message_id=f"{chat_id}/{message_id}",
        language=language if isinstance(language, str) and len(language) <= 16 else None,
    )


@router.post("/v1/telegram/{tenant}/webhook")
async def webhook(
    tenant: str,
    request: Request,
    x_telegram_bot_api_secret_token: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    edge: TelegramEdge = request.app.state.telegram
    secret = edge.secrets.get(tenant)
    if not secret:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Telegram is not enabled for this tenant")
    if not x_telegram_bot_api_secret_token:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing secret token")
    if not same_secret(x_telegram_bot_api_secret_token, secret):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "bad secret token")
    body = await read_body(request, edge.max_body)
    try:
        update_id, command = parse_update(tenant, body)
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    if command is None:
        return {"ok": True, "published": False}
    services = request.app.state.services
    key = seen_key(tenant, update_id)
    if await services.redis.exists(key):
        return {"ok": True, "published": False, "duplicate": True}
    await services.publisher.publish(command)
    # Marked after the publish, so a failed publish is retried by Telegram, not lost.
    await services.redis.set(key, b"1", ex=_SEEN_SECONDS)
    return {"ok": True, "published": True, "conversation_id": command.conversation_id}


def chunks(text: str, size: int = MAX_OUT) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class TelegramSender:
    """A ``ChannelSender``: one bot per tenant. The Bot API has no idempotency key; a
    retry after a lost response may show a reply twice, nothing is dropped silently."""

    def __init__(
        self,
        bot_tokens: Mapping[str, str],
        api_base: str,
        attempts: int = 4,
        backoff: float = 0.5,
        timeout: float = 10.0,
        max_retry_after: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._tokens = dict(bot_tokens)
        self._base = api_base.rstrip("/")
        self._attempts = attempts
        self._backoff = backoff
        self._max_retry_after = max_retry_after
        self._http = http or httpx.AsyncClient(timeout=timeout)

    async def send(self, reply: ReplyProduced) -> Outcome:
        token = self._tokens.get(reply.tenant_id)
        if not token:
            return Outcome("failed", 0, "no Telegram bot for this tenant")
        attempts = 0
        for part in chunks(reply.text):
            outcome = await self._send_one(token, reply.customer_id, part)
            attempts += outcome.attempts
            if outcome.status != "delivered":
                return Outcome("failed", attempts, outcome.detail)
        return Outcome("delivered", attempts, "sendMessage")

    async def _send_one(self, token: str, chat_id: str, text: str) -> Outcome:
        url = f"{self._base}/bot{token}/sendMessage"
        payload = {"chat_id": int(chat_id) if chat_id.lstrip("-").isdigit() else chat_id}
        payload_text = {**payload, "text": text}
        detail = ""
        attempt = 0
        for attempt in range(1, self._attempts + 1):
            wait = self._backoff * 2 ** (attempt - 1)
            try:
                response = await self._http.post(url, json=payload_text)
                if response.status_code < 300:
                    return Outcome("delivered", attempt, "sendMessage")
                detail = f"HTTP {response.status_code}"
                if response.status_code == 429:
                    wait = max(wait, _retry_after(response, self._max_retry_after))
                elif response.status_code < 500:
                    break  # bad token, chat not found, bot blocked: retrying will not help
            except httpx.HTTPError as exc:
                detail = type(exc).__name__
            if attempt < self._attempts:
                await asyncio.sleep(wait)
        log.warning("telegram delivery failed after %d attempts: %s", attempt, detail)
        return Outcome("failed", attempt, detail)

    async def close(self) -> None:
        await self._http.aclose()


def _retry_after(response: httpx.Response, cap: float) -> float:
    try:
        value = float(response.json()["parameters"]["retry_after"])
    except (ValueError, KeyError, TypeError):
        return 0.0
    return min(max(value, 0.0), cap)
