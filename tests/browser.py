"""Headless Chromium for the page tests: Debian's ``chromium`` driven by Playwright.
``make test`` installs it (scripts/ensure-system.sh): a missing browser fails a test,
never skips it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def launch(playwright: Any) -> Any:
    """A headless browser from ``sync_playwright()`` (the caller closes it)."""
    assert Path(CHROMIUM).exists(), f"no {CHROMIUM}: run scripts/ensure-system.sh"
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
