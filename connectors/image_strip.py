"""Metadata out of JPEG and PNG files without decoding and re-encoding their pixels.

Used by :func:`connectors.attachments.prepare` for the common upload (a JPEG or PNG
whose pixels need no turning): the file is rebuilt from an allow-list of its own
segments, so what is stored holds the compressed pixels, the tables needed to decode
them and nothing else — no EXIF (no GPS position, no camera serial, no embedded
preview), no XMP, IPTC, comments, text chunks or timestamps, no trailing bytes after
the end marker (a polyglot's payload, an MPO's second picture). The walk is also the
upload's structural check: a file cut short has no end marker, or a segment or chunk
that runs past its end, and is refused by the caller's full decode; the pixels of what
passes are decoded later, for its thumbnail (``connectors/thumbnails.py``).

Anything outside the shapes handled here (an Adobe or CMYK JPEG, arithmetic or lossless
coding, an unknown critical PNG chunk, animation, a bad length or CRC, a missing end
marker) makes the functions answer ``None``: the caller then decodes and re-encodes in
full, the slower path that handles (or refuses) everything.
"""

from __future__ import annotations

import re
import zlib

# --- JPEG -------------------------------------------------------------------------------

_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"
_APP0, _APP14, _COM, _SOS, _EOI_CODE = 0xE0, 0xEE, 0xFE, 0xDA, 0xD9
_TABLES = frozenset({0xDB, 0xC4, 0xDD})  # DQT, DHT, DRI: needed to decode, copied
# Baseline, extended sequential, progressive (Huffman): what cameras and phones write.
_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
# In entropy-coded data a 0xFF is followed by 0x00 (a stuffed byte) or RST0..7; any other
# byte after it starts a marker (0xFF itself: fill before a marker).
_MARKER_IN_SCAN = re.compile(rb"\xff(?=[^\x00\xd0-\xd7])")
_ICC_HEADER = b"ICC_PROFILE\x00"
_ICC_CHUNK = 65_519  # 65,535 - 2 (length) - 14 (header, sequence, count)


def valid_icc(profile: object) -> bytes | None:
    """``profile`` if it looks like an ICC profile (declared size, ``acsp`` signature);
    ``None`` otherwise (then no profile is kept)."""
    if not isinstance(profile, bytes) or len(profile) < 132:
        return None
    if profile[36:40] != b"acsp" or int.from_bytes(profile[:4], "big") != len(profile):
        return None
    return profile


def _icc_segments(profile: bytes) -> list[bytes]:
    chunks = [profile[i : i + _ICC_CHUNK] for i in range(0, len(profile), _ICC_CHUNK)]
    if len(chunks) > 255:
        return []
    return [
        b"\xff\xe2"
        + (len(chunk) + 16).to_bytes(2, "big")
        + _ICC_HEADER
        + bytes((n, len(chunks)))
        + chunk
        for n, chunk in enumerate(chunks, 1)
    ]


def _jfif(body: bytes) -> bytes:
    """A JFIF APP0 with the original's pixel density and no embedded thumbnail."""
    units, density = body[7], body[8:12]
    if units > 2 or b"\x00\x00" in (density[:2], density[2:]):
        units, density = 0, b"\x00\x01\x00\x01"
    return b"\xff\xe0\x00\x10JFIF\x00\x01\x01" + bytes((units,)) + density + b"\x00\x00"


