"""Following and writing the config topic (``schemas/config.py`` is the fold).

- :class:`ConfigFollower`: a group-less consumer assigned every partition of the config
  topic; ``start()`` returns once it has read up to the end offsets it found (so a
  process never serves with a half-read configuration), then a task applies changes as
  they come. Used by the gateway (its lifespan) and the workers (a Faust dependency,
  ``kefu/config.py``).
- :func:`config_record` / :func:`publish_config`: one entity's new state on the topic.
- :class:`SecretBox`: secrets in entity data are sealed (AES-GCM, key from settings)
  before they are written, and opened only where they are used.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from schemas.codec import CODEC, DecodeError
from schemas.config import ConfigState, config_key, is_secret
from schemas.records import ConfigChanged
from schemas.time import now_ms

log = logging.getLogger(__name__)


class ConfigFollower:
    """Keeps ``state`` equal to the config topic, live."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        state: ConfigState | None = None,
        kafka_options: Mapping[str, Any] | None = None,
        on_change: Callable[[list[ConfigChanged]], Awaitable[None] | None] | None = None,
    ) -> None:
        self.state = state if state is not None else ConfigState()
        self._bootstrap = bootstrap
        self._topic = topic
        self._options = dict(kafka_options or {})
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_change = on_change
        self.skipped = 0  # records that were not a valid ConfigChanged

    async def start(self, wait_s: float = 60.0) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,  # every process reads every record
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **self._options,
        )
        await consumer.start()
        self._consumer = consumer
        deadline = time.monotonic() + wait_s
        partitions: list[TopicPartition] = []
        while not partitions:
            partitions = [
                TopicPartition(self._topic, p)
                for p in sorted(await topic_partitions(self._bootstrap, self._topic, self._options))
            ]
            if not partitions:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no config topic {self._topic} (run `kefu topics`)")
                await asyncio.sleep(0.5)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        while await _behind(consumer, end):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the config topic {self._topic} was not read in {wait_s} s")
            await self._apply(await consumer.getmany(timeout_ms=500))
        self._task = asyncio.create_task(self._follow(), name="config-follower")

    async def _follow(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                await self._apply(await consumer.getmany(timeout_ms=1000))
            except KafkaError as exc:  # the broker away: fetch again
                log.warning("config topic: fetch failed: %r", exc)
                await asyncio.sleep(0.5)

    async def _apply(self, batch: Mapping[Any, Any]) -> None:
        changed: list[ConfigChanged] = []
        for records in batch.values():
            for record in records:
                if record.value is None:
                    continue  # a tombstone: the deleted record before it said it all
                try:
                    decoded = CODEC.decode(record.value)
                    if not isinstance(decoded, ConfigChanged):
                        raise DecodeError(f"not a ConfigChanged: {decoded.type}")
                    if self.state.apply(decoded):
                        changed.append(decoded)
                except (DecodeError, ValueError) as exc:
                    self.skipped += 1
                    log.warning(
                        "config %s[%d]@%d skipped: %s",
                        record.topic,
                        record.partition,
                        record.offset,
                        exc,
                    )
        if changed and self._on_change is not None:
            result = self._on_change(changed)
            if result is not None:
                await result

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


async def topic_partitions(
    bootstrap: str, topic: str, options: Mapping[str, Any] | None = None
) -> set[int]:
    """The partitions of ``topic`` (empty: no such topic), by the admin API: a
    group-less consumer's metadata knows no topic it was not assigned."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **dict(options or {}))
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for found in described:
        if found.get("topic") == topic and not found.get("error_code"):
            return {int(p["partition"]) for p in found.get("partitions", [])}
    return set()


async def _behind(consumer: AIOKafkaConsumer, end: Mapping[TopicPartition, int]) -> bool:
    for tp, offset in end.items():
        if await consumer.position(tp) < offset:
            return True
    return False


def config_record(
    tenant_id: str,
    kind: str,
    entity_id: str,
    data: Mapping[str, Any] | None,
    changed_by: str,
    previous_version: int = 0,
) -> ConfigChanged:
    """The record of an entity's new state (``data`` None: deleted); its version is
    above the previous one and never reused (the time in ms unless that is behind)."""
    now = now_ms()
    return ConfigChanged(
        tenant_id=tenant_id,
        kind=kind,
        entity_id=entity_id,
        data=json.dumps(dict(data), ensure_ascii=False, sort_keys=True) if data is not None else "",
        deleted=data is None,
        version=max(now, previous_version + 1),
        changed_at=now,
        changed_by=changed_by,
    )


async def publish_config(producer: AIOKafkaProducer, topic: str, record: ConfigChanged) -> None:
    """Write one record and wait for the broker (acks as the producer was built)."""
    key = config_key(record.tenant_id, record.kind, record.entity_id)
    await producer.send_and_wait(topic, CODEC.encode(record), key=key)


# --- secrets ------------------------------------------------------------------------


class SecretBox:
    """Seals secret fields of entity data with AES-GCM (a 256-bit key derived from
    the configured one): what is on the topic, in memory and in backups is ciphertext."""

    PREFIX = "v1:"

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("a config key is required")
        self._aead = AESGCM(hashlib.sha256(b"kefu-config/" + key).digest())

    def seal(self, value: str, context: str) -> dict[str, str]:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, value.encode(), context.encode())
        return {"enc": self.PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()}

    def open(self, sealed: Any, context: str) -> str:
        """The clear value of a sealed field (a plain string passes through: seeds
        written before sealing)."""
        if isinstance(sealed, str):
            return sealed
        token = str(sealed.get("enc", "")) if isinstance(sealed, Mapping) else ""
        if not token.startswith(self.PREFIX):
            raise ValueError("not a sealed value")
        raw = base64.urlsafe_b64decode(token[len(self.PREFIX) :])
        return self._aead.decrypt(raw[:12], raw[12:], context.encode()).decode()

    def seal_fields(self, data: Mapping[str, Any], context: str) -> dict[str, Any]:
        """``data`` with every secret field that is a plain string sealed."""
        return {
            name: self.seal(value, f"{context}/{name}")
            if is_secret(name) and isinstance(value, str) and value
            else value
            for name, value in data.items()
        }


def shown(data: Mapping[str, Any]) -> dict[str, Any]:
    """Entity data as an admin page may see it: secrets only say whether they are set."""
    return {
        name: ({"set": bool(value)} if is_secret(name) else value) for name, value in data.items()
    }
