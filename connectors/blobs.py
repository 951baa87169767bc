"""Where attachment bytes live: never in Kafka, in a blob store behind one interface.

- :class:`LocalBlobStore`: files under the state dir (the embedded default). Written to a
  temporary name and renamed, so a reader never sees half a file.
- :class:`S3BlobStore`: any S3-compatible service (MinIO in ``docker-compose.yml``,
  AWS, ...) through boto3, the maintained SDK; its blocking calls run in a thread.

Keys are ``<tenant>/<conversation>/<sha256>[.<variant>]`` (:func:`blob_key`): scoped by
tenant (nothing crosses tenants, a quota is a prefix's size) and by conversation, so
erasing or expiring a conversation deletes one prefix and nothing another conversation
still shows. Within a conversation the same bytes are stored once (content-addressed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from connectors.sniffing import sniff

_SEGMENT = re.compile(r"^[A-Za-z0-9_.:@\-]{1,200}$")
_VARIANT = re.compile(r"^[a-z0-9]{1,16}$")
_PART = ".part-"  # a file being written (LocalBlobStore): never listed, never counted
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


class BlobMissing(LookupError):
    """No blob under that key (deleted, expired, or never stored)."""


def blob_key(tenant: str, conversation: str, sha256: str, variant: str = "") -> str:
    """The key of a conversation's blob; ``variant`` names a derived one ("thumb")."""
    for segment in (tenant, conversation):
        if not _SEGMENT.match(segment) or segment in (".", ".."):
            raise ValueError(f"not a key segment: {segment!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError("sha256 must be 64 hex digits")
    if variant and not _VARIANT.match(variant):
        raise ValueError(f"not a variant: {variant!r}")
    return f"{tenant}/{conversation}/{sha256}" + (f".{variant}" if variant else "")


def tenant_of_key(key: str) -> str:
    return key.split("/", 1)[0]


def valid_key(key: str) -> bool:
    """Whether ``key`` is one :func:`blob_key` makes (no ``..``, no absolute path)."""
    parts = key.split("/")
    if len(parts) != 3 or not all(_SEGMENT.match(p) and p not in (".", "..") for p in parts[:2]):
        return False
    digest, _, variant = parts[2].partition(".")
    return bool(re.fullmatch(r"[0-9a-f]{64}", digest)) and (
        not variant or bool(_VARIANT.match(variant))
    )


def conversation_prefix(tenant: str, conversation: str) -> str:
    return f"{tenant}/{conversation}/"


@dataclass(frozen=True, slots=True)
class Blob:
    data: bytes
    content_type: str


class BlobStore(Protocol):
    async def ensure(self) -> None:
        """Make the store ready to write (its directory, its bucket); idempotent."""
        ...

    async def put(self, key: str, data: bytes, content_type: str, customer: str = "") -> bool:
        """Store ``data``; False when the key already held it (content-addressed).
        ``customer``: whose data it is (a sealed store, ``connectors/sealed_blobs.py``,
        encrypts it with their key; a plain store ignores it)."""
        ...

    async def get(self, key: str) -> Blob:
        """The blob, or :class:`BlobMissing`."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every blob under ``prefix``; the bytes freed."""
        ...

    async def usage(self, prefix: str) -> int:
        """Bytes stored under ``prefix`` (a tenant's, for its quota)."""
        ...


class LocalBlobStore:
    """Blobs as files under ``root``. No sidecar for the content type: it is sniffed
    from the bytes again on read (what was stored was sniffed and normalized on the way
    in), which spares an upload two of its four file writes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not valid_key(key) and not key.endswith("/"):
            raise ValueError(f"not a blob key: {key!r}")
        return self.root / key

    async def put(self, key: str, data: bytes, content_type: str, customer: str = "") -> bool:
        return await asyncio.to_thread(self._put, key, data, content_type)

    def _put(self, key: str, data: bytes, content_type: str) -> bool:
        # Few system calls: one exclusive open of a temporary name (the directory made
        # only when the open says it is missing, not tried on every write), then a hard
        # link that fails if the key is there already (content-addressed: the same
        # bytes), so no stat first, an exact answer when two write at once, and no
        # reader ever sees part of a file.
        path = self._path(key)
        tmp = path.with_name(f"{_PART}{os.urandom(8).hex()}")
        try:
            fd = os.open(tmp, _CREATE, 0o600)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, _CREATE, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: rename over it
                if path.exists():
                    return False
                os.replace(tmp, path)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    async def get(self, key: str) -> Blob:
        return await asyncio.to_thread(self._get, key)

    def _get(self, key: str) -> Blob:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobMissing(key) from None
        return Blob(data, sniff(data))

    async def exists(self, key: str) -> bool:
        return self._path(key).exists()

    async def delete_prefix(self, prefix: str) -> int:
        return await asyncio.to_thread(self._delete_prefix, prefix)

    def _delete_prefix(self, prefix: str) -> int:
        freed = 0
        for path in list(self._files(prefix)):
            freed += path.stat().st_size
            path.unlink(missing_ok=True)
        return freed

    async def usage(self, prefix: str) -> int:
        return await asyncio.to_thread(lambda: sum(p.stat().st_size for p in self._files(prefix)))

    def _files(self, prefix: str) -> Iterator[Path]:
        if ".." in prefix.split("/") or prefix.startswith("/"):
            raise ValueError(f"not a prefix: {prefix!r}")
        # From the deepest directory the prefix names (a whole key: its conversation's).
        directory = prefix.rpartition("/")[0]
        base = self.root / directory if directory else self.root
        if not base.is_dir():
            return
        for path in base.rglob("*"):
            name = path.name
            if (
                path.is_file()
                and not name.startswith(_PART)
                and path.relative_to(self.root).as_posix().startswith(prefix)
            ):
                yield path


class S3BlobStore:
    """Blobs as objects in one bucket of an S3-compatible service."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str = "",
        region: str = "us-east-1",
        access_key: str = "",
        secret_key: str = "",
        client: Any = None,
    ) -> None:
        import boto3  # imported here: the embedded stack never needs it

        self.bucket = bucket
        self._client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region,
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
        )

    async def ensure(self) -> None:
        """Create the bucket if it is not there (a first start against MinIO)."""
        from botocore.exceptions import ClientError

        def ensure() -> None:
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError:
                self._client.create_bucket(Bucket=self.bucket)

        await asyncio.to_thread(ensure)

    async def put(self, key: str, data: bytes, content_type: str, customer: str = "") -> bool:
        if not valid_key(key):
            raise ValueError(f"not a blob key: {key!r}")
        if await self.exists(key):
            return False
        await asyncio.to_thread(
            self._client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
        )
        return True

    async def get(self, key: str) -> Blob:
        from botocore.exceptions import ClientError

        def get() -> Blob:
            try:
                found = self._client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise BlobMissing(key) from None
                raise
            return Blob(
                found["Body"].read(), str(found.get("ContentType") or "application/octet-stream")
            )

        return await asyncio.to_thread(get)

    async def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self._client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    return False
                raise
            return True

        return await asyncio.to_thread(head)

    def _objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            yield from page.get("Contents", [])

    async def delete_prefix(self, prefix: str) -> int:
        def delete() -> int:
            objects = list(self._objects(prefix))
            for start in range(0, len(objects), 1000):  # the API's batch limit
                chunk = objects[start : start + 1000]
                self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": o["Key"]} for o in chunk], "Quiet": True},
                )
            return sum(int(o.get("Size", 0)) for o in objects)

        return await asyncio.to_thread(delete)

    async def usage(self, prefix: str) -> int:
        return await asyncio.to_thread(
            lambda: sum(int(o.get("Size", 0)) for o in self._objects(prefix))
        )
