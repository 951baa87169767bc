"""``kefu keys``: API and admin keys of a tenant (docs/security.md).

Keys in the settings (``api_key``, ``api_keys``, ``admin_keys``) are hashes in
production (``kefu keys hash``); keys issued here live in Redis (only their SHA-256),
are seen by every gateway at once and are revoked the same way. Rotation: ``add``,
move the clients to the new key, ``revoke`` the old one.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click
import redis.asyncio as aioredis

from connectors.auth import AuthConfig, KeyRing, stored_hash
from connectors.rate_limit import Limits
from kefu.settings import RateLimitSettings, Settings, load_settings


def limits_of(r: RateLimitSettings) -> Limits:
    return Limits(r.tenant_per_second, r.tenant_burst, r.client_per_second, r.client_burst)


def auth_config(settings: Settings) -> AuthConfig:
    """Key hashes per role (plaintext values hashed here), origins, tenants."""
    api: dict[str, dict[str, str]] = {}
    admin: dict[str, dict[str, str]] = {}
    for tenant, t in settings.tenants.items():
        keys = {k: stored_hash(v.get_secret_value()) for k, v in t.api_keys.items()}
        if t.api_key.get_secret_value():
            keys.setdefault("default", stored_hash(t.api_key.get_secret_value()))
        api[tenant] = {k: v for k, v in keys.items() if v != stored_hash("")}
        admin[tenant] = {
            k: stored_hash(v.get_secret_value())
            for k, v in t.admin_keys.items()
            if v.get_secret_value()
        }
    return AuthConfig(
        tenants=frozenset(settings.tenants),
        keys={"api": api, "admin": admin},
        allowed_origins={t: frozenset(s.allowed_origins) for t, s in settings.tenants.items()},
        allow_loopback_origins=settings.security.allow_loopback_origins,
        widget_secrets={
            t: s.widget_secret.get_secret_value()
            for t, s in settings.tenants.items()
            if s.widget_secret.get_secret_value()
        },
    )


def gateway_security(settings: Settings) -> dict[str, Any]:
    """The security part of ``GatewayConfig`` (keyword arguments)."""
    return {
        "auth": auth_config(settings),
        "rate_limits": limits_of(settings.security.rate_limits),
        "tenant_rate_limits": {
            t: limits_of(s.rate_limits) for t, s in settings.tenants.items() if s.rate_limits
        },
        "kafka_options": settings.kafka.client_options(),
    }


def _tenant(settings: Settings, tenant: str) -> None:
    if tenant not in settings.tenants:
        raise click.ClickException(f"no tenant {tenant!r} in the settings")


async def _with_ring(settings: Settings, action: Any) -> Any:
    client = aioredis.Redis.from_url(settings.redis.dsn)
    try:
        return await action(KeyRing(auth_config(settings), client))
    finally:
        await client.aclose()


@click.group()
def keys() -> None:
    """API and admin keys: hash, add (issue), revoke, list."""


@keys.command("hash")
@click.option("--key", default=None, help="the key (default: read from stdin)")
def hash_command(key: str | None) -> None:
    """Print the ``sha256:<hex>`` to put in the settings instead of a key."""
    value = key if key is not None else sys.stdin.readline().rstrip("\n")
    if not value:
        raise click.ClickException("no key given")
    click.echo(stored_hash(value))


@keys.command("add")
@click.option("--tenant", required=True)
@click.option("--label", default="", help="what the key is for")
@click.option("--admin", is_flag=True, help="an admin key (/v1/admin/...) instead")
def add(tenant: str, label: str, admin: bool) -> None:
    """Issue a new key; it is printed once, only its hash is kept."""
    settings = load_settings()
    _tenant(settings, tenant)

    async def issue(ring: KeyRing) -> tuple[str, str]:
        assert ring.store is not None
        return await ring.store.add(tenant, "admin" if admin else "api", label)

    key_id, key = asyncio.run(_with_ring(settings, issue))
    click.echo(f"id:  {key_id}")
    click.echo(f"key: {key}")


@keys.command("revoke")
@click.option("--tenant", required=True)
@click.argument("key_id")
def revoke(tenant: str, key_id: str) -> None:
    """Revoke an issued key at once (keys from the settings: remove them there)."""
    settings = load_settings()
    _tenant(settings, tenant)

    async def drop(ring: KeyRing) -> bool:
        assert ring.store is not None
        return await ring.store.revoke(tenant, key_id)

    if not asyncio.run(_with_ring(settings, drop)):
        raise click.ClickException(f"no issued key {key_id!r} for {tenant}")
    click.echo(f"revoked {key_id}")


@keys.command("list")
@click.option("--tenant", required=True)
def list_keys(tenant: str) -> None:
    """A tenant's keys: id, role, source (settings or issued), never hashes."""
    settings = load_settings()
    _tenant(settings, tenant)

    async def collect(ring: KeyRing) -> list[dict[str, Any]]:
        assert ring.store is not None
        return [*ring.configured(tenant), *await ring.store.list(tenant)]

    for k in asyncio.run(_with_ring(settings, collect)):
        click.echo(f"{k['id']:<16} {k['role']:<6} {k['source']:<9} {k['label']}")
