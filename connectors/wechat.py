"""WeChat: Official Account callbacks (XML) and mini-program customer-service messages
(JSON), both ways.

In: ``GET /v1/wechat/{tenant}/callback`` answers WeChat's URL check (sha1 of the sorted
token, timestamp and nonce); ``POST`` carries a message, plain or in safe mode (AES-256-
CBC, ``msg_signature`` over token/timestamp/nonce/Encrypt). A text message becomes a
``ReceiveMessage`` whose command id derives from ``MsgId``: WeChat redelivers a callback
it got no answer to, and the conversation agent drops the repeat. ``/v1/wechat-mp/...``
is the same for a mini-program (JSON or XML bodies, always answered ``success``).

Media in: an image, voice, video or file message carries a ``MediaId``; the callback
downloads it at once (``/cgi-bin/media/get``, a short total timeout: WeChat redelivers a
callback unanswered after 5 s), passes the bytes through ``connectors.attachments.accept``
and publishes ONE ``ReceiveMessage`` with the attachment (text: a voice message's
``Recognition``, else ""). Media that cannot be accepted (WeChat refuses the MediaId, too
large, a type not allowed, an undecodable image) is answered ``success`` so WeChat stops
retrying, counted in ``kefu_wechat_media_refused_total`` and logged with the reason;
nothing is published for it, but a transcript that came with it still is. A failure that
may pass (timeout, network, WeChat busy) answers 503 so WeChat redelivers; the MsgId
makes the repeat harmless.

Out: WeChat allows one passive reply, in the callback's response, within 5 s. The
callback registers itself as a waiter in Redis and waits up to ``passive_wait`` s; the
sender (in the worker) claims the waiter atomically and hands it the reply, and the
callback acknowledges. A reply nobody waits for (or whose hand-over is not acknowledged)
goes through the customer-service API (``/cgi-bin/message/custom/send``) with an access
token from ``/cgi-bin/token``, cached until shortly before it expires.

Media out: a reply's text goes first, then each attachment: its bytes from the blob store
uploaded as temporary media (``/cgi-bin/media/upload``) and sent as an image (voice and
video too on an Official Account); what WeChat cannot show natively (files, other
formats, over its size limits) goes as a signed, expiring download link: a text message
on an Official Account (its API has no file message), a link message on a mini-program.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import struct
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

import httpx
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import Counter

from connectors.attachments import AttachmentRejected, UrlSigner, accept
from connectors.auth import refuse_disabled
from connectors.blobs import BlobMissing, BlobStore
from connectors.edge import read_body, same_secret
from connectors.identity import command_id_for, conversation_id_for
from connectors.uploads import Files
from schemas.outcomes import DeliveryOutcome as Outcome
from schemas.records import Attachment, ReceiveMessage, ReplyProduced
from schemas.time import now_ms

log = logging.getLogger(__name__)
router = APIRouter(tags=["wechat"])
OA = "wechat"
MINI_PROGRAM = "wechat-mp"
MAX_TEXT = 8000
MEDIA_TYPES = frozenset({"image", "voice", "video", "shortvideo", "file"})
_BLOCK = 32  # WeChat pads to 32-byte blocks (PKCS#7 with k = 32), not AES's 16


class WeChatError(ValueError):
    """A callback that fails a check; ``status`` is the HTTP answer."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status_code


# ---------------------------------------------------------------- pure protocol parts


def signature(*parts: str) -> str:
    """WeChat's signature: sha1 of the parts sorted and concatenated."""
    return hashlib.sha1("".join(sorted(parts)).encode()).hexdigest()


