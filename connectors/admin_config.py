"""Live administration, ``/v1/admin/config/...``: a tenant's configuration entities
(``schemas/config.py``) read and written through the config topic, plus what the /admin
page needs beside them (invites, password resets, API keys, a test webhook delivery,
word lists, "try a question" on the FAQ).

Who may call: a signed-in ``admin`` (session cookie + ``X-CSRF-Token`` on writes,
``connectors/accounts.py``) or the tenant's admin key in ``X-Admin-Key`` (the keys of
``connectors/admin_api.py``); both act on their own tenant. Operators (accounts, or
admin keys, of the reserved tenant ``_ops``) act on any tenant given as ``?tenant=``;
anyone else naming another tenant gets 403.

Writes are all-or-nothing: the body is validated whole (the kind's model, then checks
against the live state such as "that team exists"; 422 with the field's location)
before one record for the one entity is published. The client sends the ``version``
it saw (0: create); 409 when the entity has moved since. The answer waits (≤ 5 s)
until this gateway's follower has applied the record, so it shows the live state.
Secret fields are sealed before publishing (``SecretBox``) and only ever shown as
``{"set": bool}``; a write that omits a secret keeps the one set, ``""`` clears it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from fastapi import APIRouter, Cookie, Depends, Header, HTTPException, Path, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from connectors import accounts
from connectors.accounts import OPERATOR_TENANT, TENANT_PATTERN, Session, secret_context
from connectors.auth import KeyRing, require
from connectors.config_log import SecretBox, config_record, shown, topic_partitions
from connectors.delivery import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TENANT_HEADER, sign
from connectors.live_channels import check_channel
from connectors.publisher import CommandPublisher
from schemas.codec import CODEC, DecodeError
from schemas.config import SINGLE, ConfigState, Entity, faq_score, is_secret, valid_hours
from schemas.records import WordListChanged
from schemas.time import now_ms

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/admin/config", tags=["admin: configuration"])
pages = APIRouter()

APPLY_WAIT_S = 5.0
Kind = Literal[
    "tenant", "widget", "hours", "team", "agent", "canned", "faq", "channel", "webhook", "ai"
]
SINGLES = frozenset({"tenant", "widget", "hours", "webhook", "ai"})
CHANNELS = ("wechat", "wechat_mp", "telegram", "email")
ENTITY_PATTERN = r"^[A-Za-z0-9\-][A-Za-z0-9_.@\-]{0,63}$"
EntityId = Annotated[str, Path(min_length=1, max_length=64, pattern=ENTITY_PATTERN)]
NEW_TENANT_PATTERN = r"^[a-z0-9][a-z0-9\-]{0,62}$"
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s.]+(\.[^@\s.]+)+$")
_SHORT_ID = r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$"


# ------------------------------------------------------------------------ who calls


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str  # whose configuration this request reads or changes
    home: str  # the caller's own tenant
    who: str  # written as changed_by
    operator: bool


@dataclass(frozen=True, slots=True)
class Credentials:
    tenant: str | None
    key: str
    cookie: str | None


def credentials(
    tenant: Annotated[
        str | None,
        Query(min_length=1, max_length=64, pattern=TENANT_PATTERN, description="operators only"),
    ] = None,
    x_admin_key: Annotated[str | None, Header()] = None,
    kefu_session: Annotated[str | None, Cookie()] = None,
) -> Credentials:
    return Credentials(tenant, (x_admin_key or "").strip(), kefu_session)


Creds = Annotated[Credentials, Depends(credentials)]


async def authorize(request: Request, creds: Credentials) -> Caller:
    if creds.key:  # integrations: no cookie, so no CSRF to check
        principal = await require(request, "admin", creds.key)
        home, who = principal.tenant, f"admin-key:{principal.key_id}"
    else:
        session: Session | None = await accounts.session_of(request.app, creds.cookie)
        if session is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "sign in or send an admin key")
        if session.role not in ("admin", "operator"):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "an administrator's page")
        accounts.check_csrf(request, session)
        home, who = session.tenant, f"agent:{session.agent}"
    operator = home == OPERATOR_TENANT
    target = creds.tenant or home
    if target != home and not operator:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "another tenant's configuration")
    return Caller(target, home, who, operator)


async def caller_of(request: Request, creds: Creds) -> Caller:
    return await authorize(request, creds)


Admin = Annotated[Caller, Depends(caller_of)]


def _state(request: Request) -> ConfigState:
    state: ConfigState = request.app.state.config
    return state


def _box(request: Request) -> SecretBox:
    box: SecretBox | None = getattr(request.app.state, "config_box", None)
    if box is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no config key configured")
    return box


# ------------------------------------------------------------------ kinds' models


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


Text = Annotated[str, Field(max_length=200)]
Lang = Annotated[dict[Literal["zh", "en"], Annotated[str, Field(max_length=1000)]], Field()]


class TenantData(_Data):
    name: str = Field(default="", max_length=100)
    disabled: bool = False
    language: Literal["zh", "en"] = "zh"
    ai_enabled: bool = True
    # Customers whose conversations all closed this many days ago are erased
    # (kefu/erasure.py: the retention job); 0: kept until erased on request.
    retention_days: int = Field(default=0, ge=0, le=36500)


class TopicData(_Data):
    """A choice of the pre-chat form's topic field and the team it routes to."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,39}$")
    label: Lang = Field(default_factory=dict)
    team: str = Field(min_length=1, max_length=64)


