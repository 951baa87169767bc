"""The human-agent console: the ``/console`` page and its WebSocket ``/v1/console/ws``.

The first frame logs in, one of two ways (a bad one closes the socket with 4401):

- ``{"type": "login", "tenant", "agent", "token"}``: the agent's token (integrations,
  and agents configured with one). It never travels in the URL, so it stays out of
  access logs.
- ``{"type": "login"}``: the ``kefu_session`` cookie the handshake carried (signed in
  with email and password, ``connectors.accounts``). Only from the gateway's own
  origin: a site a tenant lists for its widget must not ride an agent's session.

Then, client → server::

    {"type": "presence", "presence": "online" | "away" | "offline"}
    {"type": "open", "conversation_id"}            history + state, kept live
    {"type": "reply", "conversation_id", "text", "id", "attachments"}
                                     id: a resend is not a duplicate; attachments: the
                                     ids ``POST /v1/console/uploads`` answered (text
                                     may then be empty)
    {"type": "note", "conversation_id", "text", "id"}  an internal note (any agent of
                                     the tenant; never sent to the customer)
    {"type": "transfer", "conversation_id", "team", "agent", "reason"}  team and/or agent
    {"type": "handback", "conversation_id"}         to the AI
    {"type": "close", "conversation_id", "reason"}
    {"type": "typing", "conversation_id"}           shown to the customer
    {"type": "search", "query", "id"}               the tenant's conversations (ClickHouse)
    {"type": "profile", "conversation_id"}          its customer and their past conversations

and server → client: ``welcome`` (who, the tenant's canned responses, and its
``directory``: agents' and teams' display names by id, whether the tenant has an AI
responder), ``directory`` (again when an admin changed it), ``snapshot``
(presence, assigned and queued conversations, sent when it changes), ``conversation``
(the open one's state and recent messages, notes included, sent when its seq moves),
``canned`` (the canned responses again when an admin changed them), ``typing`` (the
customer), ``search`` and ``profile`` (answers), ``ack`` (the command is durable in
Kafka) and ``error`` (bad frame; the socket stays open).

Live state comes from the Redis read model (``schemas.keys``), polled about once a
second per socket; the outbox channels of the agent's conversations add the customer's
typing and make a reply show at once. Commands are the ones the REST routing API
publishes (``connectors.agent_commands``). An agent acts only on conversations assigned
to them (a note: on any of their tenant's); the pipeline checks the same again. Search
and profiles read ClickHouse through the gateway's analytics (``app.state.dashboard``'s
``select``), with every value a bound query parameter and the tenant always the
agent's own.

``POST /v1/console/uploads`` (multipart: ``tenant``, ``agent``, ``conversation_id``,
``file``; or the file as the body with those fields and ``name`` in the query string;
the agent's token as ``Authorization: Bearer``, never in the URL, or the
session cookie with its CSRF token in ``X-CSRF-Token``): a file for the agent's next
reply on a conversation assigned to them, checked and stored like the customer's
(``connectors.uploads.store_upload``) under the conversation's channel limit.
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
    Header,
    HTTPException,
    Request,
    WebSocket,
    WebSocketDisconnect,
    status,
)
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from connectors.accounts import COOKIE, CSRF_HEADER, Session, csrf_ok, session_of
from connectors.agent_commands import (
    close_command,
    handoff_command,
    note_command,
    presence_command,
    reply_command,
)
from connectors.auth import client_ip, websocket_origin_ok
from connectors.rate_limit import RateLimiter
from connectors.uploads import (
    MAX_ATTACHMENTS,
    UploadBody,
    UploadRefused,
    claim_upload_ids,
    shown_messages,
    store_upload,
    upload_openapi,
)
from connectors.webchat import profile_key
from schemas.config import ConfigState
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
    "messages",
    "created_at",
    "updated_at",
)
SEARCH_LIMIT = 50
HISTORY_LIMIT = 50
# The tenant's conversations whose moderated messages (what agents may read: masked,
# blocked ones left out), notes, customer id or conversation id contain the query.
# Every value is a bound parameter ({name:Type}); only {database} is filled in here.
SEARCH_SQL = """
SELECT
    conversation_id,
    anyIf(channel, type = 'MessageReceived') AS channel,
    anyIf(JSONExtractString(payload, 'customer_id'), type = 'MessageReceived') AS customer_id,
    toUnixTimestamp64Milli(max(occurred_at)) AS last_at,
    countIf(matched) AS hits,
    argMaxIf(text, seq, matched) AS snippet,
    argMaxIf(type, seq, matched) AS snippet_type
