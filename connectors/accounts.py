"""Agent accounts: sign-in with email and password, sessions, CSRF, lockout.

An account is an ``agent`` config entity (``schemas/config.py``) with ``email`` and
``password``: an argon2id hash, itself sealed with the config ``SecretBox`` (context
:func:`secret_context`), so the topic never holds even a hash in clear.

- ``POST /v1/auth/login`` {tenant, email, password}: sets the cookie ``kefu_session``
  (HttpOnly, SameSite=Strict, Path=/) and answers the session's CSRF token. Every
  state-changing request made with the cookie sends that token in ``X-CSRF-Token``
  (403 otherwise): SameSite already keeps other sites' forms out, the token is the
  second lock for browsers or proxies that ignore it.
- ``GET /v1/auth/session``: who is signed in, and the CSRF token again (a reloaded page
  has lost it; only a same-origin script can read the answer).
- ``POST /v1/auth/logout``.

Sessions live in Redis, ``kefu-auth:<tenant>:session:<id>`` (12 h, not extended), with
``kefu-auth:<tenant>:agent-sessions:<agent>`` listing an agent's, so a password reset,
disabling or deleting the agent ends them all. The cookie is ``<tenant>.<id>``: the
tenant names the key without a scan. Roles are read from the live config at every
request (a demoted admin is an agent at once), never from the session record.

Lockout: 5 failed sign-ins of one tenant + email within 15 minutes lock that email for
the rest of the 15 minutes (429 with ``Retry-After``, even with the right password),
counted in ``kefu-auth:<tenant>:failed:<sha256 of the email>``.

Operators (all tenants) are accounts with role ``operator`` under the reserved tenant
:data:`OPERATOR_TENANT` ("_ops": no customer tenant can be named so, the admin API
refuses ids that do not start with a letter or digit). Tokens (API keys, admin keys,
agent console tokens) keep working for integrations; this module adds to them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

import redis.asyncio as aioredis
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import APIRouter, Cookie, Header, HTTPException, Request, Response, status
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from connectors.config_log import SecretBox
from schemas.config import ConfigState

router = APIRouter(tags=["accounts"])

COOKIE = "kefu_session"
CSRF_HEADER = "X-CSRF-Token"
OPERATOR_TENANT = "_ops"
ROLES = ("agent", "admin", "operator")
SESSION_TTL_S = 12 * 3600
MAX_FAILURES = 5
LOCKOUT_S = 15 * 60
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TENANT_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}$"
_TENANT = re.compile(TENANT_PATTERN)
_SESSION_ID = re.compile(r"^[A-Za-z0-9_\-]{20,64}$")
_HASHER = PasswordHasher()  # argon2id, the library's (RFC 9106 low-memory) defaults
# Verified when the email is unknown, so a wrong email costs what a wrong password does.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True, slots=True)
class Session:
    tenant: str
    agent: str
    role: str
    csrf: str
    session_id: str = ""

    @property
    def operator(self) -> bool:
        return self.role == "operator" and self.tenant == OPERATOR_TENANT


def secret_context(tenant: str, kind: str, entity_id: str) -> str:
    """What a secret field of an entity is sealed with (``SecretBox.seal_fields``):
    a sealed value copied to another entity does not open there."""
    return f"{tenant}/{kind}/{entity_id}"


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def new_password() -> str:
    """A one-time password an admin hands over (16 characters, about 95 bits)."""
    return secrets.token_urlsafe(12)


def session_key(tenant: str, session_id: str) -> str:
    return f"kefu-auth:{tenant}:session:{session_id}"


def agent_sessions_key(tenant: str, agent: str) -> str:
    return f"kefu-auth:{tenant}:agent-sessions:{agent}"


def failures_key(tenant: str, email: str) -> str:
    digest = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]
    return f"kefu-auth:{tenant}:failed:{digest}"


def _redis(app: Any) -> aioredis.Redis:
    client: aioredis.Redis = app.state.services.redis
    return client


def _config(app: Any) -> ConfigState:
    state: ConfigState = app.state.config
    return state


def agent_by_email(
    state: ConfigState, tenant: str, email: str
) -> tuple[str, dict[str, Any]] | None:
    wanted = email.strip().lower()
    for agent_id, data in state.agents(tenant).items():
        if str(data.get("email", "")).strip().lower() == wanted and wanted:
            return agent_id, dict(data)
    return None


async def session_of(app: Any, cookie: str | None) -> Session | None:
    """The live session a ``kefu_session`` cookie names, or None (no cookie, expired,
    logged out, or its agent since disabled or deleted). The role is the agent's now."""
    if not cookie or "." not in cookie:
        return None
    tenant, session_id = cookie.rsplit(".", 1)
    if not _TENANT.match(tenant) or not _SESSION_ID.match(session_id):
        return None
    raw = await _redis(app).get(session_key(tenant, session_id))
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    agent = str(record.get("agent", ""))
    data = _config(app).get(tenant, "agent", agent) if agent else None
    if data is None or data.get("disabled"):
        return None
    role = str(data.get("role") or "agent")
    if role not in ROLES or (role == "operator") != (tenant == OPERATOR_TENANT):
        return None
    return Session(tenant, agent, role, str(record.get("csrf", "")), session_id)


def csrf_ok(session: Session, presented: str | None) -> bool:
    return bool(presented) and secrets.compare_digest(session.csrf, presented or "")