class WidgetData(_Data):
    color: str = Field(default="#1565c0", pattern=r"^#[0-9a-fA-F]{6}$")
    greeting: Lang = Field(default_factory=dict)
    prechat: bool = False
    offline_message: Lang = Field(default_factory=dict)
    # Web chats go to this team ("": the default team), or to the team of the topic
    # the customer picks in the pre-chat form (``topics``, asked when there are any).
    team: str = Field(default="", max_length=64)
    topics: list[TopicData] = Field(default_factory=list, max_length=12)

    @field_validator("topics")
    @classmethod
    def _unique(cls, value: list[TopicData]) -> list[TopicData]:
        ids = [topic.id for topic in value]
        if len(set(ids)) != len(ids):
            raise ValueError("two topics have the same id")
        return value


class HoursData(_Data):
    timezone: str = Field(default="UTC", max_length=64)
    days: dict[str, list[list[str]]] = Field(default_factory=dict)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("days")
    @classmethod
    def _days(cls, value: dict[str, list[list[str]]]) -> dict[str, list[list[str]]]:
        errors = valid_hours({"timezone": "UTC", "days": value})
        if errors:
            raise ValueError("; ".join(errors))
        return value


class TeamData(_Data):
    name: str = Field(min_length=1, max_length=100)


def _email(value: str) -> str:
    value = value.strip()
    if value and not _EMAIL.match(value):
        raise ValueError("not an email address")
    return value.lower()


class AgentData(_Data):
    name: str = Field(min_length=1, max_length=100)
    email: str = Field(default="", max_length=254)
    role: Literal["agent", "admin", "operator"] = "agent"
    teams: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=20)
    skills: list[Annotated[str, Field(min_length=1, max_length=40)]] = Field(
        default_factory=list, max_length=30
    )
    capacity: int = Field(default=3, ge=1, le=50)
    disabled: bool = False
    avatar: str = Field(default="", max_length=500, pattern=r"^(https?://\S+|/\S*)?$")

    @field_validator("email")
    @classmethod
    def _check_email(cls, value: str) -> str:
        return _email(value)


class CannedData(_Data):
    title: str = Field(min_length=1, max_length=100)
    text: str = Field(min_length=1, max_length=4000)
    shortcut: str = Field(default="", max_length=40, pattern=r"^[A-Za-z0-9_\-]*$")


class FaqData(_Data):
    question: str = Field(min_length=1, max_length=500)
    answer: str = Field(min_length=1, max_length=4000)
    intent: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_.\-]*$")
    keywords: list[Annotated[str, Field(min_length=1, max_length=40)]] = Field(
        default_factory=list, max_length=40
    )