FROM
(
    SELECT
        conversation_id, channel, type, seq, occurred_at, payload,
        JSONExtractString(payload, 'text') AS text,
        type IN ('MessageModerated', 'NoteAdded')
            AND JSONExtractString(payload, 'verdict') != 'block'
            AND positionCaseInsensitiveUTF8(text, {q:String}) > 0 AS matched
    FROM {database}.events
    WHERE tenant_id = {tenant:String}
)
GROUP BY conversation_id
HAVING hits > 0
    OR positionCaseInsensitiveUTF8(customer_id, {q:String}) > 0
    OR conversation_id = {q:String}
ORDER BY last_at DESC
LIMIT {limit:UInt32}
"""
# A customer's conversations in the tenant (on any channel), one row per session: a
# conversation id is one customer on one channel and reopens after a close, so a
# session starts at the first message after a close (events after the close, such as
# the rating, stay with the session they close).
PROFILE_SQL = """
SELECT
    conversation_id,
    session,
    anyIf(channel, type = 'MessageReceived') AS channel,
    toUnixTimestamp64Milli(min(occurred_at)) AS started_at,
    countIf(type = 'ConversationClosed') > 0 AS closed,
    toUnixTimestamp64Milli(maxIf(occurred_at, type = 'ConversationClosed')) AS closed_at,
    argMaxIf(JSONExtractString(payload, 'reason'), seq, type = 'ConversationClosed')
        AS closed_reason,
    countIf(type = 'MessageReceived') AS messages,
    argMinIf(JSONExtractString(payload, 'text'), seq,
             type = 'MessageModerated' AND JSONExtractString(payload, 'direction') = 'in'
             AND JSONExtractString(payload, 'verdict') != 'block') AS first_message,
    arrayStringConcat(arrayDistinct(groupArrayIf(JSONExtractString(payload, 'author'),
        type = 'ReplyProduced' AND JSONExtractString(payload, 'author') NOT IN ('ai', 'system'))),
        ', ') AS agents,
    maxIf(JSONExtractInt(payload, 'rating'), type = 'CsatRated') AS rating
