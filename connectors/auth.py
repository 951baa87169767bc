"""Who is calling the gateway: API keys (customer API and integrations), admin keys
(tenant administration), page origins of WebSockets, signed web chat customer ids.

Keys are kept only as ``sha256:<hex>``: the configured ones (settings; a plaintext
value is hashed on load) and the ones issued at run time (``kefu keys add`` or
``POST /v1/admin/keys``), which live in Redis under ``kefu-auth:<tenant>:keys`` so
every gateway process sees a new or revoked key at once. Issued keys read
``kf.<tenant>.<key id>.<secret>``: the gateway finds the record without scanning, then
compares hashes in constant time. Keys are 256-bit random, so one unsalted SHA-256 is
enough (a slow KDF protects low-entropy passwords, not these). The auth namespace is
outside ``kefu:``, so a replay reset of the read models never drops credentials.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from fastapi import HTTPException, Request, status

from connectors.rate_limit import RateLimiter
from schemas.config import ConfigState

log = logging.getLogger(__name__)

Role = Literal["api", "admin"]
ROLES: tuple[Role, ...] = ("api", "admin")
HASH_PREFIX = "sha256:"
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_NO_MATCH = HASH_PREFIX + "0" * 64
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def stored_hash(value: str) -> str:
    """A configured key as kept: ``sha256:<hex>`` stays, anything else is a plaintext
    key and is hashed (old settings keep working; production config holds hashes)."""
    value = value.strip()
    if _HASH.match(value.lower()):
        return value.lower()
    return hash_key(value)


def keys_key(tenant: str) -> str:
    """Redis hash: key id -> JSON {sha256, role, created_at, label} (issued keys)."""
    return f"kefu-auth:{tenant}:keys"


def issue_key(tenant: str) -> tuple[str, str]:
    """A new key id and key (shown once; only its hash is stored)."""
    key_id = secrets.token_hex(6)
    return key_id, f"kf.{tenant}.{key_id}.{secrets.token_urlsafe(32)}"


def parse_key(presented: str) -> tuple[str, str] | None:
    """(tenant, key id) of an issued key, None for any other string."""
    if not presented.startswith("kf."):
        return None
    parts = presented[3:].rsplit(".", 2)
    if len(parts) != 3 or not parts[0] or not _KEY_ID.match(parts[1]):
        return None
    return parts[0], parts[1]


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    key_id: str
    role: Role


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """What the gateway knows from settings: key hashes per role, origins, tenants."""

    tenants: frozenset[str] = frozenset()
    # role -> tenant -> key id -> "sha256:<hex>"
    keys: Mapping[str, Mapping[str, Mapping[str, str]]] = field(default_factory=dict)
    allowed_origins: Mapping[str, frozenset[str]] = field(default_factory=dict)
    allow_loopback_origins: bool = True
    # tenant -> the secret that signs its web chat customer ids (none: ids unsigned)
    widget_secrets: Mapping[str, str] = field(default_factory=dict)

    def with_plain_api_keys(self, api_keys: Mapping[str, str]) -> AuthConfig:
        """Add plaintext keys (``GatewayConfig.api_keys``: tenant -> key) as id "default"."""
        merged = {t: dict(ids) for t, ids in self.keys.get("api", {}).items()}
        for tenant, key in api_keys.items():
            if key:
                merged.setdefault(tenant, {}).setdefault("default", stored_hash(key))
        return replace(
            self, tenants=self.tenants | frozenset(api_keys), keys={**self.keys, "api": merged}
        )


class KeyStore:
    """Issued keys in Redis (add, revoke, list); shared by every gateway and the CLI."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def add(self, tenant: str, role: Role = "api", label: str = "") -> tuple[str, str]:
        key_id, key = issue_key(tenant)
        record = {
            "sha256": hash_key(key),
            "role": role,
            "created_at": int(time.time() * 1000),
            "label": label,
        }
        await self._redis.hset(keys_key(tenant), key_id, json.dumps(record))
        log.info("key issued tenant=%s id=%s role=%s", tenant, key_id, role)
        return key_id, key

    async def revoke(self, tenant: str, key_id: str) -> bool:
        removed = bool(await self._redis.hdel(keys_key(tenant), key_id))
        if removed:
            log.info("key revoked tenant=%s id=%s", tenant, key_id)
        return removed

    async def get(self, tenant: str, key_id: str) -> dict[str, Any] | None:
        raw = await self._redis.hget(keys_key(tenant), key_id)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    async def list(self, tenant: str) -> list[dict[str, Any]]:
        """Issued keys of a tenant, without their hashes."""
        out = []
        for raw_id, raw in (await self._redis.hgetall(keys_key(tenant))).items():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            out.append(
                {
                    "id": raw_id.decode() if isinstance(raw_id, bytes) else raw_id,
                    "role": record.get("role", "api"),
                    "source": "issued",
                    "created_at": record.get("created_at"),
                    "label": record.get("label", ""),
                }
            )
        return sorted(out, key=lambda r: (r["created_at"] or 0, r["id"]))