class WeChatCrypto:
    """WXBizMsgCrypt: AES-256-CBC, key = base64(EncodingAESKey + "="), IV = key[:16];
    plaintext = 16 random bytes + 4-byte big-endian length + message + app id."""

    def __init__(self, encoding_aes_key: str, app_id: str) -> None:
        if len(encoding_aes_key) != 43:
            raise ValueError("EncodingAESKey must be 43 characters")
        self.key = base64.b64decode(encoding_aes_key + "=")
        self.app_id = app_id

    def _cipher(self) -> Cipher[modes.CBC]:
        return Cipher(algorithms.AES(self.key), modes.CBC(self.key[:16]))

    def encrypt(self, message: bytes, random: bytes | None = None) -> str:
        body = (random or os.urandom(16)) + struct.pack(">I", len(message))
        body += message + self.app_id.encode()
        pad = _BLOCK - len(body) % _BLOCK
        body += bytes([pad]) * pad
        encryptor = self._cipher().encryptor()
        return base64.b64encode(encryptor.update(body) + encryptor.finalize()).decode()

    def decrypt(self, encrypted: str) -> bytes:
        try:
            raw = base64.b64decode(encrypted, validate=True)
        except ValueError as exc:
            raise WeChatError(400, "Encrypt is not base64") from exc
        if not raw or len(raw) % 16:
            raise WeChatError(400, "Encrypt is not whole AES blocks")
        decryptor = self._cipher().decryptor()
        body = decryptor.update(raw) + decryptor.finalize()
        pad = body[-1]
        if not 1 <= pad <= _BLOCK or body[-pad:] != bytes([pad]) * pad:
            raise WeChatError(400, "bad padding")
        body = body[:-pad]
        if len(body) < 20:
            raise WeChatError(400, "decrypted message too short")
        (length,) = struct.unpack(">I", body[16:20])
        message, app_id = body[20 : 20 + length], body[20 + length :]
        if len(message) != length or app_id.decode(errors="replace") != self.app_id:
            raise WeChatError(403, "decrypted message is not for this app")
        return message


def parse_xml(body: bytes) -> dict[str, str]:
    """A callback's flat ``<xml>`` as a dict. DTDs are refused (entity expansion)."""
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise WeChatError(400, "DTDs are not accepted")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise WeChatError(400, f"malformed XML: {exc}") from exc
    if root.tag != "xml":
        raise WeChatError(400, "root element must be <xml>")
    return {child.tag: (child.text or "") for child in root}


def parse_json(body: bytes) -> dict[str, str]:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise WeChatError(400, "malformed JSON") from exc
    if not isinstance(data, dict):
        raise WeChatError(400, "expected a JSON object")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}


def _cdata(text: str) -> str:
    return "<![CDATA[" + text.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def text_reply_xml(to_user: str, from_user: str, content: str, created: int) -> str:
    return (
        f"<xml><ToUserName>{_cdata(to_user)}</ToUserName>"
        f"<FromUserName>{_cdata(from_user)}</FromUserName>"
        f"<CreateTime>{created}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
        f"<Content>{_cdata(content)}</Content></xml>"
    )


def encrypted_xml(crypto: WeChatCrypto, token: str, plain: str, timestamp: str, nonce: str) -> str:
    encrypt = crypto.encrypt(plain.encode())
    sig = signature(token, timestamp, nonce, encrypt)
    return (
        f"<xml><Encrypt>{_cdata(encrypt)}</Encrypt><MsgSignature>{_cdata(sig)}</MsgSignature>"
        f"<TimeStamp>{timestamp}</TimeStamp><Nonce>{_cdata(nonce)}</Nonce></xml>"
    )


# ---------------------------------------------------------------- the API: tokens, media in


@dataclass(frozen=True, slots=True)
class WeChatApp:
    app_id: str
    app_secret: str


_TOKEN_ERRORS = {40001, 40014, 42001}  # invalid / expired access token: refetch
_BUSY = {-1, 45009}  # system busy, API rate limit: retry


class AccessTokens:
    """Access tokens per app from ``/cgi-bin/token``, cached until shortly before they
    expire; one fetch at a time per app. Each process keeps its own (the gateway for
    media downloads, the worker for sending); a token WeChat calls stale is dropped."""

    def __init__(self, api_base: str) -> None:
        self._base = api_base.rstrip("/")
        self._tokens: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def drop(self, app: WeChatApp) -> None:
        self._tokens.pop(app.app_id, None)

    async def get(self, http: httpx.AsyncClient, app: WeChatApp) -> str:
        cached = self._tokens.get(app.app_id)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        async with self._locks.setdefault(app.app_id, asyncio.Lock()):
            cached = self._tokens.get(app.app_id)
            if cached and cached[1] > time.monotonic():
                return cached[0]
            response = await http.get(
                f"{self._base}/cgi-bin/token",
                params={
                    "grant_type": "client_credential",
                    "appid": app.app_id,
                    "secret": app.app_secret,
                },
            )
            data = response.json() if response.status_code < 300 else {}
            token = data.get("access_token")
            if not isinstance(token, str) or not token:
                code = data.get("errcode", f"HTTP {response.status_code}")
                raise WeChatError(502, f"access token refused: {code}")
            expires = float(data.get("expires_in", 7200))
            # Refresh a little early so a token never expires mid-request.
            self._tokens[app.app_id] = (token, time.monotonic() + max(expires - 300, expires / 2))
            return token


