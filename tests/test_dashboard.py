"""The gateway's /dashboard in headless Chromium (Debian's, through Playwright; no
browser download): it loads, draws non-empty charts after traffic, logs no console
error. Its data endpoints are tenant-scoped by API key. Keeps docs/dashboard.png."""

from __future__ import annotations

import io
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from kefu.settings import Settings
from projections.clickhouse_query import AnalyticsClient
from tests.browser import launch
from tests.conftest import wait_for

SCREENSHOT = Path(__file__).parent.parent / "docs" / "dashboard.png"


def base(settings: Settings) -> str:
    return f"http://{settings.gateway.host}:{settings.gateway.port}"


def key(settings: Settings, tenant: str) -> str:
    return settings.tenants[tenant].api_key.get_secret_value()


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (59, 111, 216)).save(out, "PNG")
    return out.getvalue()


def traffic(settings: Settings) -> None:
    """A few demo conversations through the REST API, one with a moderated word, one
    with an uploaded image; wait until ClickHouse has their replies."""
    marker = uuid.uuid4().hex[:8]
    texts = ["Where is my order?", "How do I get a refund?", "you stupid bot, where is it?"]
    auth = {"Authorization": f"Bearer {key(settings, 'demo')}"}
    with httpx.Client(base_url=base(settings), timeout=10, headers=auth) as http:
        for n, text in enumerate(texts):
            customer = f"dash-{marker}-{n}"
            attachments = []
            if n == 0:
                upload = http.post(
                    "/v1/uploads",
                    data={"customer_id": customer},
                    files={"file": ("parcel.png", png(), "image/png")},
                )
                assert upload.status_code == 201, upload.text
                attachments = [upload.json()["attachment_id"]]
            response = http.post(
                "/v1/messages",
                json={"customer_id": customer, "text": text, "attachments": attachments},
            )
            assert response.status_code == 202, response.text
    client = AnalyticsClient(settings.clickhouse_url, settings.clickhouse.query_port)
    sql = (
        "SELECT count() FROM kefu.events FINAL WHERE tenant_id = 'demo' "
        f"AND type = 'ReplyProduced' AND JSONExtractString(payload, 'customer_id') LIKE "
        f"'dash-{marker}-%'"
    )
    wait_for(lambda: client.query(sql).rows[0][0] == len(texts), timeout=60, what="replies")


def test_data_endpoints_are_tenant_scoped(pipeline: Settings) -> None:
    with httpx.Client(base_url=base(pipeline), timeout=30) as http:
        assert http.get("/v1/dashboard/reports").status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert http.get("/v1/dashboard/reports/csat", headers=bad).status_code == 401
        acme = {"Authorization": f"Bearer {key(pipeline, 'acme')}"}
        catalogue = http.get("/v1/dashboard/reports", headers=acme).json()
        assert catalogue["tenant"] == "acme"
        assert {r["name"] for r in catalogue["reports"]} >= {"volume-minute", "csat"}
        assert http.get("/v1/dashboard/reports/nope", headers=acme).status_code == 404
        window = http.get("/v1/dashboard/reports/csat?since=10&until=5", headers=acme)
        assert window.status_code == 400
        csat = http.get("/v1/dashboard/reports/csat", headers=acme)
        assert csat.status_code == 200 and set(csat.json()) >= {"columns", "rows"}


def test_dashboard_in_headless_chromium(pipeline: Settings) -> None:
    import playwright.sync_api as sync_api

    traffic(pipeline)

    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1400}, locale="en-US")

            def on_console(message: Any) -> None:
                if message.type == "error":
                    errors.append(message.text)

            page.on("console", on_console)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            response = page.goto(f"{base(pipeline)}/dashboard")
            assert response is not None and response.ok
            assert page.title() == "kefu analytics"
            page.fill("#key", key(pipeline, "demo"))
            page.click("#load")
            page.wait_for_selector("body[data-loaded=true]", timeout=60_000)

            charts = page.eval_on_selector_all(
                "section[data-report]",
                "els => els.map(e => [e.dataset.report, Number(e.dataset.rows),"
                " e.querySelectorAll('.mark').length])",
            )
            by_name = {name: (rows, marks) for name, rows, marks in charts}
            assert len(by_name) == 10
            for name in ("volume-minute", "first-response", "moderation", "attachments"):
                rows, marks = by_name[name]
                assert rows > 0 and marks > 0, (name, rows, marks)
            # The attachments bars count; their bytes are in the tooltip (notes).
            # Other tests of the session upload other kinds too: the image row is one of them.
            tips = page.eval_on_selector_all(
                "section[data-report=attachments] .mark title", "els => els.map(e => e.textContent)"
            )
            image = r"in api image attachments: [\d,]+, bytes: [\d,]+"
            assert any(re.match(image, tip or "") for tip in tips), tips
            status = page.text_content("#status") or ""
            assert status.startswith("tenant demo:"), status
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # Chinese where the browser asks for it; the switch goes back and forth.
            zh = browser.new_page(viewport={"width": 1440, "height": 1400}, locale="zh-CN")
            zh.on("console", on_console)
            zh.on("pageerror", lambda exc: errors.append(str(exc)))
            zh.goto(f"{base(pipeline)}/dashboard")
            assert zh.title() == "kefu 数据分析"
            assert zh.get_attribute("html", "lang") == "zh-CN"
            zh.fill("#key", key(pipeline, "demo"))
            zh.click("#load")
            zh.wait_for_selector("body[data-loaded=true]", timeout=60_000)
            assert (zh.text_content("#status") or "").startswith("租户 demo")
            assert zh.text_content("section[data-report=csat] h2") == "满意度分布"
            zh.screenshot(path=str(SCREENSHOT.with_name("dashboard-zh.png")), full_page=True)
            zh.click("#lang")
            assert zh.title() == "kefu analytics"
            zh.wait_for_function(
                "document.querySelector('section[data-report=csat] h2')"
                ".textContent === 'CSAT distribution'"
            )
        finally:
            browser.close()
    assert errors == []
