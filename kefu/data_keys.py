"""Crypto-shredding in the application shell: the master key from settings, one key
store per process, and the process-wide unsealer (``schemas/sealing.py``).

A process installs the unsealer once at its start (the worker and the projector
eagerly; the ``kefu`` CLI lazily, so a command that never meets a sealed value never
reads the keys topic); from then on every decode of a sealed event opens it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from mode import Service

from connectors.keystore import DataKeyStore, KeysUnavailable
from kefu.files import machine_secret
from kefu.settings import Settings
from schemas import sealing
from schemas.sealing import SealingKey
from schemas.topics import TopicNames

log = logging.getLogger(__name__)

_STORES: dict[tuple[str, str], DataKeyStore] = {}
_LOCK = threading.Lock()


def data_key(settings: Settings) -> bytes:
    configured = settings.security.data_key.get_secret_value()
    return configured.encode() if configured else machine_secret(settings, "data")


def key_store(settings: Settings) -> DataKeyStore:
    """This process's store of ``settings``' keys topic (one per topic: its follower
    thread and cache are shared by every user in the process)."""
    topic = TopicNames(settings.topic_prefix).keys
    where = (settings.kafka.servers, topic)
    with _LOCK:
        store = _STORES.get(where)
        if store is None:
            store = _STORES[where] = DataKeyStore(
                settings.kafka.servers,
                topic,
                data_key(settings),
                settings.kafka.client_options(),
                wait_s=settings.security.key_wait_s,
            )
        return store


class Unsealer:
    """The lookup the codec's openers call: a key id -> its key, None when erased,
    across the stores this process follows (one, except in tests that run several
    stacks). A key none of them has seen is waited for, refreshing each, up to the
    longest ``wait_s``, then read as erased (and said so in the log)."""

    def __init__(self) -> None:
        self._stores: list[DataKeyStore] = []
        self._pending: list[Callable[[], DataKeyStore]] = []
        self._lock = threading.Lock()

    def add(self, store: DataKeyStore | Callable[[], DataKeyStore]) -> None:
        with self._lock:
            if isinstance(store, DataKeyStore):
                if store not in self._stores:
                    self._stores.append(store)
            else:
                self._pending.append(store)

    def discard(self, store: DataKeyStore) -> None:
        """Stop consulting ``store`` (its stack is going away: a test's)."""
        self._all()
        with self._lock:
            if store in self._stores:
                self._stores.remove(store)

    def _all(self) -> list[DataKeyStore]:
        if self._pending:
            with self._lock:
                for make in self._pending:
                    store = make()
                    if store not in self._stores:
                        self._stores.append(store)
                self._pending.clear()
        return self._stores

    def __call__(self, key_id: str) -> SealingKey | None:
        stores = self._all()
        for store in stores:
            found = store.cached(key_id)
            if found is not None:
                return found
        if any(store.is_erased(key_id) for store in stores):
            return None
        if len(stores) == 1:
            return stores[0].lookup(key_id)
        deadline = time.monotonic() + max((s.wait_s for s in stores), default=0.0)
        while True:
            for store in stores:
                try:
                    store.refresh(1.0)
                except KeysUnavailable as exc:
                    log.warning("keys topic unreadable: %s", exc)
                found = store.cached(key_id)
                if found is not None:
                    return found
                if store.is_erased(key_id):
                    return None
            if time.monotonic() >= deadline:
                log.warning("data key %s on none of the keys topics: read as erased", key_id)
                return None
            time.sleep(0.02)


UNSEALER = Unsealer()


def install(store: DataKeyStore | Callable[[], DataKeyStore]) -> None:
    """Open sealed values in every decode of this process with ``store``'s keys (a
    store, or what makes it when a sealed value is first met)."""
    UNSEALER.add(store)
    sealing.install(UNSEALER)


def install_for(settings: Settings) -> None:
    """``install`` of ``settings``' store, made when first needed (picklable with
    ``functools.partial``: a spawned replay child calls it)."""
    install(partial(key_store, settings))


def uninstall_for(settings: Settings) -> None:
    """Undo ``install_for``/``install`` of ``settings``' store and stop its follower (a
    test process that ran a private stack, before the stack goes down)."""
    topic = TopicNames(settings.topic_prefix).keys
    with _LOCK:
        store = _STORES.pop((settings.kafka.servers, topic), None)
    if store is not None:
        UNSEALER.discard(store)
        store.stop()


def install_lazily(settings: Callable[[], Settings]) -> None:
    """``install`` for the CLI: the settings are read and the store made only when a
    command first decodes a sealed value. A process that installed a store already
    (a test's stack) keeps it."""
    if not sealing.installed():
        install(lambda: key_store(settings()))


class KeyService(Service):
    """A worker's key store as a Faust app dependency: the follower has read the keys
    topic before any agent seals or opens a value."""

    def __init__(self, store: DataKeyStore, **kwargs: Any) -> None:
        self.store = store
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        await self.store.start_async()

    async def on_stop(self) -> None:
        await asyncio.to_thread(self.store.stop)
