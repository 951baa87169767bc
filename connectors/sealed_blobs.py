"""Attachment blobs sealed with their customer's data key (crypto-shredding of files).

:class:`SealedBlobStore` wraps any :class:`~connectors.blobs.BlobStore` (local files,
S3): what a customer's conversation stores is encrypted with that customer's data key
(``connectors/keystore.py``) before it reaches the store, and opened on every read. Once
the customer is erased (their keys shredded) a copy of the blob that survived the purge
(an S3 replica, a backup, a file the purge missed) does not open: it reads as
:class:`BlobErased`.

A sealed blob is self-describing::

    MAGIC (b"\\x00kefu-blob", 10) | version (1) | key id (16 hex) | nonce (12) | AES-GCM

- the AES-GCM key is derived from the customer's data key (``SealingKey.blob_cipher``);
- the nonce is random: a blob is written once (content-addressed), never rewritten;
- the associated data binds the header, the key's tenant and customer and the blob's
  storage key (``<tenant>/<conversation>/<sha256>[.<variant>]``), so a blob moved under
  another tenant, conversation or name does not open (:class:`BlobUnreadable`).

Storage keys stay the sha256 of the clear bytes: content addressing and dedupe within a
conversation are unchanged. A blob without the header (stored before sealing existed,
or with ``security.seal_blobs`` off) reads as it is.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Protocol, cast

from cryptography.exceptions import InvalidTag

from connectors.blobs import Blob, BlobMissing, BlobStore, tenant_of_key, valid_key
from connectors.sniffing import sniff
from schemas.sealing import KEY_ID_CHARS, SealingKey

log = logging.getLogger(__name__)

MAGIC = b"\x00kefu-blob"  # a leading NUL: no text file starts with it
VERSION = 1
NONCE_BYTES = 12
HEADER_BYTES = len(MAGIC) + 1 + KEY_ID_CHARS + NONCE_BYTES
OVERHEAD = HEADER_BYTES + 16  # and the GCM tag
_SEP = b"\x1f"
_IN_THREAD = 256 * 1024  # larger blobs are encrypted off the event loop


class BlobErased(BlobMissing):
    """The blob's customer was erased: their key is gone, the bytes do not open."""


class BlobUnreadable(BlobMissing):
    """A sealed blob that does not open under its key (damaged, or moved to another
    tenant, conversation or name)."""


class BlobKeys(Protocol):
    """What the sealed store needs of the key store (``DataKeyStore``)."""

    async def ensure(self, tenant_id: str, customer_id: str) -> SealingKey: ...

    async def flushed(self) -> None: ...

    def cached(self, key_id: str) -> SealingKey | None: ...

    def lookup(self, key_id: str) -> SealingKey | None: ...

    async def start_async(self) -> None: ...


# --- the format (pure) -----------------------------------------------------------------


def is_sealed_blob(data: bytes) -> bool:
    return data[: len(MAGIC)] == MAGIC


def sealed_key_id(data: bytes) -> str | None:
    """The key id a sealed blob names (None: not a sealed blob of a known version)."""
    if not is_sealed_blob(data) or len(data) < OVERHEAD or data[len(MAGIC)] != VERSION:
        return None
    start = len(MAGIC) + 1
    try:
        key_id = data[start : start + KEY_ID_CHARS].decode("ascii")
    except UnicodeDecodeError:
        return None
    return key_id if all(c in "0123456789abcdef" for c in key_id) else None


def _aad(header: bytes, key: SealingKey, storage_key: str) -> bytes:
    return _SEP.join(
        (
            b"kefu-blob/v1",
            header[: len(MAGIC) + 1 + KEY_ID_CHARS],
            key.tenant_id.encode(),
            key.customer_id.encode(),
            storage_key.encode(),
        )
    )


