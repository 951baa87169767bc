"""Thumbnails made after the upload, off the edge's request.

Decoding a photo's pixels is most of what an image costs the gateway (a 100 KB photo
~2 ms of CPU, a 12 MP one ~30 ms: bench/RESULTS.md "Attachments"), so the common upload
(a JPEG or PNG kept lossless, ``connectors/attachments.py``) is stored after its
structural checks and its thumbnail made later. Its key is fixed at upload
(``<tenant>/<conversation>/<sha256>.thumb``): the event names it from the start.

- **The worker** (:meth:`Thumbnails.observe`, told each batch of the events reader):
  every image of a ``MessageReceived`` or ``ReplyProduced``, in a thread, a few at a
  time, never holding the batch; a backlog past ``backlog`` is left to the route.
- **The download route** (:meth:`Thumbnails.get`): a thumbnail asked for before it
  exists is made then (the same bounded pool, one making per key) and served.
- Pixels that do not decode (corruption inside the compressed data, which no structural
  check sees): an empty blob under the thumbnail's key remembers it, so nothing decodes
  that file again; the route answers 422, the pages show the file card, and the file
  itself stays a download.
- Sealed as its source: under the very data key that opened it
  (``SealedBlobStore.put_with_key``), so an erased customer's photo makes no thumbnail
  (410) and one made before goes with their key. A thumbnail written while its
  conversation's files were being purged is deleted again.

Idempotent: the key is content-addressed; a second making (another worker, the route at
the same moment) finds it there or writes the same picture.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from connectors.attachments import THUMBNAIL, AttachmentPolicy, AttachmentRejected, make_thumbnail
from connectors.blobs import Blob, BlobMissing, BlobStore, tenant_of_key, valid_key
from connectors.sealed_blobs import BlobErased, BlobUnreadable, SealedBlobStore
from schemas.keys import blob_usage_key
from schemas.records import Event, MessageReceived, ReplyProduced
from schemas.sealing import SealingKey

log = logging.getLogger(__name__)

UNDECODABLE = "image could not be decoded: shown as a file"
_SUFFIX = f".{THUMBNAIL}"


def source_of(key: str) -> str | None:
    """The image a thumbnail key names (None: not a thumbnail key)."""
    if not key.endswith(_SUFFIX) or not valid_key(key):
        return None
    return key.removesuffix(_SUFFIX)


class Thumbnails:
    """Makes the thumbnails of one process (the gateway's route, or a worker).

    ``redis``: counts what is stored on the tenant's quota counter, when there is one
    (the upload counted the file; its thumbnail is stored later)."""

    def __init__(
        self,
        store: BlobStore,
        policy: AttachmentPolicy,
        *,
        concurrency: int = 2,
        backlog: int = 1000,
        redis: Any = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.backlog = backlog
        self._redis = redis
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._making: dict[str, asyncio.Task[Blob]] = {}
        self._scheduled: set[asyncio.Task[None]] = set()

    async def get(self, key: str) -> Blob:
        """The thumbnail ``key`` names, made now if it is not stored yet. Raises what
        reading its source raises (:class:`BlobMissing`, ``BlobErased``, ...), and
        :class:`AttachmentRejected` (422) when the image's pixels do not decode."""
        try:
            blob = await self.store.get(key)
        except (BlobErased, BlobUnreadable):
            raise
        except BlobMissing:
            blob = await asyncio.shield(self._make_once(key))
        if not blob.data:
            raise AttachmentRejected(422, UNDECODABLE)
        return blob

    def observe(self, items: Iterable[tuple[Any, Event]]) -> None:
        """A batch of the events reader, ``(record, event)`` pairs: the thumbnails of
        the new images among them are scheduled. Returns at once. (MessageModerated
        repeats its message's attachments: not looked at.)"""
        for _, event in items:
            if isinstance(event, MessageReceived | ReplyProduced) and event.attachments:
                for attachment in event.attachments:
                    if attachment.thumbnail_key:
                        self.schedule(attachment.thumbnail_key)

    def schedule(self, key: str) -> None:
        """Make the thumbnail ``key`` names in the background, unless it exists."""
        if key in self._making or len(self._scheduled) >= self.backlog:
            return  # being made, or left to the download route
        task = asyncio.ensure_future(self._background(key))
        self._scheduled.add(task)
        task.add_done_callback(self._scheduled.discard)

    async def idle(self) -> None:
        """Until every scheduled thumbnail is made (tests, a clean stop)."""
        while self._scheduled:
            await asyncio.gather(*self._scheduled, return_exceptions=True)

    async def _background(self, key: str) -> None:
        try:
            if not await self.store.exists(key):
                await self._make_once(key)
        except BlobMissing:
            pass  # the file went (purged, erased) before its thumbnail was made
        except Exception:
            log.warning("thumbnail %s not made (the download route makes it)", key, exc_info=True)

    def _make_once(self, key: str) -> asyncio.Task[Blob]:
        task = self._making.get(key)
        if task is None:
            task = self._making[key] = asyncio.ensure_future(self._make(key))
            # Retrieved here too: every waiter may have gone (a closed page).
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            task.add_done_callback(lambda _: self._making.pop(key, None))
        return task

    async def _make(self, key: str) -> Blob:
        source = source_of(key)
        if source is None:
            raise BlobMissing(key)
        async with self._slots:
            data_key: SealingKey | None = None
            if isinstance(self.store, SealedBlobStore):
                image, data_key = await self.store.get_with_key(source)
            else:
                image = await self.store.get(source)
            try:
                data, content_type = await asyncio.to_thread(
                    make_thumbnail, image.data, self.policy
                )
            except AttachmentRejected as exc:
                log.info("thumbnail %s: %s", key, exc.reason)
                data, content_type = b"", "application/octet-stream"  # remembered
            if isinstance(self.store, SealedBlobStore):
                added = await self.store.put_with_key(key, data, content_type, data_key)
            else:
                added = await self.store.put(key, data, content_type)
            if added and not await self.store.exists(source):
                # Its conversation's files were purged meanwhile: do not outlive them.
                await self.store.delete_prefix(key)
                raise BlobMissing(source)
            if added and data and self._redis is not None:
                counter = blob_usage_key(tenant_of_key(key))
                if await self._redis.exists(counter):  # else seeded from the store
                    await self._redis.incrby(counter, len(data))
        return Blob(data, content_type)
