"""The Redis read model redacted when a customer is erased (``CustomerErased``).

The event itself moves the conversation's hash (``projections.redis_state``: the
preview becomes the erased marker, ``erased_at`` is set). The recent-messages list is
rewritten here, after the batch that holds the event was applied: every entry's text
and file names become :data:`schemas.sealing.ERASED`, as a replay from the log (where
the customer's key is gone) would list them, byte for byte (the entries keep their
order and their fields' order). The rewrite is a ``WATCH``ed transaction, so an entry
appended meanwhile is never lost; it is idempotent, so a redelivered batch changes
nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import WatchError

from schemas.keys import messages_key
from schemas.records import CustomerErased, Event
from schemas.sealing import ERASED

log = logging.getLogger(__name__)


def redacted_entry(raw: bytes | str) -> bytes | None:
    """A recent-messages entry with its personal fields erased (None: unchanged)."""
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(entry, dict):
        return None
    changed = False
    if entry.get("text") and entry["text"] != ERASED:
        entry["text"] = ERASED
        changed = True
    for attachment in entry.get("attachments") or ():
        if isinstance(attachment, dict) and attachment.get("name") not in (None, "", ERASED):
            attachment["name"] = ERASED
            changed = True
    return orjson.dumps(entry) if changed else None


async def redact_messages(client: aioredis.Redis, tenant_id: str, conversation_id: str) -> int:
    """Rewrite the conversation's recent-messages list redacted; entries changed."""
    key = messages_key(tenant_id, conversation_id)
    while True:
        async with client.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                entries: list[Any] = await pipe.lrange(key, 0, -1)
                rewritten = [redacted_entry(e) for e in entries]
                changed = sum(r is not None for r in rewritten)
                if not changed:
                    await pipe.unwatch()  # type: ignore[no-untyped-call]
                    return 0
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.delete(key)
                pipe.rpush(
                    key,
                    *(r if r is not None else e for r, e in zip(rewritten, entries, strict=True)),
                )
                await pipe.execute()
                return changed
            except WatchError:
                continue  # an entry appended meanwhile: read again


def erased_conversations(events: Iterable[Any]) -> list[tuple[str, str]]:
    """(tenant, conversation) of each ``CustomerErased`` among ``events``, once each."""
    seen: dict[tuple[str, str], None] = {}
    for event in events:
        if type(event) is CustomerErased:
            seen[(event.tenant_id, event.conversation_id)] = None
    return list(seen)


class RedisRedactor:
    """What the worker's reader calls after each batch with ``CustomerErased`` events;
    Redis away is waited out, as the projection's own writes are."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client

    async def __call__(self, events: Sequence[Event]) -> None:
        for tenant_id, conversation_id in erased_conversations(events):
            delay = 0.1
            while True:
                try:
                    await redact_messages(self._redis, tenant_id, conversation_id)
                    break
                except aioredis.RedisError:
                    log.exception("redacting %s failed; retrying in %.1fs", conversation_id, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