class MediaRefused(ValueError):
    """WeChat will not give these bytes (an errcode such as 40007 invalid media_id), or
    the tenant has no app credentials: retrying the callback cannot help. ``reason`` is
    the metric's label."""

    def __init__(self, detail: str, reason: str = "refused_by_wechat") -> None:
        super().__init__(detail)
        self.reason = reason


class MediaUnavailable(RuntimeError):
    """The download failed in a way that may pass (timeout, network, WeChat busy)."""


@dataclass(frozen=True, slots=True)
class Downloaded:
    data: bytes
    content_type: str
    filename: str


class WeChatMedia:
    """The callback edge's client for ``/cgi-bin/media/get``: the bytes a customer sent,
    read no further than the channel's size limit, within ``timeout`` seconds in all."""

    def __init__(self, api_base: str, timeout: float = 3.0) -> None:
        self._base = api_base.rstrip("/")
        self.api_base = self._base
        self.timeout = timeout
        self._tokens = AccessTokens(api_base)
        self._http: httpx.AsyncClient | None = None  # made in the serving event loop

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.timeout)
        return self._http

    async def download(self, app: WeChatApp, media_id: str, limit: int) -> Downloaded:
        """The media's bytes; :class:`MediaRefused`, :class:`MediaUnavailable`, or
        ``AttachmentRejected`` (413) as soon as the bytes pass ``limit``."""
        if not app.app_id or not app.app_secret:
            raise MediaRefused("no WeChat app id/secret for this tenant", "not_configured")
        try:
            async with asyncio.timeout(self.timeout):
                return await self._download(app, media_id, limit)
        except TimeoutError:
            raise MediaUnavailable(f"download timed out after {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise MediaUnavailable(f"download failed: {type(exc).__name__}") from None
        except WeChatError as exc:  # the token endpoint: busy, down, or a wrong secret
            raise MediaUnavailable(str(exc)) from None

    async def _download(self, app: WeChatApp, media_id: str, limit: int) -> Downloaded:
        http = self._client()
        for attempt in (1, 2):  # a second time only after a stale token
            token = await self._tokens.get(http, app)
            got = await _fetch_capped(
                http,
                f"{self._base}/cgi-bin/media/get",
                {"access_token": token, "media_id": media_id},
                limit,
            )
            answer = _json_answer(got)
            if answer is None:
                return got
            code = _errcode(answer)
            if code in _TOKEN_ERRORS and attempt == 1:
                self._tokens.drop(app)
                continue
            if code in _BUSY:
                raise MediaUnavailable(f"media/get: errcode {code}")
            if code:
                raise MediaRefused(f"media/get: errcode {code} ({answer.get('errmsg', '')})")
            # A video's bytes are not in the answer but behind a download URL.
            url = answer.get("video_url")
            if isinstance(url, str) and url.startswith(("https://", "http://")):
                return await _fetch_capped(http, url, {}, limit)
            raise MediaRefused("media/get: a JSON answer without media")
        raise MediaUnavailable("media/get: the access token stayed stale")

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()


def _errcode(answer: Mapping[str, Any]) -> int:
    try:
        return int(answer.get("errcode", 0))
    except (TypeError, ValueError):
        return -1


async def _fetch_capped(
    http: httpx.AsyncClient, url: str, params: dict[str, str], limit: int
) -> Downloaded:
    async with http.stream("GET", url, params=params) as response:
        if response.status_code >= 300:
            raise MediaUnavailable(f"media download: HTTP {response.status_code}")
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise AttachmentRejected(413, f"attachment over {limit} bytes")
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:  # stop reading: the rest may be gigabytes
                raise AttachmentRejected(413, f"attachment over {limit} bytes")
            chunks.append(chunk)
        disposition = Message()
        disposition["Content-Disposition"] = response.headers.get("Content-Disposition", "")
        return Downloaded(
            b"".join(chunks),
            response.headers.get("Content-Type", ""),
            disposition.get_filename("") or "",
        )


def _json_answer(got: Downloaded) -> dict[str, Any] | None:
    """media/get's JSON answer (an error, or a video's URL); None when it sent bytes."""
    if got.data.lstrip()[:1] != b"{" or len(got.data) > 64 * 1024:
        return None
    if not any(t in got.content_type for t in ("json", "text/plain")) and got.content_type:
        return None
    try:
        answer = json.loads(got.data)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


# ---------------------------------------------------------------- the callback edge


@dataclass(frozen=True, slots=True)
class WeChatAccount:
    token: str
    encoding_aes_key: str = ""
    app_id: str = ""
    app_secret: str = ""  # for an access token to download the media customers send

    @property
    def app(self) -> WeChatApp:
        return WeChatApp(self.app_id, self.app_secret)

    def crypto(self) -> WeChatCrypto | None:
        return WeChatCrypto(self.encoding_aes_key, self.app_id) if self.encoding_aes_key else None


@dataclass(frozen=True, slots=True)
class WeChatEdge:
    """What the gateway knows about WeChat (tenant -> account; no token = disabled)."""

    accounts: Mapping[str, WeChatAccount] = field(default_factory=dict)
    mini_programs: Mapping[str, WeChatAccount] = field(default_factory=dict)
    max_body: int = 64 * 1024
    passive_wait: float = 4.0
    max_skew: float = 300.0  # 0 = no timestamp check
    media: WeChatMedia | None = None  # None: media messages are acknowledged, not kept


def waiter_key(tenant_id: str, conversation_id: str) -> str:
    """String: the token of the callback waiting to answer this conversation passively."""
    return f"kefu:{tenant_id}:wechat:passive:{conversation_id}"


def _reply_key(tenant_id: str, token: str) -> str:
    return f"kefu:{tenant_id}:wechat:passive-reply:{token}"


def _ack_key(tenant_id: str, token: str) -> str:
    return f"kefu:{tenant_id}:wechat:passive-ack:{token}"


_WITHDRAW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
_HANDOVER_GRACE = 0.5  # the sender claimed us: its reply is a Redis round trip away


def _account(request: Request, tenant: str, mini: bool) -> tuple[WeChatEdge, WeChatAccount]:
    edge: WeChatEdge = request.app.state.wechat
    refuse_disabled(request.app, tenant)
    account = (edge.mini_programs if mini else edge.accounts).get(tenant)
    if account is None or not account.token:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "WeChat is not enabled for this tenant")
    return edge, account