Secret = Annotated[str | None, Field(default=None, max_length=512)]


class WeChatData(_Data):
    app_id: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_\-]*$")
    # The callback token WeChat signs with: 3-32 letters and digits (its console's rule).
    token: str | None = Field(default=None, pattern=r"^([A-Za-z0-9]{3,32})?$")
    encoding_aes_key: str | None = Field(default=None, pattern=r"^([A-Za-z0-9]{43})?$")
    app_secret: Secret = None


class TelegramData(_Data):
    bot_token: str | None = Field(default=None, pattern=r"^(\d{1,20}:[A-Za-z0-9_\-]{10,100})?$")
    # Telegram's secret_token: 1-256 of A-Z a-z 0-9 _ -.
    secret_token: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_\-]{0,256}$")


class EmailData(_Data):
    """Inbound: mail to these addresses is this tenant's (live in ``kefu smtp``; they
    replace the environment's ``email_addresses``). Outbound: replies are sent from
    ``from_address`` (empty: the first address)."""

    addresses: list[Annotated[str, Field(max_length=254)]] = Field(
        default_factory=list, max_length=20
    )
    from_address: str = Field(default="", max_length=254)

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return [_email(v) for v in value]

    @field_validator("from_address")
    @classmethod
    def _from(cls, value: str) -> str:
        return _email(value)


class WebhookData(_Data):
    url: str = Field(default="", max_length=2000, pattern=r"^(https?://\S+)?$")
    secret: Secret = None


class AiData(_Data):
    model: str = Field(default="", max_length=100)
    temperature: float = Field(default=0.4, ge=0.0, le=2.0)
    system_prompt: str = Field(default="", max_length=8000)
    min_confidence: float = Field(default=0.92, ge=0.0, le=1.0)


MODELS: dict[str, type[_Data]] = {
    "tenant": TenantData,
    "widget": WidgetData,
    "hours": HoursData,
    "team": TeamData,
    "agent": AgentData,
    "canned": CannedData,
    "faq": FaqData,
    "webhook": WebhookData,
    "ai": AiData,
}
CHANNEL_MODELS: dict[str, type[_Data]] = {
    "wechat": WeChatData,
    "wechat_mp": WeChatData,
    "telegram": TelegramData,
    "email": EmailData,
}


def _field_error(loc: tuple[str | int, ...], msg: str) -> RequestValidationError:
    return RequestValidationError([{"loc": loc, "msg": msg, "type": "value_error"}])


def _model_of(kind: str, entity_id: str) -> type[_Data]:
    if kind in SINGLES and entity_id != SINGLE:
        raise _field_error(("path", "entity_id"), f"a tenant has one {kind}: its id is '-'")
    if kind == "channel":
        if entity_id not in CHANNEL_MODELS:
            raise _field_error(("path", "entity_id"), f"a channel is one of {', '.join(CHANNELS)}")
        return CHANNEL_MODELS[entity_id]
    if kind not in SINGLES and not re.match(_SHORT_ID, entity_id):
        raise _field_error(("path", "entity_id"), "letters, digits and _ . @ - (64 at most)")
    return MODELS[kind]


