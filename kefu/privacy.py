"""A customer's data, for an access request (GDPR art. 15, PIPL art. 45).

``kefu privacy export --tenant T --customer C`` gathers every conversation in which the
customer wrote or was answered (found on the log by the customer id the events carry,
whatever the channel or e-mail thread), each with its events in words
(``projections.audit.describe``: who said what, when, moderation, attachments), and
what the chat's forms stored (name, e-mail). The log is the source: what Redis or
ClickHouse show is derived from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis

from connectors.webchat import profile_key
from projections.audit import describe, ordered
from projections.audit_keyed import histories, read_all
from schemas.codec import CODEC
from schemas.records import Event
from schemas.time import iso_ms, now_ms


async def export_customer(
    bootstrap: str,
    events_topic: str,
    redis_url: str,
    tenant: str,
    customer: str,
    kafka_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    found = histories(await read_all(bootstrap, events_topic, kafka_options or {}))
    theirs = sorted(
        conversation
        for (tenant_id, conversation), entries in found.items()
        if tenant_id == tenant and _mentions(entries, customer)
    )
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    conversations = []
    try:
        for conversation in theirs:
            history, _ = ordered(found[(tenant, conversation)])
            events = [CODEC.decode(e.raw) for e in history]
            channel = next(
                (str(getattr(e, "channel", "")) for e in events if getattr(e, "channel", "")), ""
            )
            profile = await client.hgetall(profile_key(tenant, conversation))
            conversations.append(
                {
                    "conversation_id": conversation,
                    "channel": channel,
                    "profile": profile,
                    "events": [
                        {"seq": e.seq, **describe(e)} for e in events if isinstance(e, Event)
                    ],
                }
            )
    finally:
        await client.aclose()
    return {
        "tenant": tenant,
        "customer": customer,
        "exported_at": iso_ms(now_ms()),
        "conversations": conversations,
    }


def _mentions(entries: list[Any], customer: str) -> bool:
    """Whether the customer wrote in (or was answered in) this conversation."""
    needle = customer.encode()
    for entry in entries:
        if needle in entry.raw:  # cheap: most events never name the customer
            event = CODEC.decode(entry.raw)
            if getattr(event, "customer_id", None) == customer:
                return True
    return False
