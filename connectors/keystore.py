"""Customers' data keys (crypto-shredding, ``schemas/sealing.py``) on a compacted topic.

Each key is a ``DataKey`` record keyed by its key id on ``kefu.control.keys``: 32 random
bytes wrapped (AES-GCM) with a key derived from the master key in settings
(``security.data_key``), bound to tenant, customer and key id. Erasing a customer
replaces each of their key records with a *shredded* one (same key id, no key
material): compaction then drops the wrapped key from the log, and every reader,
including one started long after, can tell "erased" from "not seen yet" without
waiting. (A bare Kafka tombstone for a key id is read as erased too.)

:class:`DataKeyStore` follows the topic in a thread of its own (its own event loop and
consumer), so that decoding, which is synchronous and runs on a process's main loop,
can wait for it: a reader that meets a key id it has not seen (written by another
process an instant before the event) asks the follower to read to the topic's end and
waits, briefly, instead of showing "erased". Keys are created where events are sealed
(the conversation agent, :meth:`ensure`) and published before the events that use them
are committed; a process caches every key it has read or made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from connectors.config_log import topic_partitions
from schemas.codec import CODEC, DecodeError
from schemas.records import DataKey
from schemas.sealing import KEY_BYTES, SealingKey, data_key_digest, new_key_id
from schemas.time import now_ms

log = logging.getLogger(__name__)

# (Kafka key, value or None for a tombstone) -> something awaitable: a delivery future
# (the worker's producer: checked before its offsets are committed) or the ack itself.
Publish = Callable[[bytes, bytes | None], Awaitable[Any]]


class KeysUnavailable(RuntimeError):
    """The keys topic could not be read (the broker away): nothing can be opened."""


class UnknownCustomer(LookupError):
    """A customer with no data key (and nothing on the log)."""


class DataKeyStore:
    """The keys topic, followed in a thread, cached in memory (module docstring)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        master: bytes,
        kafka_options: Mapping[str, Any] | None = None,
        wait_s: float = 10.0,
        created_by: str = "",
    ) -> None:
        if not master:
            raise ValueError("a master data key is required")
        self._bootstrap = bootstrap
        self._topic = topic
        self._options = dict(kafka_options or {})
        self._wrap = AESGCM(data_key_digest(master))
        self.wait_s = wait_s
        self.created_by = created_by or f"pid:{os.getpid()}"
        # The cache: written by the follower thread (and by ``ensure``), read anywhere;
        # single dict operations are atomic under the GIL.
        self._keys: dict[str, SealingKey] = {}
        self._customer_keys: dict[tuple[str, str], dict[str, SealingKey]] = {}
        self._current: dict[tuple[str, str], SealingKey] = {}
        self._erased: dict[str, tuple[str, str]] = {}  # key id -> (tenant, customer)
        self._missing: set[str] = set()  # never showed up within wait_s: read as erased
        self._lock = threading.RLock()
        # The follower thread and its refresh protocol.
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stopping = False
        self._cond = threading.Condition()
        self._requested = 0
        self._served = 0
        self._dead = False
        self._live_until = 0.0  # monotonic: the follower was at the topic's end lately
        self._producer: AIOKafkaProducer | None = None
        self.publish: Publish | None = None  # None: the follower's own producer, acked
        self._sent: list[Any] = []  # delivery futures of keys made, for a checkpoint
        self._creating: dict[tuple[str, str], asyncio.Future[SealingKey]] = {}

    # --- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start the follower and wait until it has read the topic to its end."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kefu-keys", daemon=True)
                self._thread.start()
        if not self._started.wait(timeout):
            raise KeysUnavailable(f"the keys topic {self._topic} was not read in {timeout} s")
        if self._start_error is not None:
            raise KeysUnavailable(f"the keys topic {self._topic}: {self._start_error!r}")

    async def start_async(self) -> None:
        await asyncio.to_thread(self.start)

    def stop(self) -> None:
        self._stopping = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
            with self._lock:  # startable again (the cache stays: keys are still keys)
                self._thread = None
                self._loop = self._wake = None
                self._started.clear()
                self._start_error = None
                self._stopping = self._dead = False

    @property
    def started(self) -> bool:
        return self._started.is_set() and self._start_error is None

    # --- reading ---------------------------------------------------------------------

    def lookup(self, key_id: str) -> SealingKey | None:
        """The key ``key_id`` names; None when it is erased. A key not seen yet is
        waited for (up to ``wait_s``) before it is taken as erased."""
        found = self._keys.get(key_id)
        if found is not None:
            return found
        if key_id in self._erased or key_id in self._missing:
            return None
        if not self.started:
            self.start()
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                self.refresh(max(deadline - time.monotonic(), 0.1))
            except KeysUnavailable:
                # A slow round trip is not an answer: only a topic unread to the end
                # (the broker away, the follower gone) is, once the wait is over.
                if self._dead or time.monotonic() >= deadline:
                    raise
                continue
            found = self._keys.get(key_id)
            if found is not None or key_id in self._erased:
                return found
            if time.monotonic() >= deadline:
                log.warning(
                    "data key %s not on %s after %.0f s: read as erased",
                    key_id,
                    self._topic,
                    self.wait_s,
                )
                self._missing.add(key_id)
                return None
            time.sleep(0.02)  # a key in flight from another process's producer

    def cached(self, key_id: str) -> SealingKey | None:
        """The key if this process has it (no waiting)."""
        return self._keys.get(key_id)

    def is_erased(self, key_id: str) -> bool:
        return key_id in self._erased

    def current(self, tenant_id: str, customer_id: str) -> SealingKey | None:
        """The customer's key to seal with (their oldest live one), if known here."""
        return self._current.get((tenant_id, customer_id))

    def keys_of(self, tenant_id: str, customer_id: str) -> list[str]:
        """Ids of the customer's live keys (as far as this process has read)."""
        return sorted(self._customer_keys.get((tenant_id, customer_id), {}))

    def erased_keys_of(self, tenant_id: str, customer_id: str) -> list[str]:
        return sorted(k for k, owner in self._erased.items() if owner == (tenant_id, customer_id))

    def customers(self, tenant_id: str) -> list[str]:
        """The tenant's customers with a live key."""
        return sorted(c for (t, c), keys in self._customer_keys.items() if t == tenant_id and keys)

    def refresh(self, timeout: float | None = None) -> None:
        """Block until the follower has read the topic up to its end as of now."""
        if not self.started:
            self.start()
        if self._thread is threading.current_thread():
            raise RuntimeError("refresh from the follower's own thread")
        loop, wake = self._loop, self._wake
        assert loop is not None and wake is not None
        with self._cond:
            self._requested += 1
            ticket = self._requested
        loop.call_soon_threadsafe(wake.set)
        with self._cond:
            served = self._cond.wait_for(
                lambda: self._served >= ticket or self._dead, timeout or self.wait_s
            )
            if not served or self._dead:
                raise KeysUnavailable(f"the keys topic {self._topic} could not be read")

    async def refresh_async(self) -> None:
        await asyncio.to_thread(self.refresh)

    # --- writing ---------------------------------------------------------------------

    async def ensure(self, tenant_id: str, customer_id: str) -> SealingKey:
        """The customer's key, made (and published) the first time one is needed."""
        found = self._current.get((tenant_id, customer_id))
        if found is not None:
            return found
        pending = self._creating.get((tenant_id, customer_id))
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[SealingKey] = asyncio.get_running_loop().create_future()
        self._creating[(tenant_id, customer_id)] = future
        try:
            if time.monotonic() > self._live_until:  # behind: another process's key?
                await self.refresh_async()
            found = self._current.get((tenant_id, customer_id))
            if found is None:
                found = await self._create(tenant_id, customer_id)
            future.set_result(found)
            return found
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning
            raise
        finally:
            del self._creating[(tenant_id, customer_id)]

    async def _create(self, tenant_id: str, customer_id: str) -> SealingKey:
        raw = os.urandom(KEY_BYTES)
        key_id = new_key_id(os.urandom(8))
        nonce = os.urandom(12)
        wrapped = nonce + self._wrap.encrypt(nonce, raw, _bound(tenant_id, customer_id, key_id))
        created = now_ms()
        record = DataKey(
            tenant_id=tenant_id,
            customer_id=customer_id,
            key_id=key_id,
            wrapped=wrapped,
            created_at=created,
            created_by=self.created_by,
        )
        sent = await self._publish(key_id.encode(), CODEC.encode(record))
        if isinstance(sent, asyncio.Future):
            self._sent.append(sent)
        key = SealingKey(tenant_id, customer_id, key_id, raw, created)
        self._add(key)
        return key

    def drain_sent(self) -> list[Any]:
        """Delivery futures of the keys made since the last call (the caller checks
        them before committing what was sealed with them)."""
        sent, self._sent = self._sent, []
        return sent

    async def flushed(self) -> None:
        """Wait until every key this process made is on the log (where the worker's
        producer publishes them: their delivery futures, left for its checkpoint)."""
        for sent in list(self._sent):
            await sent

    async def erase(self, tenant_id: str, customer_id: str, refresh: bool = True) -> list[str]:
        """Shred every key of the customer: ids of the keys shredded (empty: none)."""
        if refresh:
            await self.refresh_async()
        key_ids = self.keys_of(tenant_id, customer_id)
        for key_id in key_ids:
            key = self._keys.get(key_id)
            record = DataKey(
                tenant_id=tenant_id,
                customer_id=customer_id,
                key_id=key_id,
                wrapped=b"",
                created_at=key.created_at if key is not None else 0,
                created_by=self.created_by,
            )
            sent = await self._publish(key_id.encode(), CODEC.encode(record))
            if isinstance(sent, asyncio.Future):
                await sent
            self._shred(key_id, tenant_id, customer_id)
        return key_ids

    async def _publish(self, key: bytes, value: bytes | None) -> Any:
        if self.publish is not None:
            return await self.publish(key, value)
        if not self.started:
            await self.start_async()
        loop, producer = self._loop, self._producer
        assert loop is not None and producer is not None
        done = asyncio.run_coroutine_threadsafe(
            producer.send_and_wait(self._topic, value, key=key), loop
        )
        return await asyncio.wrap_future(done)

    # --- the cache -------------------------------------------------------------------

    def _add(self, key: SealingKey) -> None:
        with self._lock:
            owner = (key.tenant_id, key.customer_id)
            if key.key_id in self._erased:
                return  # shredded meanwhile (a record read late)
            self._keys[key.key_id] = key
            self._customer_keys.setdefault(owner, {})[key.key_id] = key
            self._elect(owner)

    def _shred(self, key_id: str, tenant_id: str, customer_id: str) -> None:
        with self._lock:
            known = self._keys.pop(key_id, None)
            owner = (known.tenant_id, known.customer_id) if known else (tenant_id, customer_id)
            self._erased[key_id] = owner
            self._customer_keys.get(owner, {}).pop(key_id, None)
            self._elect(owner)

    def _elect(self, owner: tuple[str, str]) -> None:
        keys = self._customer_keys.get(owner)
        if not keys:
            self._customer_keys.pop(owner, None)
            self._current.pop(owner, None)
            return
        # The oldest: every process picks the same one, so a decision made again
        # elsewhere seals with the same key (identical bytes).
        self._current[owner] = min(keys.values(), key=lambda k: (k.created_at, k.key_id))

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if value is None:  # a bare tombstone
            if key:
                self._shred(key.decode(), "", "")
            return
        try:
            record = CODEC.decode(value)
            if not isinstance(record, DataKey):
                raise DecodeError(f"not a DataKey: {record.type}")
        except DecodeError as exc:
            log.warning("keys topic: a record skipped: %s", exc.reason)
            return
        if not record.wrapped:
            self._shred(record.key_id, record.tenant_id, record.customer_id)
            return
        bound = _bound(record.tenant_id, record.customer_id, record.key_id)
        try:
            raw = self._wrap.decrypt(record.wrapped[:12], record.wrapped[12:], bound)
        except InvalidTag:
            log.error(
                "data key %s does not unwrap: is security.data_key the one it was made with?",
                record.key_id,
            )
            return
        self._add(
            SealingKey(record.tenant_id, record.customer_id, record.key_id, raw, record.created_at)
        )

    # --- the follower thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to whoever waits
            self._start_error = self._start_error or exc
            self._started.set()
            log.error("keys topic follower stopped: %r", exc)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **self._options,
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap, acks="all", enable_idempotence=True, **self._options
        )
        await consumer.start()
        await producer.start()
        self._producer = producer
        try:
            deadline = time.monotonic() + 60
            partitions: list[TopicPartition] = []
            while not partitions:
                found = await topic_partitions(self._bootstrap, self._topic, self._options)
                partitions = [TopicPartition(self._topic, p) for p in sorted(found)]
                if not partitions:
                    if time.monotonic() > deadline:
                        raise KeysUnavailable(f"no keys topic {self._topic} (run `kefu topics`)")
                    await asyncio.sleep(0.5)
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            await self._catch_up(consumer, partitions)
            self._started.set()
            await self._follow(consumer, partitions)
        finally:
            with self._cond:  # nobody waits forever on a follower that is gone
                self._dead = True
                self._cond.notify_all()
            self._producer = None
            await consumer.stop()
            await producer.stop()

    async def _catch_up(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        end = await consumer.end_offsets(partitions)
        while await _behind(consumer, end):
            self._apply_batch(await consumer.getmany(*partitions, timeout_ms=200))
        self._live_until = time.monotonic() + 1.0

    def _apply_batch(self, batch: Mapping[Any, Any]) -> None:
        for records in batch.values():
            for record in records:
                self._apply(record.key, record.value)

    async def _follow(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        wake = self._wake
        assert wake is not None
        while not self._stopping:
            fetch = asyncio.ensure_future(consumer.getmany(*partitions, timeout_ms=500))
            woken = asyncio.ensure_future(wake.wait())
            await asyncio.wait({fetch, woken}, return_when=asyncio.FIRST_COMPLETED)
            if fetch.done():
                with contextlib.suppress(Exception):
                    self._apply_batch(fetch.result())
                at_end = True
                for tp in partitions:
                    highwater = consumer.highwater(tp)
                    if highwater is None or await consumer.position(tp) < highwater:
                        at_end = False
                if at_end:
                    self._live_until = time.monotonic() + 1.0
            else:
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await fetch
            if not woken.done():
                woken.cancel()
            if wake.is_set() and not self._stopping:
                wake.clear()
                with self._cond:
                    target = self._requested
                try:
                    await self._catch_up(consumer, partitions)
                except Exception as exc:  # the broker away: the waiters time out
                    log.warning("keys topic: catching up failed: %r", exc)
                    await asyncio.sleep(0.2)
                    wake.set()
                    continue
                with self._cond:
                    self._served = max(self._served, target)
                    self._cond.notify_all()


async def _behind(consumer: AIOKafkaConsumer, end: Mapping[TopicPartition, int]) -> bool:
    for tp, offset in end.items():
        if await consumer.position(tp) < offset:
            return True
    return False


def _bound(tenant_id: str, customer_id: str, key_id: str) -> bytes:
    return b"\x1f".join(
        (b"kefu-data-key", tenant_id.encode(), customer_id.encode(), key_id.encode())
    )
