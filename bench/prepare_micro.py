"""CPU of an image upload's parts, alone (no gateway), per image:

- :func:`connectors.attachments.prepare` at the edge, three ways: a full decode and
  re-encode (``lossless_strip=False``), the lossless strip decoded at the edge
  (``decode_at_edge=True``: the thumbnail made in the request, as before issue 17's
  last change), and the default (structure checked, metadata left out, no pixel
  decoded); and the thumbnail made later from the stored bytes
  (:func:`connectors.attachments.make_thumbnail`: the worker's or the download
  route's), for the attachments bench's photo, a 12 MP phone photo, the same photo
  with EXIF orientation 6 (always re-encoded at the edge) and a phone screenshot (PNG);
- a blob write of the photo by ``LocalBlobStore`` (each in a new conversation's
  directory, as the bench's photos are; eight at a time in threads), before (an
  ``exists`` stat, ``mkdir``, ``mkstemp``, rename) and now (one exclusive open, a hard
  link);
- reading the upload's request body, multipart (Starlette's parser, as FastAPI's
  ``UploadFile`` uses it) against the raw body.

    .venv/bin/python bench/prepare_micro.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from PIL import Image, ImageDraw
from starlette.requests import Request

from bench.attachments import photo
from connectors.attachments import AttachmentPolicy, make_thumbnail, prepare
from connectors.blobs import LocalBlobStore, blob_key

DEFERRED = AttachmentPolicy(max_bytes={"*": 50 * 1024 * 1024})
AT_EDGE = dataclasses.replace(DEFERRED, decode_at_edge=True)
REENCODE = dataclasses.replace(DEFERRED, lossless_strip=False)


def cpu_ms(fn: Callable[[], object], seconds: float = 1.5) -> float:
    """The best of five runs' CPU milliseconds per call."""
    fn()
    start = time.process_time()
    n = 0
    while time.process_time() - start < seconds / 5:
        fn()
        n += 1
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - start) / n * 1000)
    return best


def turned(data: bytes) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    with Image.open(io.BytesIO(data)) as image:
        image.save(out, "JPEG", quality=90, exif=exif)
    return out.getvalue()


def screenshot() -> bytes:
    image = Image.new("RGB", (1170, 2532), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    for y in range(80, 2500, 60):
        draw.rectangle((40, y, 1130, y + 40), fill=(255, 255, 255), outline=(220, 220, 220))
        draw.text((60, y + 12), f"订单 #{y:06d} shipped — tracking 1Z999AA1012345678{y}", fill=0)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def run(data: bytes, policy: AttachmentPolicy) -> None:
    prepare(data, name="x", tenant="t", conversation="c", channel="api", policy=policy)


def stored(data: bytes) -> bytes:
    """The bytes the edge stores (what the thumbnail is made from)."""
    return prepare(
        data, name="x", tenant="t", conversation="c", channel="api", policy=DEFERRED
    ).blobs[0][1]


def put_before(root: Path, key: str, data: bytes) -> bool:
    """``LocalBlobStore._put`` before this change, for the comparison."""
    path = root / key
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def writes(data: bytes, batch: int = 300, rounds: int = 6) -> tuple[float, float]:
    """CPU ms per blob write of the photo, each in a conversation's new directory, eight
    at a time in threads as the gateway's requests make them, before and now. Batches
    in turn, the best of each: the file system's own work (inode allocation above all)
    varies with what the machine deleted lately."""
    root = Path(tempfile.mkdtemp(prefix="kefu-bench-blobs-"))
    sha = "ab" * 32

    async def before(where: Path) -> None:
        async def one(n: int) -> None:
            await asyncio.to_thread(put_before, where, blob_key("t", f"c{n}", sha), data)

        for start in range(0, batch, 8):
            await asyncio.gather(*(one(n) for n in range(start, start + 8)))

    async def now(where: Path) -> None:
        store = LocalBlobStore(where)
        for start in range(0, batch, 8):
            keys = [blob_key("t", f"c{n}", sha) for n in range(start, start + 8)]
            await asyncio.gather(*(store.put(key, data, "image/jpeg") for key in keys))

    best = {"before": float("inf"), "now": float("inf")}
    try:
        for r in range(rounds):
            ways = [("before", before), ("now", now)]
            for name, way in ways if r % 2 else ways[::-1]:
                where = root / f"{name}{r}"
                start = time.process_time()
                asyncio.run(way(where))
                best[name] = min(best[name], (time.process_time() - start) / batch * 1000)
                shutil.rmtree(where)
        return best["before"], best["now"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def body_reads(data: bytes) -> tuple[float, float]:
    """CPU ms to get an upload's bytes out of its request body: multipart (Starlette's
    parser: what ``UploadFile`` is read from) against the raw body."""
    boundary = "----kefu-bench-boundary"
    multipart = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="customer_id"\r\n\r\nc1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def request(body: bytes, content_type: str) -> Request:
        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/uploads",
            "query_string": b"customer_id=c1&name=p.jpg",
            "headers": [(b"content-type", content_type.encode())],
        }
        return Request(scope, receive)

    async def from_multipart() -> bytes:
        form = await request(multipart, f"multipart/form-data; boundary={boundary}").form()
        file = form["file"]
        assert not isinstance(file, str)
        got = await file.read()
        await form.close()
        return got

    async def from_raw() -> bytes:
        chunks = [chunk async for chunk in request(data, "application/octet-stream").stream()]
        return b"".join(chunks)

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(from_multipart()) == data
        return (
            cpu_ms(lambda: loop.run_until_complete(from_multipart())),
            cpu_ms(lambda: loop.run_until_complete(from_raw())),
        )
    finally:
        loop.close()


def main() -> None:
    images = {
        "bench photo 800x600 JPEG": photo(100_000),
        "phone photo 4032x3024 JPEG": photo(3_000_000, 4032, 3024),
        "bench photo, orientation 6": turned(photo(100_000)),
        "screenshot 1170x2532 PNG": screenshot(),
    }
    print("prepare at the edge, and the thumbnail made later (CPU ms/image):")
    print(
        f"{'image':30s} {'bytes':>10s} {'re-encode':>10s} {'decoded':>10s} {'edge now':>10s}"
        f" {'thumb later':>12s}"
    )
    for label, data in images.items():
        times = [cpu_ms(partial(run, data, policy)) for policy in (REENCODE, AT_EDGE, DEFERRED)]
        kept = stored(data)
        later = cpu_ms(partial(make_thumbnail, kept, DEFERRED))
        print(
            f"{label:30s} {len(data):10,d} {times[0]:10.2f} {times[1]:10.2f} {times[2]:10.2f}"
            f" {later:12.2f}"
        )
    photo_bytes = stored(images["bench photo 800x600 JPEG"])
    before, now = writes(photo_bytes)
    print(f"blob write of the photo, new dir, 8 at once: before {before:.3f}, now {now:.3f} ms")
    multipart, raw = body_reads(photo_bytes)
    print(f"the photo out of its request body: multipart {multipart:.3f} ms, raw {raw:.3f} ms")


if __name__ == "__main__":
    main()
