"""Web chat widget channel: a WebSocket per browser tab, the ``/chat`` page, ``/widget.js``
and the page's public settings.

Client → server:

- ``{"type": "message", "id": "<client message id>", "text": "...", "attachments":
  [...], "language": "zh" | "en", "profile": {"name", "email", "topic"}, "offline": bool}``
  (a resend with the same id is dropped upstream). ``profile`` (optional: the pre-chat
  or offline form) is kept for the console in ``profile_key`` (a Redis hash outside
  the read model's prefix, so a rebuild keeps it); ``offline: true`` (the offline
  form: requires ``profile.email``) puts the e-mail to answer to at the top of the text,
  so the message on the log says where to reply. (The tenant's personal-data
  moderation masks the address in the text agents read; the profile hash keeps it.)
  ``profile.topic`` (the pre-chat form's topic, a widget ``topics`` id) picks the team
  a new conversation goes to; else the widget's ``team``; else the default team.
- ``{"type": "typing"}``: shown in the agent console.
- ``{"type": "rate", "id", "rating": 1-5, "comment"}``: the customer's CSAT rating of
  the closed conversation (``RateConversation``; the pipeline records it only while it
  waits for one, i.e. after a close that asked for a rating).

Server → client: ``{"type": "history", "messages": [...], "status", "rating",
"profile"}`` on connect; ``{"type": "ack", "id", "message_id"}`` once the message is
durable (``message_id``: the id its ``MessageReceived`` event will have, which the
history and the ``received`` notice use); ``{"type": "reply", ...}`` for each reply;
``{"type": "typing", "from": "agent"}``; the worker's notices
(``connectors.delivery.ChannelDeliverer.notify``): ``queue`` (place in line),
``received`` (the read model lists the message: agents and the AI see it; the page's
"delivered" mark), ``closed``, ``csat`` (a rating is asked for), ``rated``; and
``{"type": "error", "reason": ...}`` for bad input (the socket stays open).

Who the customer is comes from the page: ``customer`` (a signed-in user's id, from the
tenant's site, or an anonymous visitor's) and, for a tenant with a widget secret,
``signature`` over it. Without a valid one the socket is closed with 4401 before
anything is read or written, so knowing a customer's id does not open their
conversation. ``GET /v1/chat/visitor`` gives a new visitor a random, signed id.
``GET /v1/chat/settings`` is what the page and the launcher show: the tenant's colour,
greeting, forms, whether anybody answers now, agents' display names and avatars.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any

from fastapi import APIRouter, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from connectors.auth import (
    TENANT_DISABLED,
    client_ip,
    customer_verified,
    new_visitor,
    refuse_disabled,
    websocket_origin_ok,
)
from connectors.identity import command_id_for, conversation_id_for
from connectors.rate_limit import RateLimiter
from connectors.uploads import UploadRefused, claim_upload_ids, shown_messages
from schemas.config import ConfigState
from schemas.keys import agents_key, conversation_key, messages_key, outbox_channel
from schemas.records import RateConversation, ReceiveMessage, event_id_for
from schemas.time import now_ms

router = APIRouter(tags=["web chat"])
CHANNEL = "web"
MAX_TEXT = 8000
SOCKET_PATH = "/v1/chat/ws"
MAX_NAME = 100
MAX_EMAIL = 254
MAX_COMMENT = 2000
# Deliberately loose (one @, a dot in the domain, no spaces): the form catches typos,
# the agent's mail server is the real check.
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
# What an offline message starts with, in the customer's language: the agent reads
# where to answer before the question.
OFFLINE_HEADER = {
    "zh": "【离线留言】请回复至邮箱：{email}{name}",
    "en": "[Offline message] Please reply by e-mail to: {email}{name}",
}
OFFLINE_NAME = {"zh": "（{name}）", "en": " ({name})"}


def profile_key(tenant_id: str, conversation_id: str) -> str:
    """Hash: what the customer told the pre-chat or offline form (name, email, at).
    Outside the read model's ``kefu:<tenant>:`` prefix, so a rebuild of the projection
    (which clears that prefix) does not lose it; keyed by tenant like every key."""
    return f"kefu-profile:{tenant_id}:{conversation_id}"


@router.get("/chat", response_class=HTMLResponse)
async def chat_page() -> str:
    return (resources.files("connectors") / "static" / "chat.html").read_text("utf-8")


@router.get("/widget.js", include_in_schema=False)
async def widget_script() -> Response:
    script = (resources.files("connectors") / "static" / "widget.js").read_text("utf-8")
    return Response(
        script,
        media_type="application/javascript",
        headers={"Cache-Control": "public, max-age=300"},
    )


@router.get("/v1/chat/visitor")
async def visitor(request: Request, tenant: str) -> dict[str, str]:
    """A new anonymous visitor's customer id and its signature ("" if the tenant signs
    none): the chat page keeps both and presents them on every connect."""
    services = request.app.state.services
    if tenant not in services.tenants.ids:
        raise HTTPException(status_code=404, detail="unknown tenant")
    refuse_disabled(request.app, tenant)
    limiter: RateLimiter | None = getattr(request.app.state, "limiter", None)
    if limiter is not None:
        await limiter.enforce(tenant, f"ip:{client_ip(request)}")
    customer, signature = new_visitor(services.tenants.config, tenant)
    return {"customer": customer, "signature": signature}


@router.get("/v1/chat/settings")
async def chat_settings(request: Request, tenant: str) -> JSONResponse:
    """What the chat page and the launcher show, live from the configuration topic:
    colour, greeting (zh/en), whether to ask name and email first, whether anybody
    answers now (``available``: within business hours, and an agent online or the AI
    on) and the offline message, the agents' display names and avatars (by id, as
    replies name their author). Public: nothing here is more than the page shows; no
    e-mail, role or presence of a single agent."""
    services = request.app.state.services
    if tenant not in services.tenants.ids:
        raise HTTPException(status_code=404, detail="unknown tenant")
    refuse_disabled(request.app, tenant)
    limiter: RateLimiter | None = getattr(request.app.state, "limiter", None)
    if limiter is not None:
        await limiter.enforce(tenant, f"ip:{client_ip(request)}")
    config: ConfigState = request.app.state.config
    widget = config.widget(tenant)
    agents = {
        agent_id: {"name": str(a.get("name") or agent_id), "avatar": _avatar(a.get("avatar"))}
        for agent_id, a in config.agents(tenant).items()
        if not a.get("disabled")
    }
    online = await _agents_online(services.redis, tenant, agents)
    open_now = config.open_now(tenant)
    ai = _ai_enabled(config.get(tenant, "tenant"))
    body = {
        "tenant": tenant,
        "name": str((config.get(tenant, "tenant") or {}).get("name") or tenant),
        "language": str((config.get(tenant, "tenant") or {}).get("language") or ""),
        "color": _color(widget.get("color")),
        "greeting": _texts(widget.get("greeting")),
        "prechat": bool(widget.get("prechat")),
        # The pre-chat form's topic field (ids and labels; the teams stay server-side).
        "topics": _topics(widget.get("topics")),
        "offline_message": _texts(widget.get("offline_message")),
        "open_now": open_now,
        "agents_online": online > 0,
        "ai": ai,
        "available": open_now and (ai or online > 0),
        "agents": agents,
    }
    # Read by the launcher on the tenant's own site (another origin): public and
    # without credentials, so any origin may read it; never cached, it is live.
    headers = {"Access-Control-Allow-Origin": "*", "Cache-Control": "no-store"}
    return JSONResponse(body, headers=headers)


def _topics(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [
        {"id": str(topic.get("id")), "label": _texts(topic.get("label"))}
        for topic in value
        if isinstance(topic, dict) and topic.get("id")
    ]


def web_team(config: ConfigState | None, tenant: str, topic: str = "") -> str:
    """The team a web chat goes to: the picked pre-chat topic's, else the widget's
    ``team``; only a team the tenant has now ("" is the default team)."""
    if config is None:
        return ""
    widget = config.get(tenant, "widget") or {}
    teams = config.all(tenant, "team")
    if topic:
        for found in widget.get("topics") or ():
            if isinstance(found, dict) and found.get("id") == topic:
                team = found.get("team")
                if isinstance(team, str) and team in teams:
                    return team
    team = widget.get("team")
    return team if isinstance(team, str) and team in teams else ""


def _ai_enabled(tenant: Mapping[str, Any] | None) -> bool:
    # As the worker's routing reads it (kefu/worker.py): the seed writes ai_enabled for
    # every tenant of the environment; a disabled tenant has no AI.
    if tenant is None:
        return True
    return bool(tenant.get("ai_enabled", True)) and not tenant.get("disabled")


async def _agents_online(redis: Any, tenant: str, agents: Mapping[str, Any]) -> int:
    """Agents whose presence (routing's events, projected into ``agents_key``) is
    online and who are not disabled in the configuration."""
    found = 0
    for agent_id, raw in (await redis.hgetall(agents_key(tenant))).items():
        name = agent_id.decode() if isinstance(agent_id, bytes) else str(agent_id)
        try:
            presence = json.loads(raw).get("presence")
        except (ValueError, AttributeError):
            continue
        if presence == "online" and (not agents or name in agents):
            found += 1
    return found


def _color(value: Any) -> str:
    text = str(value or "")
    return text if re.fullmatch(r"#[0-9a-fA-F]{6}", text) else "#1565c0"


def _texts(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {lang: str(value[lang]) for lang in ("zh", "en") if value.get(lang)}


def _avatar(value: Any) -> str:
    # Only a web link or a path of this site: never a javascript: or data: URL.
    text = str(value or "")
    return text if re.match(r"(https?://|/(?!/))", text) else ""


class ChatSocketShortcut:
    """ASGI middleware: the widget's socket goes straight to its handler, past routing
    and FastAPI's per-request dependency machinery, which a socket would keep for its
    whole life (about 9 KiB each; bench/RESULTS.md "Web chat sockets")."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == SOCKET_PATH:
            await chat_socket(WebSocket(scope, receive, send))
        else:
            await self.app(scope, receive, send)


@router.websocket(SOCKET_PATH)
async def chat_socket_route(websocket: WebSocket) -> None:
    # Lists the socket among the app's routes; the gateway serves it by the shortcut.
    await chat_socket(websocket)


async def chat_socket(websocket: WebSocket) -> None:
    tenant = websocket.query_params.get("tenant", "")
    customer = websocket.query_params.get("customer", "")
    services = websocket.app.state.services
    if tenant not in services.tenants.ids or not (0 < len(customer) <= 128):
        await websocket.close(code=4403, reason="unknown tenant or bad customer id")
        return
    if services.tenants.ids.disabled(tenant):
        await websocket.close(code=4403, reason=TENANT_DISABLED)
        return
    if not websocket_origin_ok(websocket.app, websocket.headers, tenant):
        # Before accept: the browser's handshake gets 403.
        await websocket.close(code=4403, reason="origin not allowed")
        return
    limiter: RateLimiter | None = getattr(websocket.app.state, "limiter", None)
    client = f"ws:{uuid.uuid4().hex}"  # this socket's own bucket for its frames
    ip = websocket.client.host if websocket.client else "unknown"
    limited = await limiter.check(tenant, f"ip:{ip}") if limiter else None
    # Accepted first, so the page sees the close code (a refused handshake has none).
    await websocket.accept()
    if limited is not None:
        await websocket.send_json({"type": "error", **limited.body()})
        await websocket.close(code=4429, reason="rate limited")
        return
    signature = websocket.query_params.get("signature", "")
    if not customer_verified(services.tenants.config, tenant, customer, signature):
        await websocket.close(code=4401, reason="customer id without a valid signature")
        return
    conversation_id = conversation_id_for(tenant, CHANNEL, customer)
    channel = outbox_channel(tenant, conversation_id)
    # The hub sends this socket's replies itself: one task per socket (this one), none
    # for an idle relay (connectors/outbox_hub.py).
    # Protocol 2 (``v=2``, the page): the history's extra fields and the notices that
    # came with it. A client of protocol 1 gets what it always got, so a client that
    # reads "ack, then reply" is not handed a "received" in between.
    newer = websocket.query_params.get("v") == "2"
    send = websocket.send_text if newer else _protocol_1(websocket.send_text)
    mailbox = services.outbox.subscribe(channel, send)
    try:
        async with services.redis.pipeline(transaction=False) as batch:
            batch.lrange(messages_key(tenant, conversation_id), 0, -1)
            batch.hmget(conversation_key(tenant, conversation_id), "status", "csat")
            batch.hmget(profile_key(tenant, conversation_id), "name", "email")
            history, (status, rating), (name, email) = await batch.execute()
        shown: dict[str, Any] = {
            "type": "history",
            "conversation_id": conversation_id,
            "messages": shown_messages(history, websocket.app.state),
        }
        if newer:
            # A closed conversation without a rating: the page offers the rating.
            shown["status"] = _text(status)
            shown["rating"] = int(rating) if rating else 0
            shown["profile"] = {"name": _text(name), "email": _text(email)}
        await websocket.send_json(shown)
        mailbox.open()  # replies that came in meanwhile follow the history
        while True:
            frame = await websocket.receive_text()
            limited = await limiter.check(tenant, client) if limiter else None
            if limited is not None:
                await websocket.send_json({"type": "error", **limited.body()})
                continue
            reply = await _accept(
                frame,
                tenant,
                customer,
                conversation_id,
                services,
                getattr(websocket.app.state, "config", None),
            )
            if reply is not None:
                await websocket.send_json(reply)
    except WebSocketDisconnect:
        pass
    finally:
        await services.outbox.unsubscribe(channel, mailbox)


# The notices of protocol 2 as ``connectors.delivery`` writes them ("type" first,
# json.dumps' default separators): a prefix test, so a protocol-1 socket costs no parse.
NOTICE_PREFIXES = tuple(f'{{"type": "{kind}"' for kind in ("received", "closed", "csat", "rated"))


def _protocol_1(send: Callable[[str], Awaitable[None]]) -> Callable[[str], Awaitable[None]]:
    async def older(data: str) -> None:
        if not data.startswith(NOTICE_PREFIXES):
            await send(data)

    return older


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


async def _accept(
    frame: str,
    tenant: str,
    customer: str,
    conversation_id: str,
    services: Any,
    config: ConfigState | None = None,
) -> dict[str, Any] | None:
    try:
        data = json.loads(frame)
    except ValueError:
        return {"type": "error", "reason": "frame is not JSON"}
    if isinstance(data, dict) and data.get("type") == "typing":
        # Ephemeral: straight to the conversation's live sockets (the agent console),
        # never to the log.
        event = {"type": "typing", "from": "customer", "conversation_id": conversation_id}
        await services.redis.publish(outbox_channel(tenant, conversation_id), json.dumps(event))
        return None
    if isinstance(data, dict) and data.get("type") == "rate":
        return await _rate(data, tenant, customer, conversation_id, services)
    if not isinstance(data, dict) or data.get("type") != "message":
        return {"type": "error", "reason": 'expected {"type": "message", ...}'}
    text = data.get("text", "")
    message_id = data.get("id") or str(uuid.uuid4())
    upload_ids = data.get("attachments") or []
    language = data.get("language") if isinstance(data.get("language"), str) else None
    if not isinstance(message_id, str) or len(message_id) > 128:
        return {"type": "error", "reason": "id must be a string of at most 128 chars"}
    if not isinstance(upload_ids, list) or not all(isinstance(u, str) for u in upload_ids):
        return {"type": "error", "id": message_id, "reason": "attachments must be a list of ids"}
    if not isinstance(text, str) or len(text) > MAX_TEXT or not (text.strip() or upload_ids):
        return {"type": "error", "id": message_id, "reason": f"text must be 1-{MAX_TEXT} chars"}
    profile = _profile(data.get("profile"))
    if isinstance(profile, str):
        return {"type": "error", "id": message_id, "reason": profile, "field": "profile"}
    if data.get("offline"):
        if not profile.get("email"):
            return {
                "type": "error",
                "id": message_id,
                "reason": "an offline message needs an e-mail address to answer to",
                "field": "email",
            }
        text = _offline_text(text, profile, language)
    try:
        attachments = await claim_upload_ids(services.redis, tenant, conversation_id, upload_ids)
    except UploadRefused as exc:
        return {"type": "error", "id": message_id, "reason": exc.reason}
    if profile:
        # Before the message: a console that sees the message can show who wrote it.
        key = profile_key(tenant, conversation_id)
        await services.redis.hset(key, mapping={**profile, "at": str(now_ms())})
    command_id = command_id_for(tenant, CHANNEL, f"{customer}/{message_id}")
    await services.publisher.publish(
        ReceiveMessage(
            command_id=command_id,
            conversation_id=conversation_id,
            tenant_id=tenant,
            issued_at=now_ms(),
            channel=CHANNEL,
            customer_id=customer,
            text=text,
            channel_message_id=message_id,
            language=language,
            attachments=attachments,
            # Used when this message starts a conversation: the widget's team, or the
            # pre-chat topic's (live from /admin's web chat settings).
            team=web_team(config, tenant, profile.get("topic", "")),
        )
    )
    return {
        "type": "ack",
        "id": message_id,
        "conversation_id": conversation_id,
        # The MessageReceived event's id (the first event of its command): what the
        # history lists the message by and the "received" notice names.
        "message_id": event_id_for(command_id, 0, conversation_id),
    }


def _profile(value: Any) -> dict[str, str] | str:
    """The pre-chat/offline form's fields, trimmed; a string says what is wrong."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        return "profile must be an object with name and email"
    name, email = value.get("name") or "", value.get("email") or ""
    if not isinstance(name, str) or not isinstance(email, str):
        return "profile name and email must be strings"
    topic = value.get("topic") or ""
    if not isinstance(topic, str) or len(topic) > 40:
        return "profile topic must be a topic id"
    name, email = name.strip(), email.strip()
    if len(name) > MAX_NAME:
        return f"name must be at most {MAX_NAME} chars"
    if email and (len(email) > MAX_EMAIL or not EMAIL.fullmatch(email)):
        return "email is not an e-mail address"
    fields = (("name", name), ("email", email), ("topic", topic.strip()))
    return {k: v for k, v in fields if v}


def _offline_text(text: str, profile: Mapping[str, str], language: str | None) -> str:
    lang = "zh" if language == "zh" else "en"
    name = OFFLINE_NAME[lang].format(name=profile["name"]) if profile.get("name") else ""
    header = OFFLINE_HEADER[lang].format(email=profile["email"], name=name)
    return f"{header}\n\n{text}" if text.strip() else header


async def _rate(
    data: dict[str, Any], tenant: str, customer: str, conversation_id: str, services: Any
) -> dict[str, Any]:
    rating, comment = data.get("rating"), data.get("comment") or ""
    rate_id = data.get("id") or str(uuid.uuid4())
    if not isinstance(rate_id, str) or len(rate_id) > 128:
        return {"type": "error", "reason": "id must be a string of at most 128 chars"}
    if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
        return {"type": "error", "id": rate_id, "reason": "rating must be an integer 1-5"}
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        return {"type": "error", "id": rate_id, "reason": f"comment: at most {MAX_COMMENT} chars"}
    # Only a closed conversation is rated: checked here so a stray frame gets a clear
    # answer instead of a command the conversation agent has to refuse.
    status = _text(await services.redis.hget(conversation_key(tenant, conversation_id), "status"))
    if status != "closed":
        return {"type": "error", "id": rate_id, "reason": "nothing to rate: the chat is open"}
    await services.publisher.publish(
        RateConversation(
            command_id=command_id_for(tenant, CHANNEL, f"{customer}/rate/{rate_id}"),
            conversation_id=conversation_id,
            tenant_id=tenant,
            issued_at=now_ms(),
            rating=rating,
            comment=comment.strip(),
        )
    )
    return {"type": "ack", "id": rate_id, "kind": "rate", "conversation_id": conversation_id}