def validated(
    state: ConfigState, caller: Caller, kind: str, entity_id: str, data: Mapping[str, Any]
) -> dict[str, Any]:
    """The entity's new data (secrets not yet sealed), or 422 with every field's error."""
    model = _model_of(kind, entity_id)
    try:
        parsed = model.model_validate(dict(data))
    except ValidationError as exc:
        errors = [
            {"loc": ("body", "data", *e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_context=False)
        ]
        raise RequestValidationError(errors) from exc
    out = parsed.model_dump(exclude_none=True)
    t = caller.tenant
    if kind == "agent":
        known = state.all(t, "team")
        unknown = [team for team in out["teams"] if team not in known]
        if unknown:
            raise _field_error(("body", "data", "teams"), f"no such team: {', '.join(unknown)}")
        if (out["role"] == "operator") != (t == OPERATOR_TENANT):
            raise _field_error(
                ("body", "data", "role"), "operators live in the operators' tenant, only there"
            )
        if out["email"]:
            found = accounts.agent_by_email(state, t, out["email"])
            if found is not None and found[0] != entity_id:
                raise _field_error(("body", "data", "email"), "another agent has this email")
    if kind == "widget":
        known = state.all(t, "team")
        if out["team"] and out["team"] not in known:
            raise _field_error(("body", "data", "team"), f"no such team: {out['team']}")
        for index, topic in enumerate(out["topics"]):
            if topic["team"] not in known:
                raise _field_error(
                    ("body", "data", "topics", index, "team"), f"no such team: {topic['team']}"
                )
    if kind == "channel" and entity_id == "email":
        # An address routes mail to one tenant: another tenant's is never taken over.
        for (other, k, e), entity in state.entities.items():
            if k != "channel" or e != "email" or other == t:
                continue
            theirs = {str(a).lower() for a in entity.data.get("addresses") or []}
            taken = [a for a in out["addresses"] if a in theirs]
            if taken:
                raise _field_error(
                    ("body", "data", "addresses"),
                    f"already another tenant's address: {', '.join(taken)}",
                )
    if kind == "tenant":
        before = state.get(t, "tenant") or {}
        if bool(before.get("disabled")) != out["disabled"] and not caller.operator:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "only an operator disables a tenant")
    return out


def _merged_secrets(
    box: SecretBox, context: str, new: dict[str, Any], before: Mapping[str, Any]
) -> dict[str, Any]:
    """Secrets sealed; an omitted one keeps the sealed value it had, "" clears it."""
    out = box.seal_fields({k: v for k, v in new.items() if v != "" or not is_secret(k)}, context)
    for name, value in before.items():
        if is_secret(name) and name not in new:
            out[name] = value
    return out


# -------------------------------------------------------------- publish and wait


def _publisher(request: Request) -> CommandPublisher:
    publisher: CommandPublisher = request.app.state.services.publisher
    return publisher


async def _write(
    request: Request,
    caller: Caller,
    kind: str,
    entity_id: str,
    data: Mapping[str, Any] | None,
    seen: int,
) -> Entity | None:
    """Publish one entity's new state if it is still at ``seen``; wait until live."""
    state = _state(request)
    current = state.version(caller.tenant, kind, entity_id)
    if current != seen:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            {"error": "conflict", "detail": "changed since you read it", "version": current},
        )
    record = config_record(caller.tenant, kind, entity_id, data, caller.who, current)
    await _publisher(request).publish_config(record)
    deadline = time.monotonic() + APPLY_WAIT_S
    # The follower applies the record from the topic: polled (10 ms) rather than
    # hooked, so this answers only with what every reader of the topic will see.
    while state.version(caller.tenant, kind, entity_id) < record.version:
        if time.monotonic() > deadline:
            raise HTTPException(
                status.HTTP_504_GATEWAY_TIMEOUT, "published, not yet applied: read it again"
            )
        await asyncio.sleep(0.01)
    log.info(
        "config %s/%s/%s v%d by %s", caller.tenant, kind, entity_id, record.version, caller.who
    )
    return state.entity(caller.tenant, kind, entity_id)


def _out(entity: Entity | None, entity_id: str) -> dict[str, Any]:
    if entity is None:
        return {"id": entity_id, "version": 0, "data": None}
    return {
        "id": entity_id,
        "version": entity.version,
        "data": shown(entity.data),
        "changed_at": entity.changed_at,
        "changed_by": entity.changed_by,
    }


def callback_urls(request: Request, tenant: str) -> dict[str, str]:
    """What to paste into the WeChat and Telegram consoles, from the URL this page was
    reached by (behind a proxy: run uvicorn with --proxy-headers)."""
    base = str(request.base_url).rstrip("/")
    return {
        "wechat": f"{base}/v1/wechat/{tenant}/callback",
        "wechat_mp": f"{base}/v1/wechat-mp/{tenant}/callback",
        "telegram": f"{base}/v1/telegram/{tenant}/webhook",
    }


class EntityIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0, description="the version you read (0: create)")
    data: dict[str, Any]


# ----------------------------------------------------------------------- tenants


class TenantIn(TenantData):
    id: str = Field(pattern=NEW_TENANT_PATTERN, description="lower-case letters, digits, -")


@router.get("/tenants")
async def list_tenants(caller: Admin, request: Request) -> dict[str, Any]:
    """Every tenant (operators)."""
    if not caller.operator:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "operators only")
    state = _state(request)
    return {
        "tenants": [
            {**_out(state.entity(t, "tenant"), t), "agents": len(state.agents(t))}
            for t in state.tenants()
            if t != OPERATOR_TENANT
        ]
    }


@router.post("/tenants", status_code=status.HTTP_201_CREATED)
async def create_tenant(body: TenantIn, caller: Admin, request: Request) -> dict[str, Any]:
    """A new tenant (operators); its first admin is invited with ``?tenant=<id>``."""
    if not caller.operator:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "operators only")
    data = body.model_dump(exclude={"id"})
    target = Caller(body.id, caller.home, caller.who, True)
    if _state(request).version(body.id, "tenant", SINGLE):
        raise HTTPException(status.HTTP_409_CONFLICT, "this tenant exists")
    return _out(await _write(request, target, "tenant", SINGLE, data, 0), body.id)


# ------------------------------------------------------------------------ agents


class InviteIn(AgentData):
    email: str = Field(min_length=3, max_length=254)


def _account_out(entity: Entity | None, agent_id: str, password: str) -> dict[str, Any]:
    return {
        **_out(entity, agent_id),
        "password": password,
        "note": "shown once: hand it over; the agent signs in at /login",
    }


@router.post("/agent/{agent_id}/invite", status_code=status.HTTP_201_CREATED)
async def invite_agent(
    agent_id: EntityId, body: InviteIn, caller: Admin, request: Request
) -> dict[str, Any]:
    """A new agent account with a one-time password (shown in this answer only)."""
    state = _state(request)
    if state.version(caller.tenant, "agent", agent_id):
        raise HTTPException(status.HTTP_409_CONFLICT, "this agent exists: reset the password")
    data = validated(state, caller, "agent", agent_id, body.model_dump())
    box = _box(request)
    password = accounts.new_password()
    hashed = await asyncio.to_thread(accounts.hash_password, password)
    data["password"] = hashed
    sealed = box.seal_fields(data, secret_context(caller.tenant, "agent", agent_id))
    entity = await _write(request, caller, "agent", agent_id, sealed, 0)
    return _account_out(entity, agent_id, password)


class PasswordIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    password: str | None = Field(
        default=None, min_length=10, max_length=200, description="none: one is generated"
    )


@router.post("/agent/{agent_id}/password")
async def reset_password(
    agent_id: EntityId, body: PasswordIn, caller: Admin, request: Request
) -> dict[str, Any]:
    """Set a new password (given, or generated and shown once); the agent's sessions end."""
    state = _state(request)
    entity = state.entity(caller.tenant, "agent", agent_id)
    if entity is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such agent")
    password = body.password or accounts.new_password()
    hashed = await asyncio.to_thread(accounts.hash_password, password)
    box = _box(request)
    data = dict(entity.data)
    data.update(
        box.seal_fields({"password": hashed}, secret_context(caller.tenant, "agent", agent_id))
    )
    written = await _write(request, caller, "agent", agent_id, data, entity.version)
    ended = await accounts.end_sessions(request.app, caller.tenant, agent_id)
    return {
        **_account_out(written, agent_id, password if body.password is None else ""),
        "sessions_ended": ended,
    }


# -------------------------------------------------------------- API keys (pages)


def _ring(request: Request) -> KeyRing:
    ring: KeyRing = request.app.state.services.tenants
    if ring.store is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "key store not available")
    return ring


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(default="", max_length=100)