def strip_jpeg(data: bytes, icc_profile: bytes | None = None) -> bytes | None:
    """``data`` rebuilt from its SOI, a clean JFIF header, ``icc_profile`` (already
    checked by the caller; ``None``: no profile), its quantization and Huffman tables,
    restart interval, frame header, scans and EOI, in their order. Every APPn segment but
    JFIF (EXIF, XMP, MPF, IPTC, ...), comments and everything after the first EOI are
    left out. ``None`` when the file is not a shape this handles (see the module)."""
    if not data.startswith(_SOI):
        return None
    out = [_SOI]
    n = len(data)
    pos = 2
    frame = jfif = False
    scans = 0
    while True:
        if pos >= n or data[pos] != 0xFF:
            return None
        while pos < n and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= n:
            return None
        code = data[pos]
        pos += 1
        if code == _EOI_CODE:
            if not scans:
                return None
            out.append(_EOI)
            return b"".join(out)
        if not (0xC0 <= code <= 0xFE) or 0xD0 <= code <= 0xD8:
            return None  # stuffing, TEM, a reserved code, RSTn or SOI out of place
        if pos + 2 > n:
            return None
        length = int.from_bytes(data[pos : pos + 2], "big")
        end = pos + length
        if length < 2 or end > n:
            return None
        body = data[pos + 2 : end]
        segment = bytes((0xFF, code)) + data[pos:end]
        pos = end
        if code == _APP0:
            if not jfif and not frame and len(body) >= 14 and body.startswith(b"JFIF\x00"):
                out.append(_jfif(body))
                jfif = True
            continue  # JFXX (a thumbnail) and other APP0s
        if code == _APP14:
            return None  # Adobe: its colour transform decides how to read the pixels
        if 0xE1 <= code <= 0xEF or code == _COM:
            continue  # EXIF, XMP, ICC (re-added below), MPF, IPTC, ..., comments
        if code in _FRAMES:
            if frame or len(body) < 6 or body[0] != 8 or body[5] not in (1, 3):
                return None  # a second frame, not 8-bit, not grey or YCbCr
            frame = True
            if icc_profile:
                out.extend(_icc_segments(icc_profile))
            out.append(segment)
            continue
        if code in _TABLES:
            out.append(segment)
            continue
        if code != _SOS or not frame:
            return None  # SOF3/5-15 (lossless, hierarchical, arithmetic), DNL, DHP, EXP, JPGn
        out.append(segment)
        found = _MARKER_IN_SCAN.search(data, pos)
        if found is None:
            return None  # the scan runs to the end of the bytes: truncated
        out.append(data[pos : found.start()])
        pos = found.start()
        scans += 1


# --- PNG --------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Critical chunks, and the ancillary ones that change how the pixels look. Dropped: text
# (tEXt, zTXt, iTXt), eXIf, tIME and every other ancillary chunk.
_PNG_KEEP = frozenset(
    {
        *(b"IHDR", b"PLTE", b"IDAT", b"IEND"),
        *(b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"pHYs", b"bKGD"),
    }
)
_APNG = frozenset({b"acTL", b"fcTL", b"fdAT"})


def strip_png(data: bytes, keep_icc: bool = False) -> tuple[bytes, bytes | None] | None:
    """``data`` with only the chunks of ``_PNG_KEEP`` (and ``iCCP`` if ``keep_icc``),
    every chunk's CRC checked, nothing after IEND; and the payload of its ``eXIf`` chunk
    (left out: the caller reads the orientation from it), wherever it was. ``None`` for
    an animated PNG, an unknown critical chunk, a bad length or CRC, no IDAT or no IEND."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    out = [PNG_SIGNATURE]
    exif: bytes | None = None
    seen: set[bytes] = set()
    n = len(data)
    pos = len(PNG_SIGNATURE)
    view = memoryview(data)
    while True:
        if pos + 12 > n:
            return None
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n or (pos == len(PNG_SIGNATURE)) != (kind == b"IHDR"):
            return None
        if zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            return None
        if kind in _APNG:
            return None
        if kind in _PNG_KEEP or (keep_icc and kind == b"iCCP"):
            out.append(data[pos:end])
        elif kind == b"eXIf":
            exif = data[pos + 8 : end - 4]
        elif not kind[0] & 0x20:
            return None  # an unknown critical chunk
        pos = end
        if kind == b"IEND":
            # No pixels at all is broken too (nothing decodes them at upload any more).
            return (b"".join(out), exif) if b"IDAT" in seen else None
        seen.add(kind)