def check_csrf(request: Request, session: Session) -> None:
    """403 for a state-changing request made with a session but without its token."""
    if request.method not in SAFE_METHODS and not csrf_ok(
        session, request.headers.get(CSRF_HEADER)
    ):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"missing or wrong {CSRF_HEADER}")


async def end_sessions(app: Any, tenant: str, agent: str) -> int:
    """End every session of an agent (password reset, disabled, deleted)."""
    client = _redis(app)
    listing = agent_sessions_key(tenant, agent)
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in await client.smembers(listing)]
    if ids:
        await client.delete(*(session_key(tenant, i) for i in ids))
    await client.delete(listing)
    return len(ids)


async def _open_session(app: Any, tenant: str, agent: str) -> tuple[str, str]:
    session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    record = json.dumps({"agent": agent, "csrf": csrf, "created_at": int(time.time() * 1000)})
    listing = agent_sessions_key(tenant, agent)
    async with _redis(app).pipeline(transaction=True) as pipe:
        pipe.set(session_key(tenant, session_id), record, ex=SESSION_TTL_S)
        pipe.sadd(listing, session_id)
        pipe.expire(listing, SESSION_TTL_S)
        await pipe.execute()
    return session_id, csrf


def _verify(stored: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored or _DUMMY_HASH, password) and bool(stored)
    except (VerificationError, InvalidHashError):
        return False


class LoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=64, pattern=TENANT_PATTERN)
    email: str = Field(min_length=3, max_length=254)
    password: str = Field(min_length=1, max_length=1024)


class SessionOut(BaseModel):
    tenant: str
    agent: str
    role: str
    name: str = ""
    csrf: str = Field(description=f"send it in {CSRF_HEADER} with every state-changing request")


def _locked(retry_after: int) -> JSONResponse:
    return JSONResponse(
        {
            "error": "locked",
            "detail": f"too many failed sign-ins: try again in {retry_after} s",
            "retry_after": retry_after,
        },
        status_code=status.HTTP_429_TOO_MANY_REQUESTS,
        headers={"Retry-After": str(retry_after)},
    )


@router.post(
    "/v1/auth/login",
    response_model=SessionOut,
    responses={401: {"description": "wrong email or password"}, 429: {"description": "locked"}},
)
async def login(body: LoginIn, request: Request, response: Response) -> Any:
    """Sign in with email and password: sets the ``kefu_session`` cookie."""
    app = request.app
    client = _redis(app)
    state = _config(app)
    known_tenant = body.tenant == OPERATOR_TENANT or body.tenant in state.tenants()
    failed = failures_key(body.tenant, body.email)
    count = int(await client.get(failed) or 0) if known_tenant else 0
    if count >= MAX_FAILURES:
        return _locked(max(1, int(await client.ttl(failed))))
    found = agent_by_email(state, body.tenant, body.email) if known_tenant else None
    agent, data = found if found is not None else ("", {})
    box: SecretBox | None = getattr(app.state, "config_box", None)
    stored = ""
    if found is not None and box is not None and data.get("password"):
        try:
            context = secret_context(body.tenant, "agent", agent) + "/password"
            stored = box.open(data["password"], context)
        except Exception:  # sealed for another entity or key: no match
            stored = ""
    ok = await asyncio.to_thread(_verify, stored, body.password)
    if not ok or data.get("disabled"):
        if known_tenant:  # unknown tenants leave no keys behind
            async with client.pipeline(transaction=True) as pipe:
                pipe.incr(failed)
                pipe.expire(failed, LOCKOUT_S, nx=True)
                await pipe.execute()
        detail = "this account is disabled" if ok else "wrong email or password"
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail)
    await client.delete(failed)
    session_id, csrf = await _open_session(app, body.tenant, agent)
    response.set_cookie(
        COOKIE,
        f"{body.tenant}.{session_id}",
        max_age=SESSION_TTL_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    role = str(data.get("role") or "agent")
    return SessionOut(
        tenant=body.tenant, agent=agent, role=role, name=str(data.get("name", "")), csrf=csrf
    )


@router.get("/v1/auth/session", response_model=SessionOut, responses={401: {}})
async def current_session(
    request: Request, kefu_session: Annotated[str | None, Cookie()] = None
) -> SessionOut:
    """Who the cookie signs in, and the session's CSRF token."""
    session = await session_of(request.app, kefu_session)
    if session is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "not signed in")
    data = _config(request.app).get(session.tenant, "agent", session.agent) or {}
    return SessionOut(
        tenant=session.tenant,
        agent=session.agent,
        role=session.role,
        name=str(data.get("name", "")),
        csrf=session.csrf,
    )


@router.post("/v1/auth/logout", responses={403: {}})
async def logout(
    request: Request,
    response: Response,
    kefu_session: Annotated[str | None, Cookie()] = None,
    x_csrf_token: Annotated[str | None, Header()] = None,
) -> dict[str, bool]:
    """End this session (the cookie is cleared either way)."""
    session = await session_of(request.app, kefu_session)
    if session is not None:
        if not csrf_ok(session, x_csrf_token):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"missing or wrong {CSRF_HEADER}")
        client = _redis(request.app)
        await client.delete(session_key(session.tenant, session.session_id))
        await client.srem(agent_sessions_key(session.tenant, session.agent), session.session_id)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return {"signed_out": session is not None}


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
async def login_page() -> str:
    return (resources.files("connectors") / "static" / "login.html").read_text("utf-8")