@router.get("/keys")
async def list_keys(caller: Admin, request: Request) -> dict[str, Any]:
    """The tenant's API keys (``/v1/admin/keys`` for a signed-in admin)."""
    ring = _ring(request)
    assert ring.store is not None
    issued = await ring.store.list(caller.tenant)
    return {"tenant": caller.tenant, "keys": [*ring.configured(caller.tenant), *issued]}


@router.post("/keys", status_code=status.HTTP_201_CREATED)
async def add_key(body: KeyIn, caller: Admin, request: Request) -> dict[str, str]:
    ring = _ring(request)
    assert ring.store is not None
    key_id, key = await ring.store.add(caller.tenant, "api", body.label)
    return {"id": key_id, "key": key, "role": "api"}


@router.delete("/keys/{key_id}")
async def revoke_key(
    key_id: Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")],
    caller: Admin,
    request: Request,
) -> dict[str, Any]:
    ring = _ring(request)
    assert ring.store is not None
    if any(k["id"] == key_id for k in ring.configured(caller.tenant)):
        raise HTTPException(status.HTTP_409_CONFLICT, "a key from the settings")
    if not await ring.store.revoke(caller.tenant, key_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such key")
    return {"id": key_id, "revoked": True}


# --------------------------------------------------------- webhook test delivery


class WebhookTestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://\S+$")


@router.post("/webhook/test")
async def test_webhook(body: WebhookTestIn, caller: Admin, request: Request) -> dict[str, Any]:
    """POST a signed test payload to the webhook (the saved URL unless one is given),
    as delivery signs replies, and say what the endpoint answered."""
    saved = _state(request).get(caller.tenant, "webhook") or {}
    url = body.url or str(saved.get("url") or "")
    if not url:
        raise _field_error(("body", "url"), "no webhook URL saved or given")
    secret = ""
    if saved.get("secret"):
        context = secret_context(caller.tenant, "webhook", SINGLE) + "/secret"
        secret = _box(request).open(saved["secret"], context)
    payload = json.dumps(
        {
            # The shape of a reply's payload (a receiver that reads conversation_id
            # does not fail on it), marked as a test.
            "type": "test",
            "tenant": caller.tenant,
            "conversation_id": "",
            "event_id": uuid.uuid4().hex,
            "sent_at": now_ms(),
        }
    ).encode()
    headers = {
        "Content-Type": "application/json",
        TENANT_HEADER: caller.tenant,
        IDEMPOTENCY_HEADER: f"test-{uuid.uuid4().hex}",
    }
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret.encode(), payload)
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=5.0, follow_redirects=False) as client:
            answer = await client.post(url, content=payload, headers=headers)
    except httpx.HTTPError as exc:
        return {"ok": False, "status": None, "error": type(exc).__name__, "signed": bool(secret)}
    return {
        "ok": 200 <= answer.status_code < 300,
        "status": answer.status_code,
        "signed": bool(secret),
        "elapsed_ms": round((time.monotonic() - started) * 1000),
        "body": answer.text[:300],
    }


# --------------------------------------------------------- channel test message


class ChannelTestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str = Field(default="", max_length=128, pattern=r"^[A-Za-z0-9_\-@.]*$")


@router.post("/channel/{channel}/test")
async def test_channel(
    channel: Annotated[Literal["wechat", "wechat_mp", "telegram"], Path()],
    body: ChannelTestIn,
    caller: Admin,
    request: Request,
) -> dict[str, Any]:
    """Check the channel's credentials with its platform, as they are live (Telegram
    ``getMe``, WeChat an access token); with ``to`` (a chat id, an openid) send that
    customer a test message too. Says ok, or what the platform answered."""
    state = request.app.state
    found = await check_channel(state.wechat, state.telegram, caller.tenant, channel, body.to)
    return {"channel": channel, **found}


# ------------------------------------------------------------------ FAQ: try it

_LATIN = re.compile(r"[a-z0-9]+")
_CJK = re.compile(r"[\u3400-\u9fff]+")


def terms(text: str) -> set[str]:
    """Latin words and Chinese character pairs (Chinese has no spaces between words)."""
    lowered = text.lower()
    found = {w for w in _LATIN.findall(lowered) if len(w) > 1}
    for run in _CJK.findall(lowered):
        found |= {run[i : i + 2] for i in range(len(run) - 1)} if len(run) > 1 else {run}
    return found