class TenantIds:
    """The tenants the gateway knows: the settings' (fixed at start) and the ones with
    a ``tenant`` entity in the live configuration (created by an operator in /admin).
    A container (``in``), read at each request."""

    def __init__(self, static: frozenset[str], live: ConfigState | None = None) -> None:
        self.static = static
        self.live = live

    def __contains__(self, tenant: object) -> bool:
        if tenant in self.static:
            return True
        return (
            isinstance(tenant, str)
            and self.live is not None
            and self.live.get(tenant, "tenant") is not None
        )

    def disabled(self, tenant: str) -> bool:
        """An operator disabled it (``tenant`` entity, ``disabled: true``)."""
        data = self.live.get(tenant, "tenant") if self.live is not None else None
        return bool(data and data.get("disabled"))


TENANT_DISABLED = "this tenant is disabled"


class KeyRing:
    """Authenticates a presented key for a role: every configured hash is compared
    (constant time, whichever matches), then an issued key's record if it names one.
    ``live``: the configuration the gateway follows, for the tenants created there."""

    def __init__(
        self,
        config: AuthConfig,
        redis: aioredis.Redis | None = None,
        live: ConfigState | None = None,
    ) -> None:
        self.config = config
        self.ids = TenantIds(
            config.tenants | frozenset(t for tenants in config.keys.values() for t in tenants),
            live,
        )
        self._static = {
            role: [
                (tenant, key_id, digest)
                for tenant, ids in config.keys.get(role, {}).items()
                for key_id, digest in ids.items()
            ]
            for role in ROLES
        }
        self.store = KeyStore(redis) if redis is not None else None

    def configured(self, tenant: str) -> list[dict[str, Any]]:
        return [
            {"id": key_id, "role": role, "source": "settings", "created_at": None, "label": ""}
            for role in ROLES
            for t, key_id, _ in self._static[role]
            if t == tenant
        ]

    def by_api_key(self, presented: str) -> str | None:
        """The tenant of a configured API key (no Redis): kept for callers that are sync."""
        principal = self._match_static(presented, "api")
        return principal.tenant if principal else None

    def _match_static(self, presented: str, role: Role) -> Principal | None:
        digest = hash_key(presented)
        found = None
        for tenant, key_id, expected in self._static[role]:
            if hmac.compare_digest(digest, expected):
                found = Principal(tenant, key_id, role)
        return found

    async def authenticate(self, presented: str, role: Role) -> Principal | None:
        found = self._match_static(presented, role)
        parsed = parse_key(presented)
        if found is None and parsed is not None and self.store is not None:
            tenant, key_id = parsed
            record = await self.store.get(tenant, key_id) if tenant in self.ids else None
            expected = str(record.get("sha256", _NO_MATCH)) if record else _NO_MATCH
            ok = hmac.compare_digest(hash_key(presented), expected)
            if ok and record is not None and record.get("role", "api") == role:
                found = Principal(tenant, key_id, role)
        return found


