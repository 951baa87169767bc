"""Email threading state in Redis, shared by the listener (in) and the sender (out).

- ``kefu:<tenant>:email:mid:<Message-ID>`` → conversation id, for every Message-ID we
  have seen or sent, so a reply to any mail of a thread (ours included) finds it.
- ``kefu:<tenant>:email:conv:<conversation>`` → hash of the customer's address, the
  subject and the last inbound Message-ID and References, which a reply answers.

Keys expire after ``ttl`` seconds (a thread quiet that long starts afresh).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

DEFAULT_TTL = 90 * 24 * 3600


def message_key(tenant_id: str, message_id: str) -> str:
    return f"kefu:{tenant_id}:email:mid:{message_id}"


def thread_key(tenant_id: str, conversation_id: str) -> str:
    return f"kefu:{tenant_id}:email:conv:{conversation_id}"


@dataclass(frozen=True, slots=True)
class Thread:
    address: str  # the customer's
    subject: str
    last_message_id: str  # the customer's latest, without angle brackets
    references: tuple[str, ...]  # the thread before it, oldest first


class ThreadStore:
    def __init__(self, redis: aioredis.Redis, ttl: int = DEFAULT_TTL) -> None:
        self._redis = redis
        self._ttl = ttl

    async def conversation_of(self, tenant_id: str, message_ids: list[str]) -> str | None:
        """The conversation of the most recent known Message-ID in ``message_ids``
        (given oldest first, as References are)."""
        if not message_ids:
            return None
        found = await self._redis.mget([message_key(tenant_id, m) for m in message_ids])
        for value in reversed(found):
            if value:
                return value.decode() if isinstance(value, bytes) else str(value)
        return None

    async def remember_message(self, tenant_id: str, message_id: str, conversation: str) -> None:
        await self._redis.set(message_key(tenant_id, message_id), conversation, ex=self._ttl)

    async def remember_inbound(
        self, tenant_id: str, conversation_id: str, message_id: str, thread: Thread
    ) -> None:
        key = thread_key(tenant_id, conversation_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(message_key(tenant_id, message_id), conversation_id, ex=self._ttl)
            pipe.hset(
                key,
                mapping={
                    "address": thread.address,
                    "subject": thread.subject,
                    "last_message_id": thread.last_message_id,
                    "references": " ".join(thread.references),
                },
            )
            pipe.expire(key, self._ttl)
            await pipe.execute()

    async def thread(self, tenant_id: str, conversation_id: str) -> Thread | None:
        raw = await self._redis.hgetall(thread_key(tenant_id, conversation_id))
        if not raw:
            return None
        values = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        return Thread(
            address=values.get("address", ""),
            subject=values.get("subject", ""),
            last_message_id=values.get("last_message_id", ""),
            references=tuple(values.get("references", "").split()),
        )
