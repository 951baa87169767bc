"""Files from strangers: how an upload becomes an :class:`~schemas.records.Attachment`.

Every channel (REST, web chat, console, WeChat, Telegram, email) passes the bytes it
received through :func:`accept`, which refuses before anything is stored or published:

- over the channel's size limit: 413 with the limit;
- a type not on the allow-list, sniffed from the bytes (``filetype``), never from the
  name or the declared type: a ``.exe`` named ``photo.jpg`` is ``application/x-msdownload``
  and gets 415;
- an image whose structure is broken (truncated: no end marker, a segment or chunk
  running past the end, a bad PNG CRC) or that does not decode where it is decoded:
  422; one with more pixels than ``max_image_pixels`` (a decompression bomb: a few KB
  that expand to gigabytes): 422, refused from its header before a pixel is decoded.

The stored bytes of an image carry no EXIF (no GPS position of the customer's home),
orientation applied. The common upload, a JPEG or PNG with no orientation to apply,
costs the edge no pixel decoding: its header is read, its metadata left out segment by
segment (``connectors/image_strip.py``, which also checks its structure) and its
compressed pixels are stored as they came; its thumbnail is made after the upload
(``connectors/thumbnails.py``: by the worker, or by the download route when asked for
first), which is where pixels that do not decode are found (the thumbnail answers 422,
the pages show the file card, the file stays a download). Decoding is most of what a
photo costs (bench/RESULTS.md "Attachments"); ``AttachmentPolicy.decode_at_edge``
decodes at upload instead. Everything else (an orientation to apply, CMYK, GIF, WebP,
a shape the strip does not handle) is decoded and re-encoded at the edge, its thumbnail
stored beside it. SVG and HTML are files, never images: the download route serves them
as attachments under a CSP that runs nothing (``connectors/files_api.py``).

Download links are signed per tenant and expire (:class:`UrlSigner`): a URL is all a
customer's browser, a webhook receiver or a channel API needs, and it opens one blob.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import re
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import filetype
from PIL import Image, ImageOps, UnidentifiedImageError

from connectors.blobs import BlobStore, blob_key, tenant_of_key
from connectors.image_strip import strip_jpeg, strip_png, valid_icc
from connectors.sniffing import sniff
from schemas.keys import blob_usage_key
from schemas.records import Attachment

IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
DEFAULT_ALLOWED = frozenset(
    {
        *IMAGE_TYPES,
        "application/pdf",
        "text/plain",
        "text/csv",
        "application/zip",
        "application/msword",
        "application/vnd.ms-excel",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "audio/amr",
        "audio/mpeg",
        "audio/ogg",
        "audio/x-wav",
        "audio/mp4",
        "audio/aac",
        "video/mp4",
        "video/quicktime",
        "video/webm",
        # Served as downloads only (never inline): see connectors/files_api.py.
        "image/svg+xml",
    }
)
# Never rendered by the browser from our origin, whatever the allow-list says.
DOWNLOAD_ONLY = frozenset({"image/svg+xml", "text/html", "application/xhtml+xml"})
_PILLOW_FORMATS = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/gif": "GIF",
    "image/webp": "WEBP",
}
MAX_NAME = 200
THUMBNAIL = "thumb"  # the variant of an image's key that names its thumbnail
_ORIENTATION = 0x0112  # the EXIF tag a phone sets instead of turning the pixels


class AttachmentRejected(ValueError):
    """Refused at the edge: ``status`` is the HTTP status (413, 415, 422, 507), ``reason``
    what the sender is told. Nothing was stored or published."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class AttachmentPolicy:
    # Per channel ("*": every other); bytes as received.
    max_bytes: Mapping[str, int] = field(default_factory=lambda: {"*": 20 * 1024 * 1024})
    allowed_types: frozenset[str] = DEFAULT_ALLOWED
    max_image_pixels: int = 40_000_000
    thumbnail_px: int = 320
    tenant_quota_bytes: int = 0  # 0: no quota
    # JPEG and PNG without an orientation to apply: metadata left out segment by segment,
    # the compressed pixels kept. False: every image is decoded and re-encoded at the
    # edge (about twice the CPU of a decode alone, and no pixel decoding is deferred).
    lossless_strip: bool = True
    # Those lossless uploads decoded at the edge too (every corrupt pixel refused at
    # upload, the thumbnail stored with them: ~2 ms more CPU per 100 KB photo). False:
    # the thumbnail, and the decode, after the upload (connectors/thumbnails.py).
    decode_at_edge: bool = False

    def limit_for(self, channel: str) -> int:
        return int(self.max_bytes.get(channel, self.max_bytes.get("*", 20 * 1024 * 1024)))

    @property
    def largest_limit(self) -> int:
        return max(self.max_bytes.values(), default=20 * 1024 * 1024)