def _check_signature(edge: WeChatEdge, account: WeChatAccount, request: Request) -> None:
    q = request.query_params
    sig, timestamp, nonce = q.get("signature"), q.get("timestamp"), q.get("nonce")
    if not sig or not timestamp or not nonce:
        raise WeChatError(401, "signature, timestamp and nonce are required")
    if not same_secret(sig, signature(account.token, timestamp, nonce)):
        raise WeChatError(403, "bad signature")
    if edge.max_skew and (
        not timestamp.isdigit() or abs(time.time() - int(timestamp)) > edge.max_skew
    ):
        raise WeChatError(403, "timestamp outside the allowed window")


def _open(request: Request, account: WeChatAccount, fields: dict[str, str]) -> dict[str, str]:
    """The message fields of a callback: decrypted in safe mode (required when a key is
    configured, since the plain signature does not cover the body)."""
    crypto = account.crypto()
    if crypto is None:
        return fields
    encrypt = fields.get("Encrypt")
    if not encrypt:
        raise WeChatError(400, "safe mode: the body must carry Encrypt")
    q = request.query_params
    expected = signature(account.token, q.get("timestamp", ""), q.get("nonce", ""), encrypt)
    if not same_secret(q.get("msg_signature", ""), expected):
        raise WeChatError(403, "bad msg_signature")
    plain = crypto.decrypt(encrypt)
    return parse_json(plain) if plain.lstrip()[:1] == b"{" else parse_xml(plain)


@dataclass(frozen=True, slots=True)
class MediaRef:
    """The media a message points at: downloaded before the message is published."""

    msg_type: str
    media_id: str
    name: str = ""


