"""WeChat: Official Account callbacks (XML) and mini-program customer-service messages
(JSON), both ways.

In: ``GET /v1/wechat/{tenant}/callback`` answers WeChat's URL check (sha1 of the sorted
token, timestamp and nonce); ``POST`` carries a message, plain or in safe mode (AES-256-
CBC, ``msg_signature`` over token/timestamp/nonce/Encrypt). A text message becomes a
``ReceiveMessage`` whose command id derives from ``MsgId``: WeChat redelivers a callback
it got no answer to, and the conversation agent drops the repeat. ``/v1/wechat-mp/...``
is the same for a mini-program (JSON or XML bodies, always answered ``success``).

Out: WeChat allows one passive reply, in the callback's response, within 5 s. The
callback registers itself as a waiter in Redis and waits up to ``passive_wait`` s; the
sender (in the worker) claims the waiter atomically and hands it the reply, and the
callback acknowledges. A reply nobody waits for (or whose hand-over is not acknowledged)
goes through the customer-service API (``/cgi-bin/message/custom/send``) with an access
token from ``/cgi-bin/token``, cached until shortly before it expires.
"""

from __future__ import annotations

import asyncio
import base64
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
from typing import Any

import httpx
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import PlainTextResponse, Response

from connectors.edge import read_body, same_secret
from connectors.identity import command_id_for, conversation_id_for
from schemas.outcomes import DeliveryOutcome as Outcome
from schemas.records import ReceiveMessage, ReplyProduced
from schemas.time import now_ms

log = logging.getLogger(__name__)
router = APIRouter(tags=["wechat"])
OA = "wechat"
MINI_PROGRAM = "wechat-mp"
MAX_TEXT = 8000
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


# ---------------------------------------------------------------- the callback edge


@dataclass(frozen=True, slots=True)
class WeChatAccount:
    token: str
    encoding_aes_key: str = ""
    app_id: str = ""

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


def _command(tenant: str, channel: str, fields: dict[str, str]) -> ReceiveMessage | None:
    """A text message as a command; other types (events, images, ...) are acknowledged
    and not published."""
    if fields.get("MsgType") != "text":
        return None
    openid, msg_id, text = fields.get("FromUserName"), fields.get("MsgId"), fields.get("Content")
    if not openid or len(openid) > 128 or not msg_id or len(msg_id) > 64:
        raise WeChatError(400, "FromUserName and MsgId are required")
    if not text or not text.strip() or len(text) > MAX_TEXT:
        raise WeChatError(400, f"Content must be 1-{MAX_TEXT} characters")
    return ReceiveMessage(
        command_id=command_id_for(tenant, channel, msg_id),
        conversation_id=conversation_id_for(tenant, channel, openid),
        tenant_id=tenant,
        issued_at=now_ms(),
        channel=channel,
        customer_id=openid,
        text=text,
        channel_message_id=msg_id,
    )


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
    try:
        _check_signature(edge, account, request)
        fields = _open(request, account, parse_xml(body))
        command = _command(tenant, OA, fields)
    except WeChatError as exc:
        raise _fail(exc) from None
    services = request.app.state.services
    if command is None:
        return PlainTextResponse("success")
    text = await _publish_and_wait(services, edge, command)
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
        command = _command(tenant, MINI_PROGRAM, _open(request, account, envelope))
    except WeChatError as exc:
        raise _fail(exc) from None
    if command is not None:
        await request.app.state.services.publisher.publish(command)
    return "success"  # mini-program replies always go through the API


async def _publish_and_wait(services: Any, edge: WeChatEdge, command: ReceiveMessage) -> str | None:
    """Publish, then wait for a passive reply; None = answer "success" (the API delivers)."""
    redis: aioredis.Redis = services.redis
    if edge.passive_wait <= 0:
        await services.publisher.publish(command)
        return None
    token = uuid.uuid4().hex
    waiter = waiter_key(command.tenant_id, command.conversation_id)
    await redis.set(waiter, token, px=int(edge.passive_wait * 1000) + 1000)
    await services.publisher.publish(command)
    reply_key = _reply_key(command.tenant_id, token)
    got = await redis.blpop([reply_key], timeout=edge.passive_wait)
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
    return text


# ---------------------------------------------------------------- outbound


@dataclass(frozen=True, slots=True)
class WeChatApp:
    app_id: str
    app_secret: str


_TOKEN_ERRORS = {40001, 40014, 42001}  # invalid / expired access token: refetch
_BUSY = {-1, 45009}  # system busy, API rate limit: retry


class WeChatSender:
    """A ``ChannelSender`` for an Official Account (``passive=True``: hand the reply to a
    waiting callback first) or a mini-program. WeChat's API has no idempotency key, so a
    retry after a lost response may show a reply twice; nothing is dropped silently."""

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
    ) -> None:
        self._apps = dict(apps)
        self._base = api_base.rstrip("/")
        self._redis = redis
        self._passive = passive and redis is not None
        self._attempts = attempts
        self._backoff = backoff
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._tokens: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def send(self, reply: ReplyProduced) -> Outcome:
        if self._passive and await self._hand_over(reply):
            return Outcome("delivered", 1, "passive reply")
        app = self._apps.get(reply.tenant_id)
        if app is None or not app.app_id or not app.app_secret:
            return Outcome("failed", 0, "no WeChat app id/secret for this tenant")
        return await self._custom_send(app, reply)

    async def _hand_over(self, reply: ReplyProduced) -> bool:
        assert self._redis is not None
        token = await self._redis.getdel(waiter_key(reply.tenant_id, reply.conversation_id))
        if token is None:
            return False
        token_s = token.decode() if isinstance(token, bytes) else str(token)
        key = _reply_key(reply.tenant_id, token_s)
        await self._redis.rpush(key, json.dumps({"text": reply.text, "event_id": reply.event_id}))
        await self._redis.expire(key, 30)
        acked = await self._redis.blpop([_ack_key(reply.tenant_id, token_s)], timeout=2.0)
        return acked is not None

    async def _custom_send(self, app: WeChatApp, reply: ReplyProduced) -> Outcome:
        body = json.dumps(
            {"touser": reply.customer_id, "msgtype": "text", "text": {"content": reply.text}},
            ensure_ascii=False,
        ).encode()
        detail = ""
        attempt = 0
        for attempt in range(1, self._attempts + 1):
            retry = True
            try:
                token = await self._token(app)
                response = await self._http.post(
                    f"{self._base}/cgi-bin/message/custom/send",
                    params={"access_token": token},
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
                if response.status_code >= 300:
                    detail = f"HTTP {response.status_code}"
                else:
                    code = int(response.json().get("errcode", 0))
                    if code == 0:
                        return Outcome("delivered", attempt, "custom/send")
                    detail = f"errcode {code}"
                    if code in _TOKEN_ERRORS:
                        self._tokens.pop(app.app_id, None)
                    retry = code in _TOKEN_ERRORS or code in _BUSY
            except (httpx.HTTPError, ValueError, WeChatError) as exc:
                detail = str(exc) if isinstance(exc, WeChatError) else type(exc).__name__
            if not retry:
                break
            if attempt < self._attempts:
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
        log.warning("wechat delivery failed after %d attempts: %s", attempt, detail)
        return Outcome("failed", attempt, detail)

    async def _token(self, app: WeChatApp) -> str:
        cached = self._tokens.get(app.app_id)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        async with self._locks.setdefault(app.app_id, asyncio.Lock()):
            cached = self._tokens.get(app.app_id)
            if cached and cached[1] > time.monotonic():
                return cached[0]
            response = await self._http.get(
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

    async def close(self) -> None:
        await self._http.aclose()
