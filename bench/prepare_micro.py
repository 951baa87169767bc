"""CPU of :func:`connectors.attachments.prepare` per image, alone (no gateway): the
lossless metadata strip (the default) against a full decode and re-encode
(``lossless_strip=False``), for the attachments bench's photo, a 12 MP phone photo, the
same photo with EXIF orientation 6 (always re-encoded) and a phone screenshot (PNG).

    .venv/bin/python bench/prepare_micro.py
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from PIL import Image, ImageDraw

from bench.attachments import photo
from connectors.attachments import AttachmentPolicy, prepare

LOSSLESS = AttachmentPolicy(max_bytes={"*": 50 * 1024 * 1024})
REENCODE = dataclasses.replace(LOSSLESS, lossless_strip=False)


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


def main() -> None:
    images = {
        "bench photo 800x600 JPEG": photo(100_000),
        "phone photo 4032x3024 JPEG": photo(3_000_000, 4032, 3024),
        "bench photo, orientation 6": turned(photo(100_000)),
        "screenshot 1170x2532 PNG": screenshot(),
    }
    print(f"{'image':30s} {'bytes':>10s} {'re-encode':>10s} {'lossless':>10s}  (CPU ms/image)")
    for label, data in images.items():
        times = [cpu_ms(partial(run, data, policy)) for policy in (REENCODE, LOSSLESS)]
        print(f"{label:30s} {len(data):10,d} {times[0]:10.2f} {times[1]:10.2f}")


if __name__ == "__main__":
    main()