def _command(
    tenant: str, channel: str, fields: dict[str, str]
) -> tuple[ReceiveMessage, MediaRef | None] | None:
    """A text or media message as a command (a media message's without its attachment
    yet); other types (events, locations, links) are acknowledged and not published."""
    msg_type = fields.get("MsgType", "")
    if msg_type != "text" and msg_type not in MEDIA_TYPES:
        return None
    openid, msg_id = fields.get("FromUserName"), fields.get("MsgId")
    if not openid or len(openid) > 128 or not msg_id or len(msg_id) > 64:
        raise WeChatError(400, "FromUserName and MsgId are required")
    media = None
    if msg_type == "text":
        text = fields.get("Content", "")
        if not text.strip() or len(text) > MAX_TEXT:
            raise WeChatError(400, f"Content must be 1-{MAX_TEXT} characters")
    else:
        media_id = fields.get("MediaId", "")
        if not media_id or len(media_id) > 256:
            raise WeChatError(400, "MediaId is required")
        # A voice message's transcript (when speech recognition is on) is its text.
        text = fields.get("Recognition", "").strip()[:MAX_TEXT]
        media = MediaRef(msg_type, media_id, _media_name(msg_type, fields))
    command = ReceiveMessage(
        command_id=command_id_for(tenant, channel, msg_id),
        conversation_id=conversation_id_for(tenant, channel, openid),
        tenant_id=tenant,
        issued_at=now_ms(),
        channel=channel,
        customer_id=openid,
        text=text,
        channel_message_id=msg_id,
    )
    return command, media


def _media_name(msg_type: str, fields: dict[str, str]) -> str:
    """A name from the callback when it has one; else "" (media/get's filename, or a
    default from the sniffed type)."""
    if msg_type == "file":
        return fields.get("Title") or fields.get("FileName") or ""
    voice_format = fields.get("Format", "").lower()
    if msg_type == "voice" and voice_format.isalnum() and len(voice_format) <= 8:
        return f"voice.{voice_format}"
    return ""


MEDIA_REFUSED = Counter(
    "kefu_wechat_media_refused_total",
    "WeChat media answered 'success' but not kept (nothing published for the file)",
    ["tenant", "channel", "reason"],
)
_REJECTED = {413: "too_large", 415: "type_not_allowed", 422: "invalid", 507: "quota"}


async def _with_media(
    request: Request, channel: str, account: WeChatAccount, command: ReceiveMessage, media: MediaRef
) -> ReceiveMessage | None:
    """``command`` with the media stored and attached; the text alone (or None: nothing
    to publish) when the media cannot be accepted; 503 when the download may succeed
    if WeChat redelivers the callback."""
    edge: WeChatEdge = request.app.state.wechat
    files: Files | None = getattr(request.app.state, "files", None)
    tenant = command.tenant_id
    try:
        if edge.media is None or files is None:
            raise MediaRefused("attachments are not configured", "not_configured")
        got = await edge.media.download(
            account.app, media.media_id, files.policy.limit_for(channel)
        )
        attachment = await accept(
            files.store,
            got.data,
            name=media.name or got.filename,
            tenant=tenant,
            conversation=command.conversation_id,
            channel=channel,
            policy=files.policy,
            quota=files.quota,
            customer=command.customer_id,
        )
    except MediaUnavailable as exc:
        log.warning(
            "wechat %s %s (tenant=%s msg_id=%s) not downloaded, WeChat will redeliver: %s",
            channel,
            media.msg_type,
            tenant,
            command.channel_message_id,
            exc,
        )
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "media not available yet"
        ) from None
    except (MediaRefused, AttachmentRejected) as exc:
        if isinstance(exc, AttachmentRejected):
            reason = _REJECTED.get(exc.status, "invalid")
        else:
            reason = exc.reason
        MEDIA_REFUSED.labels(tenant, channel, reason).inc()
        log.warning(
            "wechat %s %s (tenant=%s msg_id=%s) not accepted (%s): %s",
            channel,
            media.msg_type,
            tenant,
            command.channel_message_id,
            reason,
            exc,
        )
        return command if command.text else None
    return dataclasses.replace(command, attachments=(attachment,))


def _fail(exc: WeChatError) -> HTTPException:
    return HTTPException(exc.status, str(exc))


@router.get("/v1/wechat/{tenant}/callback", response_class=PlainTextResponse)
async def oa_verify(tenant: str, request: Request, echostr: str = "") -> str:
    edge, account = _account(request, tenant, mini=False)
    try:
        _check_signature(edge, account, request)
    except WeChatError as exc:
        raise _fail(exc) from None
    return echostr