FROM
(
    SELECT
        *,
        max(if(type = 'MessageReceived', closes_before, 0)) OVER (
            PARTITION BY conversation_id ORDER BY seq
            ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
        ) AS session
    FROM
    (
        SELECT
            conversation_id, channel, type, seq, occurred_at, payload,
            sum(type = 'ConversationClosed') OVER (
                PARTITION BY conversation_id ORDER BY seq
                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING
            ) AS closes_before
        FROM {database}.events FINAL
        WHERE tenant_id = {tenant:String}
          AND conversation_id IN (
            SELECT DISTINCT conversation_id FROM {database}.events
            WHERE tenant_id = {tenant:String} AND type = 'MessageReceived'
              AND JSONExtractString(payload, 'customer_id') = {customer:String}
          )
    )
)
GROUP BY conversation_id, session
ORDER BY started_at DESC
LIMIT {limit:UInt32}
"""


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


def live_account(
    config: ConfigState | None, tenant: str, agent: str, base: AgentAccount | None
) -> AgentAccount | None:
    """How routing sees the agent now: the live configuration's entity (team, skills,
    capacity, name, as /admin last set them) over the token directory's entry. None
    when the configuration disables the agent, or knows them nowhere."""
    data = config.get(tenant, "agent", agent) if config is not None else None
    if data is None:
        return base
    if data.get("disabled"):
        return None
    base = base or AgentAccount(token_sha256="")
    teams = [str(t) for t in data.get("teams") or () if t]
    skills = data.get("skills")
    capacity = data.get("capacity")
    return AgentAccount(
        token_sha256=base.token_sha256,
        team=teams[0] if teams else base.team,
        skills=tuple(str(x) for x in skills) if isinstance(skills, list) else base.skills,
        capacity=capacity if isinstance(capacity, int) and capacity > 0 else base.capacity,
        name=str(data.get("name") or base.name),
    )


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


class SessionLogin(_Frame):
    """Log in with the session cookie the handshake carried."""

    type: Literal["login"]


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


class Note(_Frame):
    type: Literal["note"]
    conversation_id: ConversationId
    text: str = Field(max_length=8000)
    id: str | None = Field(default=None, max_length=128, pattern=_ID)

    @model_validator(mode="after")
    def _something(self) -> Note:
        if not self.text.strip():
            raise ValueError("a note needs text")
        return self


class Search(_Frame):
    type: Literal["search"]
    query: str = Field(max_length=200)
    id: str | None = Field(default=None, max_length=128, pattern=_ID)

    @model_validator(mode="after")
    def _something(self) -> Search:
        if len(self.query.strip()) < 2:
            raise ValueError("search for at least two characters")
        return self


class Profile(_Frame):
    type: Literal["profile"]
    conversation_id: ConversationId


AnyFrame = Presence | Open | Reply | Note | Transfer | HandBack | Close | Typing | Search | Profile
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


class ConsoleUpload(BaseModel):
    tenant: str = Field(min_length=1, max_length=64)
    agent: str = Field(min_length=1, max_length=64)
    conversation_id: str = Field(min_length=1, max_length=128, pattern=_ID)


@router.post(
    UPLOAD_PATH,
    status_code=status.HTTP_201_CREATED,
    openapi_extra=upload_openapi(ConsoleUpload),
)
async def console_upload(
    request: Request,
    authorization: Annotated[str, Header()] = "",
    x_csrf_token: Annotated[str, Header(alias=CSRF_HEADER)] = "",
) -> dict[str, Any]:
    """A file for the agent's next reply (its id goes in the reply frame's
    ``attachments``): the agent's token as ``Authorization: Bearer`` (or their session
    cookie, with its CSRF token in ``X-CSRF-Token``), and the conversation must be
    assigned to them (404 if their tenant has no such one). Multipart, or the file as
    the body with the fields in the query string."""
    body = await UploadBody.of(request)
    fields = body.validated(ConsoleUpload)
    tenant, agent, conversation_id = fields.tenant, fields.agent, fields.conversation_id
    directory: AgentDirectory = getattr(request.app.state, "agents", None) or {}
    config: ConfigState | None = getattr(request.app.state, "config", None)
    scheme, _, token = authorization.partition(" ")
    presented = token.strip() if scheme.lower() == "bearer" else ""
    account: AgentAccount | None = None
    if presented:
        account = authenticate(directory, tenant, agent, presented)
        account = live_account(config, tenant, agent, account) if account else None
    else:
        session = await session_of(request.app, request.cookies.get(COOKIE))
        if session is not None and (session.tenant, session.agent) == (tenant, agent):
            # The cookie goes with any request to this origin: the token proves the
            # request comes from the console's own script.
            if not csrf_ok(session, x_csrf_token):
                raise HTTPException(status.HTTP_403_FORBIDDEN, f"missing or wrong {CSRF_HEADER}")
            account = live_account(config, tenant, agent, directory.get(tenant, {}).get(agent))
    limiter: RateLimiter | None = getattr(request.app.state, "limiter", None)
    if account is None:
        if limiter is not None:  # guessing tokens costs the caller's IP bucket
            await limiter.enforce(None, f"ip:{client_ip(request)}")
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown tenant, agent or token")
    if limiter is not None:
        await limiter.enforce(tenant, f"agent:{agent}")
    redis = request.app.state.services.redis
    assignee, channel, customer = (
        _text(v) if v is not None else None
        for v in await redis.hmget(
            conversation_key(tenant, conversation_id), ["assignee", "channel", "customer_id"]
        )
    )
    if channel is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such conversation")
    if assignee != agent:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "that conversation is not assigned to you")
    # The customer's data key seals the file (the conversation is theirs).
    return await store_upload(request, tenant, conversation_id, channel, body, customer or "")


_LOGINS: TypeAdapter[Login | SessionLogin] = TypeAdapter(Login | SessionLogin)


def _same_origin(headers: Mapping[str, str]) -> bool:
    """The handshake comes from a page of this gateway (or from no browser at all)."""
    origin = headers.get("origin")
    if origin is None:
        return True
    netloc = origin.strip().lower().rstrip("/").partition("://")[2]
    return bool(netloc) and netloc == (headers.get("host") or "").strip().lower()


@router.websocket("/v1/console/ws")
async def console_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        raw = await asyncio.wait_for(websocket.receive_text(), LOGIN_SECONDS)
        login = _LOGINS.validate_json(raw)
    except WebSocketDisconnect:
        return
    except (TimeoutError, ValueError):
        await websocket.close(code=4400, reason="first frame must be a login")
        return
    app = websocket.app
    directory: AgentDirectory = getattr(app.state, "agents", None) or {}
    config: ConfigState | None = getattr(app.state, "config", None)
    limiter: RateLimiter | None = getattr(app.state, "limiter", None)
    signed_in: Session | None = None
    account: AgentAccount | None = None
    guessed = True  # a wrong token or cookie costs the caller's IP bucket
    if isinstance(login, Login):
        tenant, agent = login.tenant, login.agent
        account = authenticate(directory, tenant, agent, login.token)
        account = live_account(config, tenant, agent, account) if account else None
        origin_ok = websocket_origin_ok(app, websocket.headers, tenant)
    else:
        cookie = websocket.cookies.get(COOKIE)
        guessed = cookie is not None  # no cookie: the page just asks whether it has one
        signed_in = await session_of(app, cookie)
        tenant, agent = (signed_in.tenant, signed_in.agent) if signed_in else ("", "")
        if signed_in is not None:
            account = live_account(config, tenant, agent, directory.get(tenant, {}).get(agent))
        origin_ok = _same_origin(websocket.headers)
    if account is None:
        if limiter is not None and guessed:
            ip = websocket.client.host if websocket.client else "unknown"
            await limiter.check(None, f"ip:{ip}")
        await websocket.close(code=4401, reason="unknown tenant, agent or token")
        return
    if not origin_ok:
        await websocket.close(code=4403, reason="origin not allowed")
        return
    session = ConsoleSession(websocket, tenant, agent, account, signed_in)
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
        self,
        websocket: WebSocket,
        tenant: str,
        agent: str,
        account: AgentAccount,
        signed_in: Session | None = None,
    ) -> None:
        self.websocket = websocket
        self.tenant = tenant
        self.agent = agent
        self.account = account
        self.signed_in = signed_in  # the accounts session, when the cookie logged in
        self.services = websocket.app.state.services
        self.config: ConfigState | None = getattr(websocket.app.state, "config", None)
        self.last_canned: list[dict[str, Any]] = []
        self.last_directory: dict[str, Any] = {}
        self._jobs: set[asyncio.Task[None]] = set()  # searches and profiles under way
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
        self.last_canned = self._canned()
        self.last_directory = self._directory()
        profile = (self.config.get(self.tenant, "agent", self.agent) if self.config else None) or {}
        welcome: dict[str, Any] = {
            "type": "welcome",
            "tenant": self.tenant,
            "agent": self.agent,
            "name": self.account.name or self.agent,
            "avatar": str(profile.get("avatar") or ""),
            "team": self.account.team,
            "skills": list(self.account.skills),
            "capacity": self.account.capacity,
            "canned": self.last_canned,
            "directory": self.last_directory,
            "via": "session" if self.signed_in else "token",
        }
        if self.signed_in is not None:
            # For the uploads the page makes with the cookie (this socket is the
            # same-origin page's own: the token goes to nobody else).
            welcome["role"] = self.signed_in.role
            welcome["csrf"] = self.signed_in.csrf
        await self.send(welcome)
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
            tasks.extend(self._jobs)
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
        if isinstance(frame, Search | Profile):
            # ClickHouse may take a while: answered by a task, so replies never wait.
            job = asyncio.create_task(
                self._search(frame) if isinstance(frame, Search) else self._profile(frame)
            )
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)
            return
        # Everything else acts on a conversation of the agent's tenant; all but a note
        # on one assigned to them.
        state = await self._summary(frame.conversation_id)
        if isinstance(frame, Note):
            if state is None:
                await self.send(
                    {
                        "type": "error",
                        "conversation_id": frame.conversation_id,
                        "reason": "no such conversation",
                        **({"id": frame.id} if frame.id else {}),
                    }
                )
                return
        elif state is None or state.get("assignee") != self.agent:
            await self.send(
                {
                    "type": "error",
                    "conversation_id": frame.conversation_id,
                    "reason": "that conversation is not assigned to you",
                    **({"id": frame.id} if isinstance(frame, Reply) and frame.id else {}),
                }
            )
            return
        if isinstance(frame, Note):
            note = note_command(
                self.tenant, frame.conversation_id, self.agent, frame.text, frame.id
            )
            await publisher.publish(note)
            await self.send(
                {
                    "type": "ack",
                    "command": "note",
                    "command_id": note.command_id,
                    "conversation_id": frame.conversation_id,
                    **({"id": frame.id} if frame.id else {}),
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
        canned = self._canned()
        if canned != self.last_canned:  # an administrator changed them: live
            self.last_canned = canned
            await self.send({"type": "canned", "canned": canned})
        directory = self._directory()
        if directory != self.last_directory:  # an agent renamed, a team added, AI off
            self.last_directory = directory
            await self.send({"type": "directory", **directory})
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
                "messages": shown_messages(raw, self.websocket.app.state, notes=True),
            }
        )
        return True

    # --- canned responses, search, profiles ----------------------------------------

    def _directory(self) -> dict[str, Any]:
        """Display names by id (agents, teams: what the page shows instead of ids) and
        whether the tenant has an AI responder (no "hand back to AI" without one), as
        the configuration says now (the worker's routing reads the same)."""
        if self.config is None:
            own = {self.agent: self.account.name or self.agent}
            return {"agents": own, "teams": {}, "ai": True}
        agents = {
            agent_id: str(a.get("name") or agent_id)
            for agent_id, a in self.config.agents(self.tenant).items()
        }
        agents.setdefault(self.agent, self.account.name or self.agent)
        teams = {
            team_id: str(t.get("name") or team_id)
            for team_id, t in self.config.all(self.tenant, "team").items()
        }
        tenant = self.config.get(self.tenant, "tenant")
        ai = tenant is None or (bool(tenant.get("ai_enabled", True)) and not tenant.get("disabled"))
        return {"agents": agents, "teams": teams, "ai": ai}

    def _canned(self) -> list[dict[str, Any]]:
        """The tenant's canned responses as the config topic holds them now."""
        if self.config is None:
            return []
        return [
            {
                "id": str(c.get("id", "")),
                "title": str(c.get("title") or ""),
                "shortcut": str(c.get("shortcut") or ""),
                "text": str(c.get("text") or ""),
            }
            for c in self.config.canned(self.tenant)
            if c.get("text")
        ]

    async def _select(self, sql: str, parameters: dict[str, str]) -> list[dict[str, Any]] | None:
        """Rows of a ClickHouse query as dicts; None when this gateway has no analytics."""
        data = getattr(self.websocket.app.state, "dashboard", None)
        select = getattr(data, "select", None)
        if select is None:
            return None
        columns, rows = await asyncio.to_thread(select, sql, parameters)
        return [dict(zip(columns, row, strict=True)) for row in rows]

    async def _search(self, frame: Search) -> None:
        query = frame.query.strip()
        answer: dict[str, Any] = {"type": "search", "query": frame.query}
        if frame.id:
            answer["id"] = frame.id
        try:
            rows = await self._select(
                SEARCH_SQL, {"tenant": self.tenant, "q": query, "limit": str(SEARCH_LIMIT)}
            )
        except Exception as exc:  # the store's trouble: say so, keep the socket
            log.warning("console search failed tenant=%s: %r", self.tenant, exc)
            rows = None
        if rows is None:
            await self.send({**answer, "type": "error", "reason": "search is not available"})
            return
        # Where each one is now (status, assignee) from the live read model.
        live = await self._summaries([str(r["conversation_id"]) for r in rows])
        answer["results"] = [
            {
                "conversation_id": r["conversation_id"],
                "channel": r["channel"] or live.get(r["conversation_id"], {}).get("channel", ""),
                "customer_id": r["customer_id"],
                "last_at": r["last_at"],
                "hits": r["hits"],
                "snippet": str(r["snippet"] or "")[:200],
                "note": r["snippet_type"] == "NoteAdded",
                "status": live.get(r["conversation_id"], {}).get("status", ""),
                "assignee": live.get(r["conversation_id"], {}).get("assignee", ""),
            }
            for r in rows
        ]
        await self.send(answer)

    async def _profile(self, frame: Profile) -> None:
        conversation_id = frame.conversation_id
        state = await self._summary(conversation_id)
        if state is None:
            await self.send(
                {
                    "type": "error",
                    "conversation_id": conversation_id,
                    "reason": "no such conversation",
                }
            )
            return
        customer = state.get("customer_id", "")
        told = await self.redis.hmget(profile_key(self.tenant, conversation_id), "name", "email")
        name, email = (_text(v) if v is not None else "" for v in told)
        answer: dict[str, Any] = {
            "type": "profile",
            "conversation_id": conversation_id,
            "customer_id": customer,
            "channel": state.get("channel", ""),
            "name": name,
            "email": email,
            # This conversation's own first event until the analytics say otherwise.
            "first_seen": int(state.get("created_at") or 0),
            "conversations": 1,
            "history": [],
            "analytics": True,
        }
        try:
            rows = await self._select(
                PROFILE_SQL,
                {"tenant": self.tenant, "customer": customer, "limit": str(HISTORY_LIMIT)},
            )
        except Exception as exc:
            log.warning("console profile failed tenant=%s: %r", self.tenant, exc)
            rows = None
        if rows is None:
            answer["analytics"] = False
        elif rows:
            answer["history"] = [
                {
                    "conversation_id": r["conversation_id"],
                    "session": r["session"],
                    "channel": r["channel"],
                    "started_at": r["started_at"],
                    "closed": bool(r["closed"]),
                    "closed_at": r["closed_at"] if r["closed"] else None,
                    "closed_reason": r["closed_reason"],
                    "messages": r["messages"],
                    "first_message": str(r["first_message"] or "")[:200],
                    "agents": r["agents"],
                    "rating": r["rating"] or None,
                    "current": r["conversation_id"] == conversation_id and not r["closed"],
                }
                for r in rows
            ]
            answer["conversations"] = len(rows)
            answer["first_seen"] = min(int(r["started_at"]) for r in rows)
        await self.send(answer)