def presented_key(authorization: str | None, x_api_key: str | None) -> str:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return (x_api_key or "").strip()


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def require(request: Request, role: Role, presented: str) -> Principal:
    """The caller's principal for ``role``, rate-limited per tenant and per key; 401
    (missing or wrong key, counted against the caller's IP) or 429."""
    app = request.app
    limiter: RateLimiter | None = getattr(app.state, "limiter", None)
    if not presented:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing API key")
    ring: KeyRing = app.state.services.tenants
    principal = await ring.authenticate(presented, role)
    if principal is None:
        if limiter is not None:
            await limiter.enforce(None, f"ip:{client_ip(request)}")
        what = "admin key" if role == "admin" else "API key"
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, f"invalid {what}")
    if role == "api" and ring.ids.disabled(principal.tenant):
        raise HTTPException(status.HTTP_403_FORBIDDEN, TENANT_DISABLED)
    if limiter is not None:
        await limiter.enforce(principal.tenant, f"{role}-key:{principal.key_id}")
    return principal


def refuse_disabled(app: Any, tenant: str) -> None:
    """403 for a tenant an operator disabled: its customers' edges (web chat, uploads,
    WeChat and Telegram callbacks, the REST API) take nothing until it is enabled."""
    services = getattr(app.state, "services", None)
    if services is not None and services.tenants.ids.disabled(tenant):
        raise HTTPException(status.HTTP_403_FORBIDDEN, TENANT_DISABLED)


# ------------------------------------------------------------------------- origins


def origin_allowed(
    origin: str | None, host: str | None, allowed: frozenset[str], loopback: bool
) -> bool:
    """Browsers send Origin on every WebSocket: a page elsewhere may not open a
    tenant's chat or console unless the tenant lists it. No Origin = not a browser."""
    if origin is None:
        return True
    value = origin.strip().lower().rstrip("/")
    if "*" in allowed or value in allowed:
        return True
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False  # "null" (sandboxed frames, file://) unless listed
    if host and parts.netloc == host.strip().lower():
        return True  # same origin: the gateway's own /chat and /console pages
    return loopback and (parts.hostname or "") in LOOPBACK_HOSTS


def websocket_origin_ok(app: Any, headers: Mapping[str, str], tenant: str) -> bool:
    ring: KeyRing = app.state.services.tenants
    config = ring.config
    return origin_allowed(
        headers.get("origin"),
        headers.get("host"),
        frozenset(o.lower().rstrip("/") for o in config.allowed_origins.get(tenant, ())),
        config.allow_loopback_origins,
    )


# ------------------------------------------------------------ web chat customers


def customer_signature(secret: str, customer: str) -> str:
    """What a tenant's backend puts beside a signed-in customer's id on its page (as
    Intercom's or Crisp's identity verification do): hex HMAC-SHA256 of the id."""
    return hmac.new(secret.encode(), customer.encode(), hashlib.sha256).hexdigest()


def customer_verified(config: AuthConfig, tenant: str, customer: str, signature: str) -> bool:
    """Without a widget secret every id passes (the page is trusted); with one, only
    an id signed with it, compared in constant time."""
    secret = config.widget_secrets.get(tenant)
    if not secret:
        return True
    expected = customer_signature(secret, customer)
    return hmac.compare_digest(expected.encode(), signature.strip().lower().encode())


def new_visitor(config: AuthConfig, tenant: str) -> tuple[str, str]:
    """An anonymous visitor's id (128 random bits: unguessable, so it is its own
    credential) and its signature ("" when the tenant signs nothing)."""
    customer = f"web-{secrets.token_hex(16)}"
    secret = config.widget_secrets.get(tenant)
    return customer, customer_signature(secret, customer) if secret else ""
