"""The attachment parts of a process, from settings: blob store, link signer, policy."""

from __future__ import annotations

import os
import secrets
from functools import partial
from pathlib import Path

from connectors.attachments import DEFAULT_ALLOWED, AttachmentPolicy, UrlSigner
from connectors.blobs import BlobStore, LocalBlobStore, S3BlobStore
from connectors.sealed_blobs import SealedBlobStore
from connectors.uploads import Files
from kefu.settings import Settings


def blob_store(settings: Settings) -> BlobStore:
    """The configured store, sealed (``connectors/sealed_blobs.py``): customers' blobs
    are written encrypted with their data key (unless ``security.seal_blobs`` or
    ``security.seal_personal_data`` is off) and every sealed blob is opened on read."""
    from kefu.data_keys import key_store  # here: kefu.data_keys imports this module

    a = settings.attachments
    store: BlobStore
    if a.store == "s3":
        store = S3BlobStore(
            a.s3_bucket,
            endpoint_url=a.s3_endpoint,
            region=a.s3_region,
            access_key=a.s3_access_key.get_secret_value(),
            secret_key=a.s3_secret_key.get_secret_value(),
        )
    else:
        store = LocalBlobStore(a.local_dir or settings.state_dir / "blobs")
    s = settings.security
    return SealedBlobStore(
        store, partial(key_store, settings), seal=s.seal_personal_data and s.seal_blobs
    )


def machine_secret(settings: Settings, name: str) -> bytes:
    """A random key made once and kept in the state dir (``<name>.key``), shared by the
    processes of one machine: the default where a setting names no key."""
    path = Path(settings.state_dir) / f"{name}.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(secrets.token_hex(32))
        tmp.chmod(0o600)
        try:  # two processes starting at once: the first link wins, both read it
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip().encode()


def url_secret(settings: Settings) -> bytes:
    """The configured secret, or this machine's."""
    configured = settings.attachments.url_secret.get_secret_value()
    return configured.encode() if configured else machine_secret(settings, "attachments")


def url_signer(settings: Settings) -> UrlSigner:
    a = settings.attachments
    base = a.public_url or f"http://{settings.gateway.host}:{settings.gateway.port}"
    return UrlSigner(url_secret(settings), ttl_s=a.url_ttl_s, base_url=base)


def attachment_policy(settings: Settings) -> AttachmentPolicy:
    a = settings.attachments
    return AttachmentPolicy(
        max_bytes=dict(a.max_bytes),
        allowed_types=frozenset(a.allowed_types) if a.allowed_types else DEFAULT_ALLOWED,
        max_image_pixels=a.max_image_pixels,
        tenant_quota_bytes=a.tenant_quota_bytes,
        decode_at_edge=a.decode_at_edge,
    )


def files(settings: Settings) -> Files:
    return Files(
        blob_store(settings),
        url_signer(settings),
        attachment_policy(settings),
        thumbnail_concurrency=settings.attachments.thumbnail_concurrency,
    )