@router.get("/v1/wechat-mp/{tenant}/callback", response_class=PlainTextResponse)
async def mp_verify(tenant: str, request: Request, echostr: str = "") -> str:
    edge, account = _account(request, tenant, mini=True)
    try:
        _check_signature(edge, account, request)
    except WeChatError as exc:
        raise _fail(exc) from None
    return echostr


@router.post("/v1/wechat/{tenant}/callback")
async def oa_message(tenant: str, request: Request) -> Response:
    edge, account = _account(request, tenant, mini=False)
    body = await read_body(request, edge.max_body)
    started = time.monotonic()
    try:
        _check_signature(edge, account, request)
        fields = _open(request, account, parse_xml(body))
        parsed = _command(tenant, OA, fields)
    except WeChatError as exc:
        raise _fail(exc) from None
    services = request.app.state.services
    if parsed is None:
        return PlainTextResponse("success")
    command: ReceiveMessage | None = parsed[0]
    if parsed[1] is not None:
        command = await _with_media(request, OA, account, parsed[0], parsed[1])
    if command is None:
        return PlainTextResponse("success")
    # The download spent part of WeChat's 5 s: wait the rest, not the whole window.
    wait = edge.passive_wait - (time.monotonic() - started) if edge.passive_wait > 0 else 0.0
    text = await _publish_and_wait(services, command, wait)
    if text is None:
        return PlainTextResponse("success")
    xml = text_reply_xml(command.customer_id, fields.get("ToUserName", ""), text, int(time.time()))
    crypto = account.crypto()
    if crypto is not None:
        q = request.query_params
        nonce = q.get("nonce") or secrets.token_hex(8)
        xml = encrypted_xml(crypto, account.token, xml, str(int(time.time())), nonce)
    return Response(xml, media_type="application/xml")


@router.post("/v1/wechat-mp/{tenant}/callback", response_class=PlainTextResponse)
async def mp_message(tenant: str, request: Request) -> str:
    edge, account = _account(request, tenant, mini=True)
    body = await read_body(request, edge.max_body)
    try:
        _check_signature(edge, account, request)
        envelope = parse_xml(body) if body.lstrip()[:1] == b"<" else parse_json(body)
        parsed = _command(tenant, MINI_PROGRAM, _open(request, account, envelope))
    except WeChatError as exc:
        raise _fail(exc) from None
    if parsed is None:
        return "success"
    command: ReceiveMessage | None = parsed[0]
    if parsed[1] is not None:
        command = await _with_media(request, MINI_PROGRAM, account, parsed[0], parsed[1])
    if command is not None:
        await request.app.state.services.publisher.publish(command)
    return "success"  # mini-program replies always go through the API


async def _publish_and_wait(services: Any, command: ReceiveMessage, wait: float) -> str | None:
    """Publish, then wait up to ``wait`` s for a passive reply; None = answer "success"
    (the API delivers, or the reply had only attachments)."""
    redis: aioredis.Redis = services.redis
    if wait <= 0.05:
        await services.publisher.publish(command)
        return None
    token = uuid.uuid4().hex
    waiter = waiter_key(command.tenant_id, command.conversation_id)
    await redis.set(waiter, token, px=int(wait * 1000) + 1000)
    await services.publisher.publish(command)
    reply_key = _reply_key(command.tenant_id, token)
    got = await redis.blpop([reply_key], timeout=wait)
    if got is None:
        if await redis.eval(_WITHDRAW, 1, waiter, token):
            return None  # withdrawn before any sender claimed it
        got = await redis.blpop([reply_key], timeout=_HANDOVER_GRACE)
        if got is None:
            return None  # the sender sees no ack and uses the API
    ack = _ack_key(command.tenant_id, token)
    await redis.rpush(ack, b"1")
    await redis.expire(ack, 30)
    text: str = json.loads(got[1])["text"]
    return text or None


# ---------------------------------------------------------------- outbound