def seal_blob(data: bytes, key: SealingKey, storage_key: str, nonce: bytes) -> bytes:
    """``data`` sealed under ``key`` for ``storage_key`` (``nonce``: 12 random bytes)."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"a nonce is {NONCE_BYTES} bytes")
    header = MAGIC + bytes((VERSION,)) + key.key_id.encode("ascii") + nonce
    return header + key.blob_cipher().encrypt(nonce, data, _aad(header, key, storage_key))


def open_blob(sealed: bytes, key: SealingKey, storage_key: str) -> bytes:
    """The clear bytes of a sealed blob; :class:`BlobUnreadable` when they do not open."""
    if sealed_key_id(sealed) != key.key_id or tenant_of_key(storage_key) != key.tenant_id:
        raise BlobUnreadable(storage_key)
    header = sealed[:HEADER_BYTES]
    nonce = header[-NONCE_BYTES:]
    try:
        return key.blob_cipher().decrypt(
            nonce, sealed[HEADER_BYTES:], _aad(header, key, storage_key)
        )
    except InvalidTag:
        raise BlobUnreadable(storage_key) from None


# --- the store ---------------------------------------------------------------------------


class SealedBlobStore:
    """A :class:`BlobStore` whose blobs are sealed with their customer's data key.

    ``keys``: the process's key store, or what makes it when first needed (a process
    that never meets a sealed blob never reads the keys topic). ``seal``: False writes
    new blobs in clear (``security.seal_blobs``); sealed ones still open while their
    keys exist."""

    def __init__(
        self,
        store: BlobStore,
        keys: BlobKeys | Callable[[], BlobKeys],
        *,
        seal: bool = True,
    ) -> None:
        self.inner = store
        self.seal = seal
        self._keys: BlobKeys | None = None
        self._make_keys: Callable[[], BlobKeys] | None = None
        if hasattr(keys, "lookup"):
            self._keys = cast(BlobKeys, keys)
        else:
            self._make_keys = keys
        self._warming: asyncio.Task[None] | None = None

    @property
    def keys(self) -> BlobKeys:
        if self._keys is None:
            assert self._make_keys is not None
            self._keys = self._make_keys()
        return self._keys

    async def ensure(self) -> None:
        await self.inner.ensure()
        if self.seal and self._warming is None:
            # The keys topic read in the background (a first upload need not wait for
            # it; a broker not up yet does not stop the caller from starting).
            self._warming = asyncio.ensure_future(self._warm())

    async def _warm(self) -> None:
        try:
            await self.keys.start_async()
        except Exception as exc:  # the first put tries again, and says why if it fails
            log.warning("keys topic not read yet: %r", exc)

    async def put(self, key: str, data: bytes, content_type: str, customer: str = "") -> bool:
        if not self.seal:
            return await self.inner.put(key, data, content_type)
        if not valid_key(key):
            raise ValueError(f"not a blob key: {key!r}")
        if not customer:
            raise ValueError("a sealed blob needs its customer (whose key seals it)")
        # No existence check first (a stat, or an S3 HEAD, on every upload): the inner
        # store answers False when the key holds the same clear bytes already
        # (content-addressed), keeping what it has.
        keys = self.keys
        data_key = await keys.ensure(tenant_of_key(key), customer)
        await keys.flushed()  # the key is on the log before the blob is acknowledged
        nonce = os.urandom(NONCE_BYTES)
        if len(data) > _IN_THREAD:
            sealed = await asyncio.to_thread(seal_blob, data, data_key, key, nonce)
        else:
            sealed = seal_blob(data, data_key, key, nonce)
        return await self.inner.put(key, sealed, content_type)

    async def get(self, key: str) -> Blob:
        return (await self.get_with_key(key))[0]

    async def get_with_key(self, key: str) -> tuple[Blob, SealingKey | None]:
        """The blob, and the data key that opened it (None: it was stored in clear)."""
        blob = await self.inner.get(key)
        if not is_sealed_blob(blob.data):
            return blob, None  # stored in clear (before sealing, or with it off)
        key_id = sealed_key_id(blob.data)
        if key_id is None:
            raise BlobUnreadable(key)
        keys = self.keys
        data_key = keys.cached(key_id)
        if data_key is None:  # another process made it, or it is erased: may wait
            data_key = await asyncio.to_thread(keys.lookup, key_id)
        if data_key is None:
            raise BlobErased(key)
        if len(blob.data) > _IN_THREAD:
            clear = await asyncio.to_thread(open_blob, blob.data, data_key, key)
        else:
            clear = open_blob(blob.data, data_key, key)
        # What was stored was sniffed on the way in: the same bytes give the same type
        # (a local store sniffs what it reads, and would see only the sealed bytes).
        return Blob(clear, sniff(clear)), data_key

    async def put_with_key(
        self, key: str, data: bytes, content_type: str, data_key: SealingKey | None
    ) -> bool:
        """``data`` sealed under ``data_key``, or in clear when it is None: a blob made
        from another (a thumbnail, made after the upload) is stored as its source was,
        under the very key that opened the source, so it is shredded with it and no
        key is ever made for a customer who may be erased meanwhile."""
        if data_key is None:
            return await self.inner.put(key, data, content_type)
        if not valid_key(key) or tenant_of_key(key) != data_key.tenant_id:
            raise ValueError(f"not a blob key of {data_key.tenant_id}: {key!r}")
        sealed = seal_blob(data, data_key, key, os.urandom(NONCE_BYTES))
        return await self.inner.put(key, sealed, content_type)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def delete_prefix(self, prefix: str) -> int:
        return await self.inner.delete_prefix(prefix)

    async def usage(self, prefix: str) -> int:
        return await self.inner.usage(prefix)
