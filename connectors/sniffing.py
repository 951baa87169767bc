"""What a file is, from its bytes alone (never its name or declared type)."""

from __future__ import annotations

import filetype


def sniff(data: bytes) -> str:
    """The MIME type of ``data`` from its bytes alone."""
    guessed = str(filetype.guess_mime(data) or "")
    if guessed:
        return {"audio/x-flac": "audio/flac", "audio/m4a": "audio/mp4"}.get(guessed, guessed)
    head = data[:2048]
    try:
        text = head.decode("utf-8") if b"\x00" not in head else None
    except UnicodeDecodeError as exc:  # a multi-byte character cut at 2048 is still text
        text = head[: exc.start].decode("utf-8") if exc.start > len(head) - 4 else None
    if text is None:
        return "application/octet-stream"
    lowered = text.lstrip("\ufeff \t\r\n").lower()
    if lowered.startswith("<svg") or (lowered.startswith("<?xml") and "<svg" in lowered):
        return "image/svg+xml"
    if lowered.startswith(("<!doctype html", "<html", "<script", "<body", "<head")):
        return "text/html"
    return "text/plain"