def faq_match(
    entries: Mapping[str, Mapping[str, Any]], question: str, threshold: float = 0.92
) -> dict[str, Any]:
    """The best FAQ entry for a question by keyword overlap: the gateway cannot import
    the workers' offline responder (streams/), so this is an approximation of it,
    good enough to see whether an entry's keywords catch the questions meant for it."""
    asked = terms(question)
    best: tuple[float, str] = (0.0, "")
    for entry_id, entry in entries.items():
        keywords = [str(k).lower() for k in entry.get("keywords", [])]
        entry_question = str(entry.get("question", ""))
        known = terms(entry_question) | terms(" ".join(keywords))
        score = faq_score(asked, known, question, keywords, entry_question)
        best = max(best, (round(score, 3), entry_id))
    confidence, found = best
    entry = entries.get(found, {}) if found else {}
    decision = "answer" if confidence >= threshold else "ask" if confidence >= 0.25 else "handoff"
    return {
        "id": found or None,
        "intent": entry.get("intent") or None,
        "confidence": confidence,
        "decision": decision,
        "answer": entry.get("answer") if decision != "handoff" else None,
        "method": "keyword overlap (the workers' responder may score differently)",
    }


class TryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=1000)


@router.post("/faq/try")
async def try_question(body: TryIn, caller: Admin, request: Request) -> dict[str, Any]:
    """Which FAQ entry a question finds, with what confidence, and the answer."""
    state = _state(request)
    ai = state.get(caller.tenant, "ai") or {}
    threshold = float(ai.get("min_confidence", 0.92))
    return faq_match(state.all(caller.tenant, "faq"), body.question, threshold)


# --------------------------------------------------------------------- word lists


def wordlist_topic(request: Request) -> str:
    """The moderation control topic beside the config topic (``schemas/topics.py``)."""
    config_topic: str = getattr(_publisher(request), "_config_topic", "")
    if not config_topic.endswith(".control.config"):
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no config topic")
    return config_topic.removesuffix(".config") + ".wordlists"


async def _read_lists(request: Request, tenant: str) -> dict[str, WordListChanged]:
    """The tenant's word lists as the control topic holds them now (read whole: a
    few records per tenant, compacted)."""
    topic = wordlist_topic(request)
    options: Mapping[str, Any] = getattr(request.app.state, "kafka_options", {}) or {}
    bootstrap: str = request.app.state.bootstrap
    found = await topic_partitions(bootstrap, topic, options)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, **options
    )
    await consumer.start()
    latest: dict[bytes, WordListChanged | None] = {}
    try:
        parts = [TopicPartition(topic, p) for p in sorted(found)]
        if not parts:
            return {}
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        deadline = time.monotonic() + 10
        while any([await consumer.position(tp) < end[tp] for tp in parts]):
            if time.monotonic() > deadline:
                raise HTTPException(status.HTTP_504_GATEWAY_TIMEOUT, "word lists not read")
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    if record.key is None or not record.key.startswith(f"{tenant}/".encode()):
                        continue
                    try:
                        decoded = CODEC.decode(record.value) if record.value else None
                    except DecodeError:
                        continue
                    if decoded is None or isinstance(decoded, WordListChanged):
                        latest[record.key] = decoded
    finally:
        await consumer.stop()
    return {r.category: r for r in latest.values() if r is not None and r.tenant_id == tenant}


class WordListIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["block", "mask", "flag", "off"]
    words: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(max_length=5000)


Category = Annotated[str, Path(pattern=r"^[a-z][a-z0-9_\-]{0,39}$")]


@router.get("/wordlists")
async def list_wordlists(caller: Admin, request: Request) -> dict[str, Any]:
    """The tenant's own moderation lists (the shipped defaults are not shown)."""
    lists = await _read_lists(request, caller.tenant)
    return {
        "tenant": caller.tenant,
        "lists": [
            {"category": c, "action": r.action, "words": r.words, "version": r.version}
            for c, r in sorted(lists.items())
        ],
    }


