"""``/docs`` and ``/redoc`` work without internet: Chromium loads them with every request
that leaves loopback refused, and the operations are listed (they used to be blank
pages offline: their scripts came from a CDN)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from kefu.settings import Settings
from tests.browser import launch

SHOTS = Path(__file__).resolve().parent.parent / "docs"


def _offline(page: Any, refused: list[str]) -> None:
    def route(handle: Any) -> None:
        url = handle.request.url
        if url.startswith(("http://127.0.0.1", "data:", "blob:")):
            handle.continue_()
        else:
            refused.append(url)
            handle.abort()

    page.route("**/*", route)


@pytest.mark.parametrize(
    ("path", "ready", "locale"),
    [
        ("/docs", ".opblock-summary-path", "en-US"),
        ("/redoc", "[data-section-id]", "zh-CN"),
    ],
)
def test_the_api_documentation_renders_offline(
    pipeline: Settings, path: str, ready: str, locale: str
) -> None:
    g = pipeline.gateway
    refused: list[str] = []
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(locale=locale, viewport={"width": 1280, "height": 900})
            _offline(page, refused)
            page.goto(f"http://{g.host}:{g.port}{path}")
            page.wait_for_selector(ready, timeout=30_000)
            text = page.inner_text("body")
            assert "/v1/messages" in text and "/v1/uploads" in text
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / f"api{path.replace('/', '-')}.png"))
        finally:
            browser.close()
    # ReDoc's "powered by" badge is an image on its CDN: decoration, refused and harmless.
    needed = [url for url in refused if url != "https://cdn.redoc.ly/redoc/logo-mini.svg"]
    assert needed == [], f"the page reached out: {needed}"
