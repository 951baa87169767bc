"""Telegram: Bot API webhook in, ``sendMessage`` and file uploads out.

In: ``POST /v1/telegram/{tenant}/webhook`` (register it with ``setWebhook`` and a
``secret_token``; Telegram echoes it in ``X-Telegram-Bot-Api-Secret-Token``). An update
whose message has text, or a file (photo, document, voice, audio, video) with its
caption as the text, becomes a ``ReceiveMessage`` keyed by chat id; its command id
derives from chat id + message id, so a redelivered update (Telegram retries until it
gets a 2xx) is dropped by the conversation agent, and a recently seen ``update_id`` is
acknowledged without publishing again. Other updates are acknowledged and ignored.

A file is fetched while Telegram waits (``getFile``, then ``/file/bot<token>/<path>``)
and passed through :func:`connectors.attachments.accept` with channel "telegram". A
file that is gone or refused (too big, a type not allowed, undecodable) is not
published, but the update is still answered 200: the caption goes on alone, the reason
is logged and in the webhook's answer, and the bot tells the customer, who can send
the file again in another form. A blob store failure is ours: 5xx, Telegram retries.

Out: ``POST {api_base}/bot{token}/sendMessage``, split at Telegram's 4096-character
limit, then each attachment as a multipart upload of the blob store's bytes
(``sendPhoto``, ``sendVoice``, ``sendAudio``, ``sendVideo``, else ``sendDocument``);
retried with backoff on network errors, 5xx and 429 (``retry_after`` honoured).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, NamedTuple

import httpx
from fastapi import APIRouter, Header, HTTPException, Request, status

from connectors.attachments import AttachmentRejected, accept
from connectors.auth import refuse_disabled
from connectors.blobs import BlobMissing, BlobStore
from connectors.edge import read_body, same_secret
from connectors.identity import command_id_for, conversation_id_for
from connectors.uploads import Files
from schemas.outcomes import DeliveryOutcome as Outcome
from schemas.records import Attachment, ReceiveMessage, ReplyProduced
from schemas.time import now_ms

log = logging.getLogger(__name__)
router = APIRouter(tags=["telegram"])
CHANNEL = "telegram"
MAX_TEXT = 8000
MAX_OUT = 4096  # Telegram's limit per message
MAX_PHOTO = 10 * 1024 * 1024  # sendPhoto's limit: a larger image goes as a document
_SEEN_SECONDS = 24 * 3600  # Telegram keeps an update for 24 h
_MAX_FILE_ID = 512


class FileUnavailable(Exception):
    """Telegram would not give us the file (expired, deleted, unknown, unreachable)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BotFiles:
    """The Bot API calls the webhook makes itself: a customer's file (``getFile``, then
    the download, capped at the channel's limit) and a notice back to the chat."""

    def __init__(
        self,
        api_base: str,
        timeout: float = 30.0,
        attempts: int = 3,
        backoff: float = 0.2,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._base = api_base.rstrip("/")
        self.api_base = self._base
        self._timeout = timeout
        self._attempts = max(1, attempts)
        self._backoff = backoff
        self._http = http

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[httpx.AsyncClient]:
        # A client per call unless one is given: files are rare next to text, and the
        # edge has no lifespan of its own to close a shared one.
        if self._http is not None:
            yield self._http
            return
        async with httpx.AsyncClient(timeout=self._timeout) as http:
            yield http

    async def download(self, token: str, file_id: str, limit: int) -> bytes:
        """The file's bytes; :class:`FileUnavailable`, or 413 over ``limit``."""
        async with self._client() as http:
            info = await self._get_file(http, token, file_id)
            declared = info.get("file_size")
            if isinstance(declared, int) and declared > limit:
                raise AttachmentRejected(413, f"attachment over {limit} bytes (the telegram limit)")
            path = info.get("file_path")
            if not isinstance(path, str) or not path:
                raise FileUnavailable("Telegram gave no file_path for the file")
            return await self._fetch(http, f"{self._base}/file/bot{token}/{path}", limit)

    async def _get_file(self, http: httpx.AsyncClient, token: str, file_id: str) -> dict[str, Any]:
        url = f"{self._base}/bot{token}/getFile"
        detail = ""
        for attempt in range(1, self._attempts + 1):
            try:
                response = await http.get(url, params={"file_id": file_id})
                if response.status_code < 300:
                    result = response.json().get("result")
                    if isinstance(result, dict):
                        return result
                    raise FileUnavailable("getFile answered without a file")
                if response.status_code < 500 and response.status_code != 429:
                    # Expired, deleted, over the Bot API's 20 MB, or not ours: final.
                    raise FileUnavailable(f"getFile: {_description(response)}")
                detail = f"getFile: HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                detail = f"getFile: {type(exc).__name__}"
            except ValueError as exc:  # a body that is not JSON
                raise FileUnavailable(f"getFile: {type(exc).__name__}") from exc
            if attempt < self._attempts:
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
        raise FileUnavailable(detail)

    async def _fetch(self, http: httpx.AsyncClient, url: str, limit: int) -> bytes:
        try:
            async with http.stream("GET", url) as response:
                if response.status_code >= 300:
                    raise FileUnavailable(f"download: HTTP {response.status_code}")
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:  # file_size is optional: never hold more than the limit
                        raise AttachmentRejected(
                            413, f"attachment over {limit} bytes (the telegram limit)"
                        )
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise FileUnavailable(f"download: {type(exc).__name__}") from exc

    async def tell(self, token: str, chat_id: str, text: str) -> None:
        """Best effort: a notice that fails is logged, the update is still answered."""
        try:
            async with self._client() as http:
                response = await http.post(
                    f"{self._base}/bot{token}/sendMessage",
                    json={"chat_id": _chat(chat_id), "text": text},
                )
            if response.status_code >= 300:
                log.warning("telegram notice not sent: HTTP %d", response.status_code)
        except httpx.HTTPError as exc:
            log.warning("telegram notice not sent: %s", type(exc).__name__)


@dataclass(frozen=True, slots=True)
class TelegramEdge:
    secrets: Mapping[str, str] = field(default_factory=dict)  # tenant -> secret token
    max_body: int = 64 * 1024
    bot_tokens: Mapping[str, str] = field(default_factory=dict)  # tenant -> bot token
    files: BotFiles | None = None  # None: files are refused, captions still published


def seen_key(tenant_id: str, update_id: int) -> str:
    return f"kefu:{tenant_id}:telegram:update:{update_id}"


@dataclass(frozen=True, slots=True)
class TelegramFile:
    """The file of a message, by reference: its bytes are fetched with ``getFile``."""

    file_id: str
    kind: str  # the message field it came in: photo, document, voice, audio, video, ...
    name: str  # the sender's file name, else one for the kind (photo.jpg, voice.ogg) or ""
    size: int  # as Telegram declares it; 0 when it does not
    duration_ms: int = 0


class Update(NamedTuple):
    update_id: int
    command: ReceiveMessage | None  # None: nothing for us (edits, stickers, ...)
    file: TelegramFile | None = None  # to fetch and attach before publishing


# The message fields that carry a file; a message has at most one (an album arrives as
# one message per file).
_FILE_FIELDS = ("photo", "document", "voice", "audio", "video", "video_note")


def _file_of(message: dict[str, Any]) -> TelegramFile | None:
    for kind in _FILE_FIELDS:
        media = message.get(kind)
        if media is None:
            continue
        if kind == "photo":  # one PhotoSize per resolution: keep the largest
            if (
                not isinstance(media, list)
                or not media
                or not all(isinstance(p, dict) for p in media)
            ):
                raise ValueError("message.photo must be a list of sizes")
            media = max(
                media,
                key=lambda p: (
                    _int(p.get("width")) * _int(p.get("height")),
                    _int(p.get("file_size")),
                ),
            )
        if not isinstance(media, dict):
            raise ValueError(f"message.{kind} must be an object")
        file_id = media.get("file_id")
        if not isinstance(file_id, str) or not 0 < len(file_id) <= _MAX_FILE_ID:
            raise ValueError(f"message.{kind}.file_id must be a string")
        name = media.get("file_name") or media.get("title") or ""
        default = {"photo": "photo.jpg", "voice": "voice.ogg", "video_note": "video.mp4"}
        return TelegramFile(
            file_id=file_id,
            kind=kind,
            name=name if isinstance(name, str) and name else default.get(kind, ""),
            size=_int(media.get("file_size")),
            duration_ms=_int(media.get("duration")) * 1000,  # Telegram counts seconds
        )
    return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def parse_update(tenant: str, body: bytes) -> Update:
    """The update's id, its command (None for updates without text or a file) and the
    file to fetch for it. ValueError = 400."""
    try:
        update = json.loads(body)
    except ValueError as exc:
        raise ValueError("malformed JSON") from exc
    if not isinstance(update, dict) or not isinstance(update.get("update_id"), int):
        raise ValueError("an update needs an integer update_id")
    update_id: int = update["update_id"]
    message = update.get("message")
    if message is None:
        return Update(update_id, None)  # edits, callbacks, channel posts: not customers'
    if not isinstance(message, dict):
        raise ValueError("message must be an object")
    chat = message.get("chat")
    message_id = message.get("message_id")
    if not isinstance(chat, dict) or not isinstance(chat.get("id"), int):
        raise ValueError("message.chat.id must be an integer")
    if not isinstance(message_id, int):
        raise ValueError("message.message_id must be an integer")
    file = _file_of(message)
    text = message.get("text")
    if text is None and file is not None:
        caption = message.get("caption", "")
        if not isinstance(caption, str) or len(caption) > MAX_TEXT:
            raise ValueError(f"message.caption must be at most {MAX_TEXT} characters")
        text = caption if caption.strip() else ""
    elif text is None:
        return Update(update_id, None)  # stickers, locations, contacts, ...
    elif not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        raise ValueError(f"message.text must be 1-{MAX_TEXT} characters")
    chat_id = str(chat["id"])
    sender = message.get("from")
    language = sender.get("language_code") if isinstance(sender, dict) else None
    command = ReceiveMessage(
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
    return Update(update_id, command, file)


def notice_for(status_code: int | None) -> str:
    """What the customer is told when their file did not come through."""
    why = {
        413: "it is too large",
        415: "this type of file is not accepted",
        422: "it could not be read",
        507: "we cannot store more files right now",
    }.get(status_code or 0, "it could not be downloaded")
    return f"Sorry, we could not receive your file: {why}. Please try another format or size."


async def _attach(
    edge: TelegramEdge, files: Files | None, command: ReceiveMessage, file: TelegramFile
) -> Attachment:
    """Fetch and accept the file; :class:`FileUnavailable` or :class:`AttachmentRejected`."""
    token = edge.bot_tokens.get(command.tenant_id, "")
    if files is None or edge.files is None or not token:
        raise FileUnavailable("attachments are not configured")
    policy = files.policy
    limit = policy.limit_for(CHANNEL)
    if file.size > limit:  # declared by Telegram: refused without downloading
        raise AttachmentRejected(413, f"attachment over {limit} bytes (the telegram limit)")
    data = await edge.files.download(token, file.file_id, limit)
    return await accept(
        files.store,
        data,
        name=file.name,
        tenant=command.tenant_id,
        conversation=command.conversation_id,
        channel=CHANNEL,
        policy=policy,
        quota=files.quota,
        duration_ms=file.duration_ms,
        customer=command.customer_id,
    )


@router.post("/v1/telegram/{tenant}/webhook")
async def webhook(
    tenant: str,
    request: Request,
    x_telegram_bot_api_secret_token: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    edge: TelegramEdge = request.app.state.telegram
    refuse_disabled(request.app, tenant)
    secret = edge.secrets.get(tenant)
    if not secret:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Telegram is not enabled for this tenant")
    if not x_telegram_bot_api_secret_token:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing secret token")
    if not same_secret(x_telegram_bot_api_secret_token, secret):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "bad secret token")
    body = await read_body(request, edge.max_body)
    try:
        update_id, command, file = parse_update(tenant, body)
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    if command is None:
        return {"ok": True, "published": False}
    services = request.app.state.services
    key = seen_key(tenant, update_id)
    if await services.redis.exists(key):
        return {"ok": True, "published": False, "duplicate": True}
    refused: tuple[int | None, str] | None = None
    if file is not None:
        try:
            attachment = await _attach(
                edge, getattr(request.app.state, "files", None), command, file
            )
            command = dataclasses.replace(command, attachments=(attachment,))
        except AttachmentRejected as exc:
            refused = (exc.status, exc.reason)
        except FileUnavailable as exc:
            refused = (None, exc.reason)
    published = bool(command.text or command.attachments)
    if published:
        await services.publisher.publish(command)
    # Marked after the publish, so a failed publish is retried by Telegram, not lost.
    await services.redis.set(key, b"1", ex=_SEEN_SECONDS)
    answer: dict[str, Any] = {"ok": True, "published": published}
    if published:
        answer["conversation_id"] = command.conversation_id
    if refused is not None and file is not None:
        log.warning(
            "telegram file not accepted: tenant=%s conversation=%s kind=%s status=%s reason=%s",
            tenant,
            command.conversation_id,
            file.kind,
            refused[0],
            refused[1],
        )
        answer["file_refused"] = refused[1]
        token = edge.bot_tokens.get(tenant, "")
        if edge.files is not None and token:  # after the mark: a redelivery does not repeat it
            await edge.files.tell(token, command.customer_id, notice_for(refused[0]))
    return answer


def chunks(text: str, size: int = MAX_OUT) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def send_method(attachment: Attachment) -> tuple[str, str]:
    """The Bot API method for an attachment and the form field its file goes in."""
    mime = attachment.mime_type
    if attachment.kind == "image" and mime != "image/gif" and attachment.size <= MAX_PHOTO:
        return "sendPhoto", "photo"  # a GIF as a photo would lose its animation
    if mime == "audio/ogg":  # OGG/Opus: a voice note
        return "sendVoice", "voice"
    if mime in ("audio/mpeg", "audio/mp4"):  # the formats sendAudio plays
        return "sendAudio", "audio"
    if mime == "video/mp4":
        return "sendVideo", "video"
    return "sendDocument", "document"


def _chat(chat_id: str) -> int | str:
    return int(chat_id) if chat_id.lstrip("-").isdigit() else chat_id


class TelegramSender:
    """A ``ChannelSender``: one bot per tenant; the text, then each attachment from the
    blob store. The Bot API has no idempotency key; a retry after a lost response may
    show a message twice, nothing is dropped silently."""

    def __init__(
        self,
        bot_tokens: Mapping[str, str],
        api_base: str,
        attempts: int = 4,
        backoff: float = 0.5,
        timeout: float = 10.0,
        max_retry_after: float = 30.0,
        http: httpx.AsyncClient | None = None,
        store: BlobStore | None = None,
    ) -> None:
        self._tokens = bot_tokens  # kept, not copied: it may be a live view of the config
        self._base = api_base.rstrip("/")
        self._attempts = attempts
        self._backoff = backoff
        self._max_retry_after = max_retry_after
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._store = store

    async def send(self, reply: ReplyProduced) -> Outcome:
        token = self._tokens.get(reply.tenant_id)
        if not token:
            return Outcome("failed", 0, "no Telegram bot for this tenant")
        if reply.attachments:
            missing = await self._missing(reply.attachments)
            if missing:  # checked first, so the customer never gets half a reply
                return Outcome("failed", 0, missing)
        chat = {"chat_id": _chat(reply.customer_id)}
        attempts = 0
        methods: list[str] = []
        texts = chunks(reply.text) if reply.text or not reply.attachments else []
        for part in texts:
            outcome = await self._call(token, "sendMessage", json={**chat, "text": part})
            attempts += outcome.attempts
            if outcome.status != "delivered":
                return Outcome("failed", attempts, outcome.detail)
        if texts:
            methods.append("sendMessage")
        for attachment in reply.attachments:
            assert self._store is not None  # _missing() refused the reply without one
            try:
                blob = await self._store.get(attachment.storage_key)
            except BlobMissing:  # deleted since the check
                return Outcome("failed", attempts, f"attachment missing: {attachment.name}")
            method, form_field = send_method(attachment)
            data = {k: str(v) for k, v in chat.items()}
            if attachment.duration_ms and method in ("sendVoice", "sendAudio", "sendVideo"):
                data["duration"] = str(attachment.duration_ms // 1000)
            upload = {form_field: (attachment.name, blob.data, attachment.mime_type)}
            outcome = await self._call(token, method, data=data, files=upload)
            attempts += outcome.attempts
            if outcome.status != "delivered":
                return Outcome("failed", attempts, f"{method}: {outcome.detail}")
            methods.append(method)
        return Outcome("delivered", attempts, ",".join(dict.fromkeys(methods)))

    async def _missing(self, attachments: tuple[Attachment, ...]) -> str:
        if self._store is None:
            return "attachments need a blob store"
        for attachment in attachments:
            if not await self._store.exists(attachment.storage_key):
                return f"attachment missing: {attachment.name}"
        return ""

    async def _call(
        self,
        token: str,
        method: str,
        *,
        json: dict[str, Any] | None = None,
        data: dict[str, str] | None = None,
        files: dict[str, tuple[str, bytes, str]] | None = None,
    ) -> Outcome:
        url = f"{self._base}/bot{token}/{method}"
        detail = ""
        attempt = 0
        for attempt in range(1, self._attempts + 1):
            wait = self._backoff * 2 ** (attempt - 1)
            try:
                response = await self._http.post(url, json=json, data=data, files=files)
                if response.status_code < 300:
                    return Outcome("delivered", attempt, method)
                detail = f"HTTP {response.status_code}"
                if response.status_code == 429:
                    wait = max(wait, _retry_after(response, self._max_retry_after))
                elif response.status_code < 500:
                    break  # bad token, chat not found, bot blocked: retrying will not help
            except httpx.HTTPError as exc:
                detail = type(exc).__name__
            if attempt < self._attempts:
                await asyncio.sleep(wait)
        log.warning("telegram %s failed after %d attempts: %s", method, attempt, detail)
        return Outcome("failed", attempt, detail)

    async def close(self) -> None:
        await self._http.aclose()


def _description(response: httpx.Response) -> str:
    try:
        description = response.json().get("description")
    except (ValueError, AttributeError):
        description = None
    if isinstance(description, str) and description:
        return description[:200]
    return f"HTTP {response.status_code}"


def _retry_after(response: httpx.Response, cap: float) -> float:
    try:
        value = float(response.json()["parameters"]["retry_after"])
    except (ValueError, KeyError, TypeError):
        return 0.0
    return min(max(value, 0.0), cap)
