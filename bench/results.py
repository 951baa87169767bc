"""Appending a row to a section of bench/RESULTS.md (the benches' ``--record``)."""

from __future__ import annotations

from pathlib import Path


def append_row(results: Path, section: str, header: str, row: str) -> None:
    """``row`` after the last table row of ``section``; the section (``header``, which
    starts with it) is added at the end of the file the first time."""
    text = results.read_text("utf-8")
    if section not in text:
        results.write_text(text.rstrip("\n") + "\n\n" + header + row + "\n", "utf-8")
        return
    lines = text.split("\n")
    start = lines.index(section)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    last = max(i for i in range(start, end) if lines[i].startswith("|"))
    lines.insert(last + 1, row)
    results.write_text("\n".join(lines), "utf-8")
