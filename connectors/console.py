"""The human-agent console: the ``/console`` page and its WebSocket ``/v1/console/ws``.

The first frame logs in: ``{"type": "login", "tenant", "agent", "token"}`` (the token
never travels in the URL, so it stays out of access logs); a bad one closes the socket
with 4401. Then, client → server::

    {"type": "presence", "presence": "online" | "away" | "offline"}
    {"type": "open", "conversation_id"}            history + state, kept live
    {"type": "reply", "conversation_id", "text", "id", "attachments"}
                                     id: a resend is not a duplicate; attachments: the
                                     ids ``POST /v1/console/uploads`` answered (text
                                     may then be empty)
    {"type": "transfer", "conversation_id", "team", "agent", "reason"}  team and/or agent
    {"type": "handback", "conversation_id"}         to the AI
    {"type": "close", "conversation_id", "reason"}
    {"type": "typing", "conversation_id"}           shown to the customer

and server → client: ``welcome``, ``snapshot`` (presence, assigned and queued
conversations, sent when it changes), ``conversation`` (the open one's state and recent
messages, sent when its seq moves), ``typing`` (the customer), ``ack`` (the command is
durable in Kafka) and ``error`` (bad frame; the socket stays open).

Live state comes from the Redis read model (``schemas.keys``), polled about once a
second per socket; the outbox channels of the agent's conversations add the customer's
typing and make a reply show at once. Commands are the ones the REST routing API
publishes (``connectors.agent_commands``). An agent acts only on conversations assigned
to them; the pipeline checks the same again.

``POST /v1/console/uploads`` (multipart: ``tenant``, ``agent``, ``conversation_id``,
``file``; the agent's token as ``Authorization: Bearer``, never in the URL): a file for
the agent's next reply on a conversation assigned to them, checked and stored like the
customer's (``connectors.uploads.store_upload``) under the conversation's channel limit.
Messages the console shows carry their attachments with signed links.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import (
    APIRouter,
    File,
    Form,
    Header,
    HTTPException,
    Request,
    UploadFile,
    WebSocket,
    WebSocketDisconnect,
    status,
)
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from connectors.agent_commands import (
    close_command,
    handoff_command,
    presence_command,
    reply_command,
)
from connectors.auth import client_ip, websocket_origin_ok
from connectors.rate_limit import RateLimiter
from connectors.uploads import (
    MAX_ATTACHMENTS,
    UploadRefused,
    claim_upload_ids,
    shown_messages,
    store_upload,
)
from schemas.keys import (
    agents_key,
    assignee_key,
    conversation_key,
    messages_key,
    outbox_channel,
    queue_key,
)

log = logging.getLogger(__name__)
router = APIRouter(tags=["agent console"])

POLL_SECONDS = 1.0
LOGIN_SECONDS = 30.0
LIST_LIMIT = 200
_ID = r"^[A-Za-z0-9_.:@\-]+$"
# Hash fields the console shows for a conversation (never more than the read model has).
SUMMARY_FIELDS = (
    "conversation_id",
    "status",
    "channel",
    "customer_id",
    "assignee",
    "queue",
    "priority",
    "last_message",
    "last_message_at",
    "unread",
    "moderation",
    "sla_breached",
    "seq",
)


@dataclass(frozen=True, slots=True)
class AgentAccount:
    """One agent who may log in: the SHA-256 (hex) of their token, and how routing sees
    them when they go online."""

    token_sha256: str
    team: str = "default"
    skills: tuple[str, ...] = ()
    capacity: int = 3
    name: str = ""


# tenant -> agent id -> account
AgentDirectory = Mapping[str, Mapping[str, AgentAccount]]
_NO_HASH = "0" * 64


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authenticate(
    directory: AgentDirectory, tenant: str, agent: str, token: str
) -> AgentAccount | None:
    """The account, if the token is the agent's. Always one constant-time comparison,
    so a wrong tenant or agent takes as long as a wrong token."""
    account = directory.get(tenant, {}).get(agent)
    expected = account.token_sha256.lower() if account and account.token_sha256 else _NO_HASH
    matches = hmac.compare_digest(token_hash(token), expected)
    return account if matches and expected != _NO_HASH else None


# ----------------------------------------------------------------------------- frames


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")


ConversationId = Annotated[str, Field(min_length=1, max_length=128, pattern=_ID)]


class Login(_Frame):
    type: Literal["login"]
    tenant: str = Field(min_length=1, max_length=64)
    agent: str = Field(min_length=1, max_length=64)
    token: str = Field(min_length=1, max_length=256)


class Presence(_Frame):
    type: Literal["presence"]
    presence: Literal["online", "away", "offline"]


class Open(_Frame):
    type: Literal["open"]
    conversation_id: ConversationId


UploadId = Annotated[str, Field(min_length=1, max_length=64)]


class Reply(_Frame):
    type: Literal["reply"]
    conversation_id: ConversationId
    text: str = Field(default="", max_length=8000)
    id: str | None = Field(default=None, max_length=128, pattern=_ID)
    # Upload ids from POST /v1/console/uploads for this conversation.
    attachments: list[UploadId] = Field(default_factory=list, max_length=MAX_ATTACHMENTS)

    @model_validator(mode="after")
    def _something(self) -> Reply:
        if not (self.text.strip() or self.attachments):
            raise ValueError("a reply needs text or attachments")
        return self


class Transfer(_Frame):
    type: Literal["transfer"]
    conversation_id: ConversationId
    team: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_.:@\-]*$")
    agent: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_.:@\-]*$")
    reason: str = Field(default="", max_length=200)

    @model_validator(mode="after")
    def _somewhere(self) -> Transfer:
        if not (self.team or self.agent):
            raise ValueError("name a team or an agent to transfer to")
        return self


class HandBack(_Frame):
    type: Literal["handback"]
    conversation_id: ConversationId
    reason: str = Field(default="", max_length=200)


class Close(_Frame):
    type: Literal["close"]
    conversation_id: ConversationId
    reason: str = Field(default="resolved", max_length=200)


class Typing(_Frame):
    type: Literal["typing"]
    conversation_id: ConversationId


AnyFrame = Presence | Open | Reply | Transfer | HandBack | Close | Typing
_FRAMES: TypeAdapter[AnyFrame] = TypeAdapter(Annotated[AnyFrame, Field(discriminator="type")])


def parse_frame(raw: str) -> AnyFrame:
    """Raises ``ValueError`` (pydantic's ``ValidationError`` is one) with the reason."""
    return _FRAMES.validate_json(raw)


def _reason(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" if where else str(first["msg"])
    return str(exc)


# ----------------------------------------------------------------------------- routes


@router.get("/console", response_class=HTMLResponse)
async def console_page() -> str:
    return (resources.files("connectors") / "static" / "console.html").read_text("utf-8")


UPLOAD_PATH = "/v1/console/uploads"


@router.post(UPLOAD_PATH, status_code=status.HTTP_201_CREATED)
async def console_upload(
    request: Request,
    tenant: Annotated[str, Form(min_length=1, max_length=64)],
    agent: Annotated[str, Form(min_length=1, max_length=64)],
    conversation_id: Annotated[str, Form(min_length=1, max_length=128, pattern=_ID)],
    file: Annotated[UploadFile, File()],
    authorization: Annotated[str, Header()] = "",
) -> dict[str, Any]:
    """A file for the agent's next reply (its id goes in the reply frame's
    ``attachments``): the agent's token as ``Authorization: Bearer``, and the
    conversation must be assigned to them (404 if their tenant has no such one)."""
    directory: AgentDirectory = getattr(request.app.state, "agents", None) or {}
    scheme, _, token = authorization.partition(" ")
    presented = token.strip() if scheme.lower() == "bearer" else ""
    account = authenticate(directory, tenant, agent, presented)
    limiter: RateLimiter | None = getattr(request.app.state, "limiter", None)
    if account is None:
        if limiter is not None:  # guessing tokens costs the caller's IP bucket
            await limiter.enforce(None, f"ip:{client_ip(request)}")
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown tenant, agent or token")
    if limiter is not None:
        await limiter.enforce(tenant, f"agent:{agent}")
    redis = request.app.state.services.redis
    assignee, channel = (
        _text(v) if v is not None else None
        for v in await redis.hmget(
            conversation_key(tenant, conversation_id), ["assignee", "channel"]
        )
    )
    if channel is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such conversation")
    if assignee != agent:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "that conversation is not assigned to you")
    return await store_upload(request, tenant, conversation_id, channel, file)


@router.websocket("/v1/console/ws")
async def console_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        raw = await asyncio.wait_for(websocket.receive_text(), LOGIN_SECONDS)
        login = Login.model_validate_json(raw)
    except WebSocketDisconnect:
        return
    except (TimeoutError, ValueError):
        await websocket.close(code=4400, reason="first frame must be a login")
        return
    directory: AgentDirectory = getattr(websocket.app.state, "agents", None) or {}
    account = authenticate(directory, login.tenant, login.agent, login.token)
    limiter: RateLimiter | None = getattr(websocket.app.state, "limiter", None)
    if account is None:
        if limiter is not None:  # guessing tokens costs the caller's IP bucket
            ip = websocket.client.host if websocket.client else "unknown"
            await limiter.check(None, f"ip:{ip}")
        await websocket.close(code=4401, reason="unknown tenant, agent or token")
        return
    if not websocket_origin_ok(websocket.app, websocket.headers, login.tenant):
        await websocket.close(code=4403, reason="origin not allowed")
        return
    session = ConsoleSession(websocket, login.tenant, login.agent, account)
    await session.run()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _sessions(websocket: WebSocket) -> Counter[tuple[str, str]]:
    """Open console sockets per agent in this process: the last one going away takes
    the agent offline, not the first of two tabs."""
    state = websocket.app.state
    if not hasattr(state, "console_sessions"):
        state.console_sessions = Counter()
    sessions: Counter[tuple[str, str]] = state.console_sessions
    return sessions


class ConsoleSession:
    def __init__(
        self, websocket: WebSocket, tenant: str, agent: str, account: AgentAccount
    ) -> None:
        self.websocket = websocket
        self.tenant = tenant
        self.agent = agent
        self.account = account
        self.services = websocket.app.state.services
        self.redis = self.services.redis
        self.presence_set: str | None = None  # what this socket last published
        self.open_id: str | None = None
        self.open_seq: str | None = None
        self.last_snapshot: dict[str, Any] | None = None
        self.channels: dict[str, str] = {}  # outbox channel -> conversation id
        self._send_lock = asyncio.Lock()
        self._wake = asyncio.Event()

    @property
    def team_queue(self) -> str:
        return f"{self.tenant}:{self.account.team}"

    async def send(self, frame: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.websocket.send_text(json.dumps(frame, ensure_ascii=False))

    async def run(self) -> None:
        key = (self.tenant, self.agent)
        sessions = _sessions(self.websocket)
        sessions[key] += 1
        log.info("console login tenant=%s agent=%s", self.tenant, self.agent)
        await self.send(
            {
                "type": "welcome",
                "tenant": self.tenant,
                "agent": self.agent,
                "name": self.account.name or self.agent,
                "team": self.account.team,
                "skills": list(self.account.skills),
                "capacity": self.account.capacity,
            }
        )
        pubsub = self.redis.pubsub()
        tasks = [
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._watch(pubsub)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            failed = [t.exception() for t in done if not t.cancelled() and t.exception()]
            if failed:
                # Redis or Kafka trouble: close, so the page reconnects with backoff.
                log.warning(
                    "console session failed tenant=%s agent=%s: %r",
                    self.tenant,
                    self.agent,
                    failed[0],
                )
                with contextlib.suppress(Exception):
                    await self.websocket.close(code=1011, reason="try again")
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            sessions[key] -= 1
            if sessions[key] <= 0:
                del sessions[key]
                if self.presence_set not in (None, "offline"):
                    try:
                        await self._publish_presence("offline")
                    except Exception as exc:  # the socket is gone anyway: log it
                        log.warning("presence offline not published agent=%s: %r", self.agent, exc)
            log.info("console logout tenant=%s agent=%s", self.tenant, self.agent)

    # --- client frames -----------------------------------------------------------

    async def _receive(self) -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                raw = await self.websocket.receive_text()
                limiter: RateLimiter | None = getattr(self.websocket.app.state, "limiter", None)
                limited = (
                    await limiter.check(self.tenant, f"agent:{self.agent}") if limiter else None
                )
                if limited is not None:
                    await self.send({"type": "error", **limited.body()})
                    continue
                try:
                    frame = parse_frame(raw)
                except ValueError as exc:
                    await self.send({"type": "error", "reason": _reason(exc)})
                    continue
                await self.handle(frame)

    async def handle(self, frame: AnyFrame) -> None:
        publisher = self.services.publisher
        if isinstance(frame, Presence):
            command_id = await self._publish_presence(frame.presence)
            await self.send({"type": "ack", "command": "presence", "command_id": command_id})
            self._wake.set()
            return
        if isinstance(frame, Open):
            self.open_id, self.open_seq = frame.conversation_id, None
            if not await self._send_conversation():
                self.open_id = None
                await self.send(
                    {
                        "type": "error",
                        "conversation_id": frame.conversation_id,
                        "reason": "no such conversation",
                    }
                )
            self._wake.set()
            return
        # Everything else acts on a conversation: it must be this agent's.
        state = await self._summary(frame.conversation_id)
        if state is None or state.get("assignee") != self.agent:
            await self.send(
                {
                    "type": "error",
                    "conversation_id": frame.conversation_id,
                    "reason": "that conversation is not assigned to you",
                    **({"id": frame.id} if isinstance(frame, Reply) and frame.id else {}),
                }
            )
            return
        if isinstance(frame, Typing):
            event = {"type": "typing", "from": "agent", "conversation_id": frame.conversation_id}
            await self.redis.publish(
                outbox_channel(self.tenant, frame.conversation_id), json.dumps(event)
            )
            return
        if isinstance(frame, Reply):
            command: Any = reply_command(
                self.tenant, frame.conversation_id, self.agent, frame.text, frame.id
            )
            if frame.attachments:
                try:
                    attachments = await claim_upload_ids(
                        self.redis, self.tenant, frame.conversation_id, frame.attachments
                    )
                except UploadRefused as exc:
                    await self.send(
                        {
                            "type": "error",
                            "conversation_id": frame.conversation_id,
                            "reason": exc.reason,
                            **({"id": frame.id} if frame.id else {}),
                        }
                    )
                    return
                command = dataclasses.replace(command, attachments=attachments)
        elif isinstance(frame, Transfer):
            target = frame.agent or frame.team
            command = handoff_command(
                self.tenant,
                frame.conversation_id,
                "human",
                frame.team,
                frame.reason or f"transferred to {target} by {self.agent}",
                self.agent,
                agent=frame.agent,
            )
        elif isinstance(frame, HandBack):
            command = handoff_command(
                self.tenant, frame.conversation_id, "ai", "", frame.reason, self.agent
            )
        else:
            command = close_command(self.tenant, frame.conversation_id, self.agent, frame.reason)
        await publisher.publish(command)
        ack: dict[str, Any] = {
            "type": "ack",
            "command": frame.type,
            "command_id": command.command_id,
            "conversation_id": frame.conversation_id,
        }
        if isinstance(frame, Reply) and frame.id:
            ack["id"] = frame.id
        await self.send(ack)

    async def _publish_presence(self, presence: str) -> str:
        account = self.account
        command = presence_command(
            self.tenant, self.agent, presence, account.team, account.capacity, account.skills
        )
        await self.services.publisher.publish_routing(command)
        self.presence_set = presence
        return command.command_id

    # --- live state --------------------------------------------------------------

    async def _watch(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            await self._refresh(pubsub)
            deadline = loop.time() + POLL_SECONDS
            while not self._wake.is_set() and (left := deadline - loop.time()) > 0:
                if not pubsub.subscribed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), left)
                    continue
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
                if message and message.get("type") == "message":
                    await self._on_outbox(_text(message["channel"]), message["data"])

    async def _on_outbox(self, channel: str, data: bytes | str) -> None:
        conversation_id = self.channels.get(channel)
        try:
            event = json.loads(data)
        except ValueError:
            return
        if conversation_id is None or not isinstance(event, dict):
            return
        if event.get("type") == "typing" and event.get("from") == "customer":
            await self.send({"type": "typing", "conversation_id": conversation_id})
        elif event.get("type") == "reply":
            self._wake.set()  # the projection has it (or will within the next poll)

    async def _refresh(self, pubsub: Any) -> None:
        redis = self.redis
        assigned_ids = [
            _text(v)
            for v in await redis.zrevrange(assignee_key(self.tenant, self.agent), 0, LIST_LIMIT - 1)
        ]
        queued_ids = [
            _text(v)
            for v in await redis.zrange(queue_key(self.tenant, self.team_queue), 0, LIST_LIMIT - 1)
        ]
        summaries = await self._summaries([*assigned_ids, *queued_ids])
        raw_presence = await redis.hget(agents_key(self.tenant), self.agent)
        presence: dict[str, Any] = {"presence": "offline"}
        if raw_presence:
            with contextlib.suppress(ValueError):
                presence = json.loads(raw_presence)
        assigned = [summaries[c] for c in assigned_ids if c in summaries]
        queued = []
        for position, c in enumerate(queued_ids, start=1):
            if c in summaries:
                queued.append({**summaries[c], "position": position})
        snapshot = {
            "type": "snapshot",
            "presence": presence,
            "team": self.account.team,
            "assigned": assigned,
            "queued": queued,
        }
        if snapshot != self.last_snapshot:
            self.last_snapshot = snapshot
            await self.send(snapshot)
        if self.open_id:
            await self._send_conversation()
        wanted = {outbox_channel(self.tenant, c): c for c in assigned_ids}
        if self.open_id:
            wanted[outbox_channel(self.tenant, self.open_id)] = self.open_id
        gone = [ch for ch in self.channels if ch not in wanted]
        new = [ch for ch in wanted if ch not in self.channels]
        if gone:
            await pubsub.unsubscribe(*gone)
        if new:
            await pubsub.subscribe(*new)
        self.channels = wanted

    async def _summaries(self, ids: list[str]) -> dict[str, dict[str, str]]:
        if not ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for c in ids:
                pipe.hmget(conversation_key(self.tenant, c), list(SUMMARY_FIELDS))
            rows = await pipe.execute()
        out: dict[str, dict[str, str]] = {}
        for c, values in zip(ids, rows, strict=True):
            if any(v is not None for v in values):
                row = {f: _text(v) for f, v in zip(SUMMARY_FIELDS, values, strict=True) if v}
                row["conversation_id"] = c
                out[c] = row
        return out

    async def _summary(self, conversation_id: str) -> dict[str, str] | None:
        return (await self._summaries([conversation_id])).get(conversation_id)

    async def _send_conversation(self) -> bool:
        """Send the open conversation if its seq moved; False if it does not exist."""
        conversation_id = self.open_id
        if conversation_id is None:
            return False
        state = await self._summary(conversation_id)
        if state is None:
            return False
        if state.get("seq") == self.open_seq:
            return True
        raw = await self.redis.lrange(messages_key(self.tenant, conversation_id), 0, -1)
        self.open_seq = state.get("seq")
        await self.send(
            {
                "type": "conversation",
                "conversation_id": conversation_id,
                "state": state,
                "messages": shown_messages(raw, self.websocket.app.state),
            }
        )
        return True