@router.put("/wordlists/{category}")
async def put_wordlist(
    category: Category, body: WordListIn, caller: Admin, request: Request
) -> dict[str, Any]:
    """Replace one category's list, as ``kefu moderation set-list`` does; live in the
    workers within a fetch (they follow the control topic)."""
    lists = await _read_lists(request, caller.tenant)
    version = max([now_ms(), *(r.version + 1 for r in lists.values())])
    words = sorted({w.strip() for w in body.words if w.strip()})
    record = WordListChanged(
        tenant_id=caller.tenant,
        category=category,
        action=body.action,
        words=words,
        version=version,
        changed_at=now_ms(),
        changed_by=caller.who,
    )
    producer = _publisher(request)._producer  # the gateway's one idempotent producer
    key = f"{caller.tenant}/{category}".encode()
    await producer.send_and_wait(wordlist_topic(request), CODEC.encode(record), key=key)
    return {"category": category, "action": body.action, "words": words, "version": version}


# ------------------------------------------------------- entities, any kind


@router.get("/{kind}")
async def list_entities(kind: Kind, caller: Admin, request: Request) -> dict[str, Any]:
    """The tenant's entities of a kind (secrets only say whether they are set)."""
    state = _state(request)
    items = [
        _out(state.entity(caller.tenant, kind, entity_id), entity_id)
        for entity_id in state.all(caller.tenant, kind)
    ]
    out: dict[str, Any] = {"tenant": caller.tenant, "kind": kind, "items": items}
    if kind == "channel":
        out["callbacks"] = callback_urls(request, caller.tenant)
    return out


@router.get("/{kind}/{entity_id}")
async def get_entity(
    kind: Kind, entity_id: EntityId, caller: Admin, request: Request
) -> dict[str, Any]:
    entity = _state(request).entity(caller.tenant, kind, entity_id)
    if entity is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no such {kind}")
    return _out(entity, entity_id)


@router.put("/{kind}/{entity_id}")
async def put_entity(
    kind: Kind, entity_id: EntityId, body: EntityIn, caller: Admin, request: Request
) -> dict[str, Any]:
    """Create (version 0) or replace an entity; 409 when it moved since ``version``."""
    state = _state(request)
    data = validated(state, caller, kind, entity_id, body.data)
    before = state.get(caller.tenant, kind, entity_id) or {}
    if kind == "agent" and "password" in before:
        data["password"] = before["password"]  # set by invite and reset only
    if any(is_secret(name) for name in (*data, *before)):
        data = _merged_secrets(
            _box(request), secret_context(caller.tenant, kind, entity_id), data, before
        )
    entity = await _write(request, caller, kind, entity_id, data, body.version)
    if kind == "agent" and data.get("disabled"):
        await accounts.end_sessions(request.app, caller.tenant, entity_id)
    return _out(entity, entity_id)


@router.delete("/{kind}/{entity_id}")
async def delete_entity(
    kind: Kind,
    entity_id: EntityId,
    caller: Admin,
    request: Request,
    version: Annotated[int, Query(ge=1, description="the version you read")],
) -> dict[str, Any]:
    state = _state(request)
    if state.entity(caller.tenant, kind, entity_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no such {kind}")
    if kind == "tenant":
        raise HTTPException(status.HTTP_409_CONFLICT, "disable a tenant, do not delete it")
    if kind == "team":
        members = [
            a for a, d in state.agents(caller.tenant).items() if entity_id in d.get("teams", [])
        ]
        if members:
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"agents in this team: {', '.join(members)}"
            )
    await _write(request, caller, kind, entity_id, None, version)
    if kind == "agent":
        await accounts.end_sessions(request.app, caller.tenant, entity_id)
    return {"id": entity_id, "deleted": True}


# --------------------------------------------------------------------- the page


@pages.get("/admin", response_class=HTMLResponse, include_in_schema=False)
async def admin_page() -> str:
    return (resources.files("connectors") / "static" / "admin.html").read_text("utf-8")
