"""Erasing a customer (GDPR art. 17, PIPL art. 47) and the retention job.

:func:`erase_customer` does, in this order:

1. finds the customer's conversations of the tenant on the log (by the customer id
   their events carry in clear: the id is how their data is found, so it is not
   sealed; choose opaque customer ids where you can);
2. shreds the customer's data keys on the keys topic (``connectors/keystore.py``):
   from this point every read of a sealed field of theirs, in any process and in any
   replay, gives ``[erased]``; the events stay on the log with their bytes, so
   ``kefu audit verify`` still verifies;
3. sends one ``EraseCustomer`` command per conversation: the conversation agent
   appends ``CustomerErased`` (who asked, when, which keys; no personal data), on
   which the Redis projection and the ClickHouse projector redact what they hold;
4. deletes the conversations' attachment blobs (``kefu files purge``'s code) and what
   the chat's forms kept (name, e-mail).

**Retention** (:func:`run_retention`; ``kefu privacy retention``, and every worker
leader each ``security.retention_interval_s``): a tenant's ``retention_days`` (its
``tenant`` configuration entity; 0 or absent: kept forever) erases a customer once
*every* conversation of theirs in the tenant (as the Redis read model lists them) is
closed and the latest of those closes is more than ``retention_days`` ago. A customer
with an open conversation, or one closed more recently, keeps everything: their data
key is one for all their conversations, so an old conversation cannot be shredded
alone. A customer erased since their last close is not erased again.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from connectors.keystore import DataKeyStore, UnknownCustomer
from connectors.webchat import profile_key
from kefu.cli_files import purge_conversations
from kefu.files import blob_store
from kefu.settings import Settings
from projections.audit_keyed import read_all
from schemas.codec import CODEC, DecodeError
from schemas.config import ConfigState
from schemas.keys import conversation_key, conversations_key
from schemas.records import EraseCustomer, MessageReceived, ReplyProduced
from schemas.time import now_ms
from schemas.topics import TopicNames

log = logging.getLogger(__name__)
_ERASE_NAMESPACE = uuid.UUID("0b6f5a4e-2f0e-4d8e-9b1f-6a2e8f3c9d41")
DAY_MS = 86_400_000


class UnknownTenant(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class Erasure:
    tenant: str
    customer: str
    conversations: list[str]
    key_ids: list[str]
    blob_bytes: int
    requested_by: str
    reason: str
    requested_at: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


async def customer_conversations(settings: Settings, tenant: str, customer: str) -> list[str]:
    """The tenant's conversations the customer wrote in (or was answered in), on the
    log. Only the events that name a customer are decoded (the id is in clear)."""
    names = TopicNames(settings.topic_prefix)
    needle = customer.encode()
    wanted = (MessageReceived, ReplyProduced)
    found: set[str] = set()
    for _, _, value in await read_all(
        settings.kafka.servers, names.events, settings.kafka.client_options()
    ):
        if needle not in value:
            continue
        try:
            raws = CODEC.unpack(value)
        except DecodeError:
            continue
        for raw in raws:
            if needle not in raw or CODEC.peek(raw) not in wanted:
                continue
            try:
                _, fields = CODEC.decode_fields(raw)
            except DecodeError:
                continue
            if fields["tenant_id"] == tenant and fields.get("customer_id") == customer:
                found.add(str(fields["conversation_id"]))
    return sorted(found)


async def erase_customer(
    settings: Settings,
    store: DataKeyStore,
    tenant: str,
    customer: str,
    requested_by: str,
    reason: str = "request",
    conversations: Iterable[str] | None = None,
) -> Erasure:
    """Erase the customer (module docstring); ``UnknownCustomer`` when the tenant has
    neither a conversation nor a data key of theirs."""
    if not customer or not tenant:
        raise UnknownCustomer("name a tenant and a customer")
    chosen = (
        sorted(set(conversations))
        if conversations is not None
        else await customer_conversations(settings, tenant, customer)
    )
    if not store.started:
        await store.start_async()
    await store.refresh_async()  # keys another process made an instant ago, too
    if not chosen and not store.keys_of(tenant, customer):
        raise UnknownCustomer(
            f"tenant {tenant!r} has no customer {customer!r} (no conversation, no data key)"
        )
    requested_at = now_ms()
    shredded = await store.erase(tenant, customer, refresh=False)
    names = TopicNames(settings.topic_prefix)
    request = f"{tenant}/{customer}/{requested_at}"
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.servers,
        acks="all",
        enable_idempotence=True,
        **settings.kafka.client_options(),
    )
    await producer.start()
    try:
        for conversation in chosen:
            command = EraseCustomer(
                command_id=str(uuid.uuid5(_ERASE_NAMESPACE, f"{request}/{conversation}")),
                conversation_id=conversation,
                tenant_id=tenant,
                issued_at=requested_at,
                customer_id=customer,
                requested_by=requested_by,
                reason=reason,
                key_ids=shredded,
            )
            await producer.send_and_wait(
                names.commands, CODEC.encode(command), key=conversation.encode()
            )
    finally:
        await producer.stop()
    freed = await purge_conversations(settings, blob_store(settings), tenant, chosen)
    if chosen:  # what the chat's forms kept (not on the log: only here)
        client = aioredis.Redis.from_url(settings.redis.dsn)
        try:
            await client.delete(*(profile_key(tenant, c) for c in chosen))
        finally:
            await client.aclose()
    log.info(
        "erased customer of %s: %d conversation(s), %d key(s), by %s (%s)",
        tenant,
        len(chosen),
        len(shredded),
        requested_by,
        reason,
    )
    return Erasure(tenant, customer, chosen, shredded, freed, requested_by, reason, requested_at)


# --- retention ------------------------------------------------------------------------


def retention_days(config: ConfigState, tenant: str) -> int:
    data = config.get(tenant, "tenant") or {}
    try:
        return max(int(data.get("retention_days") or 0), 0)
    except (TypeError, ValueError):
        return 0


async def retention_candidates(
    client: aioredis.Redis, tenant: str, cutoff_ms: int
) -> dict[str, list[str]]:
    """Customers of the tenant due for erasure by retention (module docstring), each
    with their conversations, from the Redis read model."""
    members = await client.zrange(conversations_key(tenant), 0, -1)
    ids = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
    fields = ("customer_id", "status", "closed_at", "erased_at")
    async with client.pipeline(transaction=False) as pipe:
        for conversation in ids:
            pipe.hmget(conversation_key(tenant, conversation), fields)
        rows = await pipe.execute()
    by_customer: dict[str, list[tuple[str, str, int, int]]] = {}
    for conversation, row in zip(ids, rows, strict=True):
        customer, status, closed_at, erased_at = (
            v.decode() if isinstance(v, bytes) else (v or "") for v in row
        )
        if customer:
            by_customer.setdefault(customer, []).append(
                (conversation, status, int(closed_at or 0), int(erased_at or 0))
            )
    due: dict[str, list[str]] = {}
    for customer, conversations in by_customer.items():
        if any(status != "closed" or not closed for _, status, closed, _ in conversations):
            continue
        last_close = max(closed for _, _, closed, _ in conversations)
        last_erased = min(erased for _, _, _, erased in conversations)
        if last_close < cutoff_ms and last_erased < last_close:
            due[customer] = sorted(c for c, *_ in conversations)
    return due


async def run_retention(
    settings: Settings,
    store: DataKeyStore,
    config: ConfigState,
    tenants: Iterable[str] | None = None,
    now: int | None = None,
    dry_run: bool = False,
) -> dict[str, list[str]]:
    """Erase every customer past their tenant's retention; tenant -> customers erased
    (or, with ``dry_run``, due)."""
    now = now if now is not None else now_ms()
    out: dict[str, list[str]] = {}
    client = aioredis.Redis.from_url(settings.redis.dsn)
    try:
        for tenant in sorted(set(tenants) if tenants is not None else set(config.tenants())):
            days = retention_days(config, tenant)
            if days <= 0:
                continue
            due = await retention_candidates(client, tenant, now - days * DAY_MS)
            done: list[str] = []
            for customer, conversations in sorted(due.items()):
                if not dry_run:
                    await erase_customer(
                        settings,
                        store,
                        tenant,
                        customer,
                        "retention",
                        f"retention: {days} days after close",
                        conversations,
                    )
                done.append(customer)
            if done:
                out[tenant] = done
    finally:
        await client.aclose()
    return out


async def read_config(settings: Settings) -> ConfigState:
    """The configuration as the config topic holds it now (a one-off read)."""
    from connectors.config_log import ConfigFollower

    follower = ConfigFollower(
        settings.kafka.servers,
        TopicNames(settings.topic_prefix).config,
        kafka_options=settings.kafka.client_options(),
    )
    await follower.start()
    await follower.stop()
    return follower.state


def known_tenant(settings: Settings, config: ConfigState, tenant: str) -> bool:
    return tenant in settings.tenants or config.get(tenant, "tenant") is not None


class Eraser:
    """What the gateway's privacy routes call (``connectors/privacy_api.py``)."""

    def __init__(self, settings: Settings, store: DataKeyStore) -> None:
        self._settings = settings
        self._store = store

    async def erase(
        self, tenant: str, customer: str, requested_by: str, reason: str = "request"
    ) -> Mapping[str, Any]:
        erasure = await erase_customer(
            self._settings, self._store, tenant, customer, requested_by, reason
        )
        return erasure.to_json()