# --- what the bytes are ---------------------------------------------------------------


def kind_of(mime_type: str) -> str:
    if mime_type in IMAGE_TYPES:
        return "image"
    major = mime_type.split("/", 1)[0]
    return major if major in ("audio", "video") else "file"


def safe_name(name: str, mime_type: str = "") -> str:
    """A file name fit to show and to moderate: no path, no control characters or
    newlines, at most MAX_NAME characters; a default from the type when empty."""
    name = unicodedata.normalize("NFC", name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip(" .")
    if not name:
        known = filetype.get_type(mime=mime_type)
        name = f"attachment.{known.extension if known else 'bin'}"
    return name[:MAX_NAME]


# --- accepting bytes --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepared:
    """What :func:`prepare` made of the bytes: the attachment, and the blobs to store."""

    attachment: Attachment
    blobs: tuple[tuple[str, bytes, str], ...]  # (key, bytes, content type)


def prepare(
    data: bytes,
    *,
    name: str,
    tenant: str,
    conversation: str,
    channel: str,
    policy: AttachmentPolicy,
    duration_ms: int = 0,
) -> Prepared:
    """Check and normalize an upload (CPU only: run it in a thread)."""
    limit = policy.limit_for(channel)
    if len(data) > limit:
        raise AttachmentRejected(413, f"attachment over {limit} bytes (the {channel} limit)")
    if not data:
        raise AttachmentRejected(422, "empty attachment")
    mime_type = sniff(data)
    if mime_type not in policy.allowed_types:
        raise AttachmentRejected(415, f"file type not allowed: {mime_type}")
    kind = kind_of(mime_type)
    width = height = 0
    thumbnail: bytes | None = None
    thumbnail_type = ""
    if kind == "image":
        data, width, height, thumbnail, thumbnail_type = _reencode(data, mime_type, policy)
    sha256 = hashlib.sha256(data).hexdigest()
    key = blob_key(tenant, conversation, sha256)
    blobs = [(key, data, mime_type)]
    thumbnail_key = ""
    if kind == "image":
        # Named now (the event carries it), stored now or made later (None).
        thumbnail_key = blob_key(tenant, conversation, sha256, THUMBNAIL)
        if thumbnail is not None:
            blobs.append((thumbnail_key, thumbnail, thumbnail_type))
    attachment = Attachment(
        kind=kind,
        mime_type=mime_type,
        size=len(data),
        name=safe_name(name, mime_type),
        sha256=sha256,
        storage_key=key,
        width=width,
        height=height,
        duration_ms=max(0, int(duration_ms)),
        thumbnail_key=thumbnail_key,
    )
    return Prepared(attachment, tuple(blobs))


def _reencode(
    data: bytes, mime_type: str, policy: AttachmentPolicy
) -> tuple[bytes, int, int, bytes | None, str]:
    """The bytes to serve, their size, a thumbnail (None: made later) and its type;
    without EXIF, or :class:`AttachmentRejected` (422) when the image is too large or
    broken.

    A JPEG or PNG whose pixels need no turning (no EXIF orientation, or 1) keeps its
    compressed pixels: its metadata is left out segment by segment and its structure
    checked (:mod:`connectors.image_strip`: a truncated file has no end marker, or a
    segment or chunk that runs past the end, and is handed to the full decode below,
    which refuses it); its pixels are decoded later, for the thumbnail
    (:func:`make_thumbnail`), unless ``policy.decode_at_edge``. Everything else is
    decoded and re-encoded: the bytes served are Pillow's, without EXIF or trailing
    data, turned as the camera meant."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size  # from the header: nothing decoded yet
            if width * height > policy.max_image_pixels:
                raise AttachmentRejected(
                    422,
                    f"image too large: {width}x{height} pixels (limit {policy.max_image_pixels})",
                )
            frames = getattr(probe, "n_frames", 1)
            if width * height * frames > policy.max_image_pixels * 4:
                raise AttachmentRejected(
                    422, f"animation too large: {frames} frames of {width}x{height}"
                )
            # An ICC profile describes the colours (no location): kept, on both paths.
            icc = valid_icc(probe.info.get("icc_profile"))
            if (stored := _lossless(data, mime_type, probe, icc, policy)) is not None:
                if not policy.decode_at_edge:
                    return stored, width, height, None, ""
                thumbnail, thumbnail_type = make_thumbnail(stored, policy)
                return stored, width, height, thumbnail, thumbnail_type
            # (A PNG's EXIF may follow its pixels: reading it decodes them.)
            turned = mime_type != "image/gif" and probe.getexif().get(_ORIENTATION, 1) != 1
            probe.load()  # the decode: a truncated or corrupt image fails here
            # No copy that changes nothing (profiled: copies were 16 % of an upload's
            # CPU): the decoded image is encoded, then shrunk in place to the thumbnail.
            image: Image.Image = probe
            if turned:
                image = ImageOps.exif_transpose(probe)  # the pixels as the camera meant
            out = io.BytesIO()
            fmt = _PILLOW_FORMATS[mime_type]
            if fmt == "JPEG":
                rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
                # Pillow would carry the JPEG comment (COM) over: not its text either.
                rgb.save(out, "JPEG", quality=90, icc_profile=icc, comment=b"")
            elif fmt == "GIF" and frames > 1:
                probe.save(out, "GIF", save_all=True, loop=probe.info.get("loop", 0), comment=b"")
                probe.seek(0)
            elif fmt == "GIF":
                image.save(out, "GIF", comment=b"")  # (Pillow would carry the comment over)
            elif fmt == "PNG":
                image.save(out, "PNG", icc_profile=icc)
            else:
                image.save(out, fmt)
            width, height = image.size
            thumbnail, thumbnail_type = _thumbnail(image, policy)
    except AttachmentRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise AttachmentRejected(422, f"image too large: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise AttachmentRejected(422, f"image could not be decoded ({type(exc).__name__})") from exc
    return out.getvalue(), width, height, thumbnail, thumbnail_type


def _lossless(
    data: bytes,
    mime_type: str,
    probe: Image.Image,
    icc: bytes | None,
    policy: AttachmentPolicy,
) -> bytes | None:
    """The bytes without metadata; ``None`` when the pixels must be turned (EXIF
    orientation other than 1), the file is not a shape :mod:`connectors.image_strip`
    rewrites (a truncated one among them), or the policy asks for a re-encode."""
    if not policy.lossless_strip:
        return None
    if mime_type == "image/jpeg":
        if probe.getexif().get(_ORIENTATION, 1) != 1:  # APP1, read with the header
            return None
        stored = strip_jpeg(data, icc)
    elif mime_type == "image/png":
        stripped = strip_png(data, keep_icc=icc is not None)
        if stripped is None or (stripped[1] is not None and _orientation(stripped[1]) != 1):
            return None
        stored = stripped[0]
    else:
        return None
    return stored


def _orientation(exif: bytes) -> object:
    """The orientation tag of a PNG's ``eXIf`` payload (0 when it does not parse: then
    the full re-encode reads it, as it always did)."""
    tags = Image.Exif()
    try:
        tags.load(exif)
    except Exception:  # malformed EXIF from a stranger: whatever Pillow raises
        return 0
    return tags.get(_ORIENTATION, 1)


def make_thumbnail(data: bytes, policy: AttachmentPolicy) -> tuple[bytes, str]:
    """The thumbnail of an image as stored, and its type: the decode of its pixels (a
    JPEG at the thumbnail's DCT scale, 1/2 to 1/8: every scan is still entropy-decoded,
    so a corrupt one fails as at full size). :class:`AttachmentRejected` (422) when they
    do not decode or are too many. CPU only: run it in a thread."""
    try:
        # Only the formats an upload can be stored as: Pillow opens many more (EPS
        # would run Ghostscript).
        with Image.open(io.BytesIO(data), formats=tuple(_PILLOW_FORMATS.values())) as image:
            width, height = image.size
            if width * height > policy.max_image_pixels:
                raise AttachmentRejected(422, f"image too large: {width}x{height} pixels")
            if image.format == "JPEG":
                image.draft(image.mode, _thumbnail_size(width, height, policy))
            image.load()  # the decode: a truncated or corrupt image fails here
            return _thumbnail(image, policy, box=True)
    except AttachmentRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise AttachmentRejected(422, f"image too large: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise AttachmentRejected(422, f"image could not be decoded ({type(exc).__name__})") from exc


def _thumbnail_size(width: int, height: int, policy: AttachmentPolicy) -> tuple[int, int]:
    px = policy.thumbnail_px
    scale = min(1.0, px / width, px / height)
    return max(1, int(width * scale)), max(1, int(height * scale))


def _thumbnail(
    image: Image.Image, policy: AttachmentPolicy, box: bool = False
) -> tuple[bytes, str]:
    """The console's preview of the decoded ``image`` (which it may shrink in place):
    JPEG, or PNG when the image has transparency. ``box``: the last step (less than 2x
    after the DCT-scaled decode of a JPEG, or after ``reduce``) averages areas, 30 %
    cheaper than bilinear, as good for a shrink that small."""
    mode = "RGBA" if _has_alpha(image) else "RGB"
    thumb = image if image.mode == mode else image.convert(mode)
    # Bilinear after an integer box reduction: a preview, at a third of the default
    # Lanczos filter's CPU (the largest cost of an upload when profiled).
    resample = Image.Resampling.BOX if box else Image.Resampling.BILINEAR
    thumb.thumbnail((policy.thumbnail_px, policy.thumbnail_px), resample, reducing_gap=1.0)
    small = io.BytesIO()
    if mode == "RGBA":
        thumb.save(small, "PNG")
        return small.getvalue(), "image/png"
    thumb.save(small, "JPEG", quality=80)
    return small.getvalue(), "image/jpeg"


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )


class Quota:
    """A tenant's stored bytes against ``AttachmentPolicy.tenant_quota_bytes``: counted
    in Redis (one counter per tenant, shared by every gateway), seeded from the store."""

    def __init__(self, redis: Any, store: BlobStore, limit: int) -> None:
        self._redis = redis
        self._store = store
        self.limit = limit

    @staticmethod
    def key(tenant: str) -> str:
        return blob_usage_key(tenant)

    async def used(self, tenant: str) -> int:
        raw = await self._redis.get(self.key(tenant))
        if raw is None:
            used = await self._store.usage(f"{tenant}/")
            await self._redis.set(self.key(tenant), used, nx=True)
            return used
        return int(raw)

    async def check(self, tenant: str, size: int) -> None:
        if self.limit and await self.used(tenant) + size > self.limit:
            raise AttachmentRejected(
                507, f"the tenant's storage quota ({self.limit} bytes) is full"
            )

    async def add(self, tenant: str, size: int) -> None:
        await self._redis.incrby(self.key(tenant), size)

    async def free(self, tenant: str, size: int) -> None:
        await self._redis.decrby(self.key(tenant), size)


async def accept(
    store: BlobStore,
    data: bytes,
    *,
    name: str,
    tenant: str,
    conversation: str,
    channel: str,
    policy: AttachmentPolicy,
    quota: Quota | None = None,
    duration_ms: int = 0,
    customer: str = "",
) -> Attachment:
    """Check, normalize and store an upload; its attachment, or :class:`AttachmentRejected`.
    ``customer``: the conversation's customer (a sealed store encrypts with their key).
    An image's thumbnail may not be stored yet (:mod:`connectors.thumbnails`)."""
    prepared = await asyncio.to_thread(
        prepare,
        data,
        name=name,
        tenant=tenant,
        conversation=conversation,
        channel=channel,
        policy=policy,
        duration_ms=duration_ms,
    )
    total = sum(len(blob) for _, blob, _ in prepared.blobs)
    if quota is not None:
        await quota.check(tenant, total)
    added = 0
    for key, blob, content_type in prepared.blobs:
        if await store.put(key, blob, content_type, customer=customer):
            added += len(blob)
    if quota is not None and added:
        await quota.add(tenant, added)
    return prepared.attachment