# What WeChat's temporary media takes (type: formats, bytes); anything else goes as a link.
_NATIVE: dict[str, tuple[frozenset[str], int]] = {
    "image": (frozenset({"image/jpeg", "image/png", "image/gif"}), 10 * 1024 * 1024),
    "voice": (frozenset({"audio/amr", "audio/mpeg"}), 2 * 1024 * 1024),
    "video": (frozenset({"video/mp4"}), 10 * 1024 * 1024),
}
_KIND_TO_MEDIA = {"image": "image", "audio": "voice", "video": "video"}
# media/upload's "this file will not do" (invalid type, file type, size): send a link.
_UNUPLOADABLE = {40004, 40005, 40006, 40009, 40010, 40011}


@dataclass(frozen=True, slots=True)
class _Answer:
    """One API call's end, retries included: the JSON when errcode 0, else why."""

    data: dict[str, Any] | None
    attempts: int
    detail: str
    errcode: int | None = None


class WeChatSender:
    """A ``ChannelSender`` for an Official Account (``passive=True``: hand the reply to a
    waiting callback first) or a mini-program (``mini_program=True``: its customer-service
    API sends text, images and links only). Attachments need the blob store (``store``)
    and, for the ones sent as links, the ``signer``. WeChat's API has no idempotency key,
    so a retry after a lost response may show a reply twice; nothing is dropped silently."""

    def __init__(
        self,
        apps: Mapping[str, WeChatApp],
        api_base: str,
        redis: aioredis.Redis | None = None,
        passive: bool = False,
        attempts: int = 4,
        backoff: float = 0.5,
        timeout: float = 10.0,
        http: httpx.AsyncClient | None = None,
        store: BlobStore | None = None,
        signer: UrlSigner | None = None,
        mini_program: bool = False,
    ) -> None:
        self._apps = apps  # kept, not copied: it may be a live view of the config
        self._base = api_base.rstrip("/")
        self._redis = redis
        self._passive = passive and redis is not None
        self._attempts = attempts
        self._backoff = backoff
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._tokens = AccessTokens(api_base)
        self._store = store
        self._signer = signer
        self._mini = mini_program

    async def send(self, reply: ReplyProduced) -> Outcome:
        if not reply.attachments:
            if self._passive and await self._hand_over(reply, reply.text):
                return Outcome("delivered", 1, "passive reply")
        elif self._passive:
            # Free the waiting callback at once (it answers "success"): text and files go
            # through the API, in order, which one passive reply could not keep.
            await self._hand_over(reply, "")
        app = self._apps.get(reply.tenant_id)
        if app is None or not app.app_id or not app.app_secret:
            return Outcome("failed", 0, "no WeChat app id/secret for this tenant")
        if not reply.attachments:
            return self._outcome(await self._message(app, _text(reply.customer_id, reply.text)))
        return await self._send_with_attachments(app, reply)

    async def _hand_over(self, reply: ReplyProduced, text: str) -> bool:
        assert self._redis is not None
        token = await self._redis.getdel(waiter_key(reply.tenant_id, reply.conversation_id))
        if token is None:
            return False
        token_s = token.decode() if isinstance(token, bytes) else str(token)
        key = _reply_key(reply.tenant_id, token_s)
        await self._redis.rpush(key, json.dumps({"text": text, "event_id": reply.event_id}))
        await self._redis.expire(key, 30)
        acked = await self._redis.blpop([_ack_key(reply.tenant_id, token_s)], timeout=2.0)
        return acked is not None

    def _outcome(self, answer: _Answer, what: str = "custom/send") -> Outcome:
        if answer.data is not None:
            return Outcome("delivered", answer.attempts, what)
        log.warning("wechat delivery failed after %d attempts: %s", answer.attempts, answer.detail)
        return Outcome("failed", answer.attempts, answer.detail)

    async def _send_with_attachments(self, app: WeChatApp, reply: ReplyProduced) -> Outcome:
        """Text first, then each attachment; stops at the first that fails, saying what
        went out before it."""
        attempts, sent = 0, []
        if reply.text.strip():
            answer = await self._message(app, _text(reply.customer_id, reply.text))
            if answer.data is None:
                return self._outcome(answer)
            attempts, sent = answer.attempts, ["text"]
        for number, attachment in enumerate(reply.attachments, 1):
            body, prepared = await self._attachment_message(app, reply.customer_id, attachment)
            answer = prepared if body is None else await self._message(app, body)
            attempts = max(attempts, prepared.attempts, answer.attempts)
            if body is None or answer.data is None:
                went = ", ".join(sent) or "nothing"
                detail = f"attachment {number} ({attachment.kind}): {answer.detail}; sent: {went}"
                return self._outcome(dataclasses.replace(answer, attempts=attempts, detail=detail))
            sent.append(f"{body['msgtype']} {number}")
        return Outcome("delivered", attempts, "custom/send: " + ", ".join(sent))

    async def _attachment_message(
        self, app: WeChatApp, touser: str, attachment: Attachment
    ) -> tuple[dict[str, Any] | None, _Answer]:
        """The message that shows ``attachment`` (its media uploaded first), or None and
        why not."""
        media_type = _KIND_TO_MEDIA.get(attachment.kind, "")
        if self._mini and media_type != "image":
            media_type = ""
        formats, max_size = _NATIVE.get(media_type, (frozenset(), 0))
        fits = attachment.mime_type in formats and attachment.size <= max_size
        if self._store is not None and fits:
            try:
                blob = await self._store.get(attachment.storage_key)
            except BlobMissing:
                return None, _Answer(None, 0, "the attachment's bytes are gone")
            upload = await self._call(
                app,
                "/cgi-bin/media/upload",
                params={"type": media_type},
                files={"media": (attachment.name, blob.data, attachment.mime_type)},
            )
            media_id = (upload.data or {}).get("media_id")
            if isinstance(media_id, str) and media_id:
                content: dict[str, str] = {"media_id": media_id}
                if media_type == "video":
                    content["title"] = attachment.name
                return {"touser": touser, "msgtype": media_type, media_type: content}, upload
            if upload.errcode not in _UNUPLOADABLE:
                detail = f"upload: {upload.detail or 'no media_id'}"
                return None, _Answer(None, upload.attempts, detail, upload.errcode)
        return self._link_message(touser, attachment)

    def _link_message(
        self, touser: str, attachment: Attachment
    ) -> tuple[dict[str, Any] | None, _Answer]:
        if self._signer is None:
            return None, _Answer(None, 0, "cannot send this attachment type: no link signer")
        url = self._signer.url(attachment.storage_key, absolute=True)
        if not self._mini:  # the Official Account API has no file message: a link in text
            return _text(touser, f"{attachment.name}\n{url}"), _Answer({}, 0, "")
        thumb = (
            self._signer.url(attachment.thumbnail_key, absolute=True)
            if attachment.thumbnail_key
            else ""
        )
        link = {"title": attachment.name, "description": attachment.mime_type, "url": url}
        link["thumb_url"] = thumb
        return {"touser": touser, "msgtype": "link", "link": link}, _Answer({}, 0, "")

    async def _message(self, app: WeChatApp, body: dict[str, Any]) -> _Answer:
        content = json.dumps(body, ensure_ascii=False).encode()
        return await self._call(
            app,
            "/cgi-bin/message/custom/send",
            content=content,
            headers={"Content-Type": "application/json"},
        )

    async def _call(self, app: WeChatApp, path: str, **request: Any) -> _Answer:
        """POST ``path`` with the app's token: a stale token is refetched, a busy API or
        an HTTP failure retried with backoff, any other errcode returned at once."""
        params = dict(request.pop("params", {}))
        detail, code = "", None
        attempt = 0
        for attempt in range(1, self._attempts + 1):
            retry = True
            try:
                token = await self._tokens.get(self._http, app)
                response = await self._http.post(
                    f"{self._base}{path}", params={**params, "access_token": token}, **request
                )
                if response.status_code >= 300:
                    detail = f"HTTP {response.status_code}"
                else:
                    data = response.json()
                    code = _errcode(data)
                    if code == 0:
                        return _Answer(data, attempt, "")
                    detail = f"errcode {code}"
                    if code in _TOKEN_ERRORS:
                        self._tokens.drop(app)
                    retry = code in _TOKEN_ERRORS or code in _BUSY
            except (httpx.HTTPError, ValueError, WeChatError) as exc:
                detail = str(exc) if isinstance(exc, WeChatError) else type(exc).__name__
            if not retry:
                break
            if attempt < self._attempts:
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
        return _Answer(None, attempt, detail, code)

    async def close(self) -> None:
        await self._http.aclose()


def _text(touser: str, content: str) -> dict[str, Any]:
    return {"touser": touser, "msgtype": "text", "text": {"content": content}}
