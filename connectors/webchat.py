"""Web chat widget channel: a WebSocket per browser tab, and the ``/chat`` page.

Client → server: ``{"type": "message", "id": "<client message id>", "text": "..."}``
(a resend with the same id is dropped upstream), ``{"type": "typing"}`` (shown in the
agent console; the console's typing comes back as ``{"type": "typing", "from":
"agent"}``). ``/widget.js`` embeds the chat in any page.
Server → client: ``{"type": "history", "messages": [...]}`` on connect, ``{"type":
"ack", "id": ...}`` once the message is durable, ``{"type": "reply", ...}`` for each
reply, ``{"type": "error", "reason": ...}`` for bad input (the socket stays open).

Who the customer is comes from the page: ``customer`` (a signed-in user's id, from the
tenant's site, or an anonymous visitor's) and, for a tenant with a widget secret,
``signature`` over it. Without a valid one the socket is closed with 4401 before
anything is read or written, so knowing a customer's id does not open their
conversation. ``GET /v1/chat/visitor`` gives a new visitor a random, signed id.
"""

from __future__ import annotations

import json
import uuid
from importlib import resources
from typing import Any

from fastapi import APIRouter, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from connectors.auth import client_ip, customer_verified, new_visitor, websocket_origin_ok
from connectors.identity import command_id_for, conversation_id_for
from connectors.rate_limit import RateLimiter
from connectors.uploads import UploadRefused, claim_upload_ids, shown_messages
from schemas.keys import messages_key, outbox_channel
from schemas.records import ReceiveMessage
from schemas.time import now_ms

router = APIRouter(tags=["web chat"])
CHANNEL = "web"
MAX_TEXT = 8000
SOCKET_PATH = "/v1/chat/ws"


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
    limiter: RateLimiter | None = getattr(request.app.state, "limiter", None)
    if limiter is not None:
        await limiter.enforce(tenant, f"ip:{client_ip(request)}")
    customer, signature = new_visitor(services.tenants.config, tenant)
    return {"customer": customer, "signature": signature}


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
    mailbox = services.outbox.subscribe(channel, websocket.send_text)
    try:
        history = await services.redis.lrange(messages_key(tenant, conversation_id), 0, -1)
        await websocket.send_json(
            {
                "type": "history",
                "conversation_id": conversation_id,
                "messages": shown_messages(history, websocket.app.state),
            }
        )
        mailbox.open()  # replies that came in meanwhile follow the history
        while True:
            frame = await websocket.receive_text()
            limited = await limiter.check(tenant, client) if limiter else None
            if limited is not None:
                await websocket.send_json({"type": "error", **limited.body()})
                continue
            reply = await _accept(frame, tenant, customer, conversation_id, services)
            if reply is not None:
                await websocket.send_json(reply)
    except WebSocketDisconnect:
        pass
    finally:
        await services.outbox.unsubscribe(channel, mailbox)


async def _accept(
    frame: str, tenant: str, customer: str, conversation_id: str, services: Any
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
    if not isinstance(data, dict) or data.get("type") != "message":
        return {"type": "error", "reason": 'expected {"type": "message", ...}'}
    text = data.get("text", "")
    message_id = data.get("id") or str(uuid.uuid4())
    upload_ids = data.get("attachments") or []
    if not isinstance(message_id, str) or len(message_id) > 128:
        return {"type": "error", "reason": "id must be a string of at most 128 chars"}
    if not isinstance(upload_ids, list) or not all(isinstance(u, str) for u in upload_ids):
        return {"type": "error", "id": message_id, "reason": "attachments must be a list of ids"}
    if not isinstance(text, str) or len(text) > MAX_TEXT or not (text.strip() or upload_ids):
        return {"type": "error", "id": message_id, "reason": f"text must be 1-{MAX_TEXT} chars"}
    try:
        attachments = await claim_upload_ids(services.redis, tenant, conversation_id, upload_ids)
    except UploadRefused as exc:
        return {"type": "error", "id": message_id, "reason": exc.reason}
    await services.publisher.publish(
        ReceiveMessage(
            command_id=command_id_for(tenant, CHANNEL, f"{customer}/{message_id}"),
            conversation_id=conversation_id,
            tenant_id=tenant,
            issued_at=now_ms(),
            channel=CHANNEL,
            customer_id=customer,
            text=text,
            channel_message_id=message_id,
            language=data.get("language") if isinstance(data.get("language"), str) else None,
            attachments=attachments,
        )
    )
    return {"type": "ack", "id": message_id, "conversation_id": conversation_id}