# --- links ------------------------------------------------------------------------------


FILES_PATH = "/v1/files/"


class UrlSigner:
    """Expiring download links, signed with a per-tenant key derived from one secret:
    a link opens one blob until ``exp``; another tenant's key cannot make one."""

    def __init__(self, secret: bytes, ttl_s: int = 3600, base_url: str = "") -> None:
        if not secret:
            raise ValueError("a URL signing secret is required")
        self._secret = secret
        self.ttl_s = ttl_s
        self.base_url = base_url.rstrip("/")

    def _tenant_key(self, tenant: str) -> bytes:
        return hmac.new(self._secret, b"files/" + tenant.encode(), hashlib.sha256).digest()

    def signature(self, key: str, exp: int) -> str:
        mac = hmac.new(
            self._tenant_key(tenant_of_key(key)), f"{key}\n{exp}".encode(), hashlib.sha256
        )
        return base64.urlsafe_b64encode(mac.digest()[:18]).decode()

    def url(self, key: str, now_s: float | None = None, absolute: bool = False) -> str:
        exp = int((time.time() if now_s is None else now_s) + self.ttl_s)
        path = f"{FILES_PATH}{quote(key, safe='/')}?exp={exp}&sig={self.signature(key, exp)}"
        return f"{self.base_url}{path}" if absolute else path

    def verify(self, key: str, exp: int, sig: str, now_s: float | None = None) -> bool:
        if exp < (time.time() if now_s is None else now_s):
            return False
        return hmac.compare_digest(self.signature(key, exp), sig)


def with_urls(
    attachments: list[dict[str, Any]], signer: UrlSigner, absolute: bool = False
) -> list[dict[str, Any]]:
    """Attachment metadata (as in the Redis list or ``Attachment.to_avro``) with a signed
    ``url`` and, for images, ``thumbnail_url``; storage keys are not shown."""
    out = []
    for item in attachments:
        shown = {
            k: v for k, v in item.items() if k not in ("storage_key", "thumbnail_key", "sha256")
        }
        shown["url"] = signer.url(item["storage_key"], absolute=absolute)
        if item.get("thumbnail_key"):
            shown["thumbnail_url"] = signer.url(item["thumbnail_key"], absolute=absolute)
        out.append(shown)
    return out


_UPLOAD_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def valid_upload_id(upload_id: str) -> bool:
    return bool(_UPLOAD_ID.match(upload_id))
