"""/login and /admin in headless Chromium (Debian's chromium through Playwright), in
Chinese and in English, on the real stack: an admin signs in, gets a field error from
the invite form, invites an agent (the one-time password is shown), and the agent is
in a worker's configuration without a restart; the channels page shows the callback
URL to paste. Keeps docs/login-zh.png, docs/admin-zh.png, docs/admin-en.png.

Tenant "admui" (tests/conftest.py): its admin key sets the scene."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kefu.settings import Settings
from tests.browser import launch
from tests.conftest import wait_for
from tests.test_accounts import base
from tests.test_admin_config import worker_entity

TENANT = "admui"
ADMIN = {"X-Admin-Key": "admui-admin-key"}
DOCS = Path(__file__).parent.parent / "docs"

WORDS = {
    "zh": {
        "locale": "zh-CN",
        "title": "登录",
        "submit": "登录",
        "agents": "客服",
        "channels": "渠道",
        "invite": "邀请",
        "name": "王小明",
        "once": "一次性密码",
        "callback": "回调地址",
        "wrong": "邮箱或密码错误",
        "webchat": "网页聊天",
        "ai": "AI 设置",
        "topic": "退货",
        "fix": "请修正标出的字段。",
    },
    "en": {
        "locale": "en-US",
        "title": "Sign in",
        "submit": "Sign in",
        "agents": "Agents",
        "channels": "Channels",
        "invite": "Invite",
        "name": "Mary Smith",
        "once": "One-time password",
        "callback": "Callback URL",
        "wrong": "Wrong email or password",
        "webchat": "Web chat",
        "ai": "AI",
        "topic": "Returns",
        "fix": "Please fix the marked fields.",
    },
}


@pytest.fixture(scope="module")
def scene(pipeline: Settings) -> dict[str, str]:
    """Teams, agents, canned responses and a FAQ entry of the tenant; an admin account."""
    with httpx.Client(base_url=base(pipeline), timeout=30) as http:

        def put(kind: str, entity_id: str, data: dict[str, Any]) -> None:
            url = f"/v1/admin/config/{kind}/{entity_id}"
            current = http.get(url, headers=ADMIN)
            version = current.json()["version"] if current.status_code == 200 else 0
            got = http.put(url, json={"version": version, "data": data}, headers=ADMIN)
            assert got.status_code == 200, got.text

        put("team", "support", {"name": "售后 Support"})
        put("team", "sales", {"name": "售前 Sales"})
        put("agent", "li", {"name": "李娜", "teams": ["support"], "capacity": 5})
        put("agent", "tom", {"name": "Tom", "teams": ["sales"], "disabled": True})
        put("canned", "hello", {"title": "问候", "text": "您好，请问有什么可以帮您？"})
        put("channel", "telegram", {"bot_token": "1234:abcdefghijklmn", "secret_token": "s"})
        admin = f"boss-{uuid.uuid4().hex[:6]}"
        email = f"{admin}@admui.example"
        invited = http.post(
            f"/v1/admin/config/agent/{admin}/invite",
            json={"name": "Boss", "email": email, "role": "admin", "teams": ["support"]},
            headers=ADMIN,
        )
        assert invited.status_code == 201, invited.text
        return {"email": email, "password": invited.json()["password"]}


def data_of(pipeline: Settings, kind: str, entity_id: str) -> dict[str, Any]:
    """The entity's data as a worker holds it now ({} when it has none)."""
    entity = worker_entity(pipeline, TENANT, kind, entity_id)
    return dict(entity["data"]) if entity else {}


@pytest.fixture
def browser() -> Iterator[Any]:
    import playwright.sync_api as sync_api

    with sync_api.sync_playwright() as p:
        chromium = launch(p)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.mark.parametrize("language", ["zh", "en"])
def test_admin_pages_in_chromium(
    pipeline: Settings, scene: dict[str, str], browser: Any, language: str, tmp_path: Path
) -> None:
    words = WORDS[language]
    errors: list[str] = []
    context = browser.new_context(locale=words["locale"], viewport={"width": 1280, "height": 820})
    try:
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        # /admin without a session goes to the sign-in page, in the browser's language.
        page.goto(f"{base(pipeline)}/admin")
        page.wait_for_url("**/login?next=*")
        assert page.locator("h1").inner_text() == words["title"]
        assert page.get_attribute("html", "lang") == ("zh-CN" if language == "zh" else "en")
        page.fill("#tenant", TENANT)
        page.fill("#email", scene["email"])
        page.fill("#password", "not the password")
        page.click("#submit")
        page.wait_for_selector(f"#form-error:has-text('{words['wrong']}')")
        if language == "zh":
            page.screenshot(path=str(DOCS / "login-zh.png"))
        page.fill("#password", scene["password"])
        page.click("#submit")
        page.wait_for_url("**/admin*")
        page.wait_for_selector("table td:has-text('李娜')")
        assert page.locator("nav button[aria-current=page]").inner_text() == words["agents"]

        # The invite form: a bad email is an error beside its field, nothing is sent.
        agent = f"new-{language}-{uuid.uuid4().hex[:4]}"
        form = page.locator("form[aria-labelledby=invite-title]")
        form.locator("input[name=id]").fill(agent)
        form.locator("input[name=name]").fill(words["name"])
        form.locator("input[name=email]").fill("not-an-email")
        form.locator("button[type=submit]").click()
        email_input = form.locator("input[name=email]")
        page.wait_for_function(
            "el => el.getAttribute('aria-invalid') === 'true'", arg=email_input.element_handle()
        )
        described = (email_input.get_attribute("aria-describedby") or "").split()[0]
        assert "email" in page.locator(f"#{described}").inner_text()
        assert worker_entity(pipeline, TENANT, "agent", agent) is None
        email_input.fill(f"{agent}@admui.example")
        form.locator("button[type=submit]").click()
        page.wait_for_selector(f".once:has-text('{words['once']}')")
        password = page.locator(".once code").inner_text()
        assert len(password) >= 12
        # Live in a worker: no restart.
        wait_for(
            lambda: worker_entity(pipeline, TENANT, "agent", agent),
            5,
            "the invited agent in the worker's configuration",
        )
        page.wait_for_selector(f"table td:has-text('{agent}')")
        page.screenshot(path=str(DOCS / f"admin-{language}.png"), full_page=True)

        # Channels: the callback URL to paste, secrets only "set".
        page.click(f"nav button:has-text('{words['channels']}')")
        page.wait_for_selector(f"label:has-text('{words['callback']}')")
        page.screenshot(path=str(tmp_path / f"channels-{language}.png"), full_page=True)
        urls = page.locator(".copy input").evaluate_all("els => els.map(e => e.value)")
        assert f"{base(pipeline)}/v1/telegram/{TENANT}/webhook" in " ".join(urls)
        assert "1234:abcdefghijklmn" not in page.content()

        def redrawn(selector: str, value: str) -> None:
            """The section drawn again after the save, with the saved value in it."""
            page.wait_for_function(
                "([s, v]) => (document.querySelector(s)?.value || '').includes(v)",
                arg=[selector, value],
            )

        # The email channel: inbound addresses and the From of replies, live.
        mail = page.locator("section[aria-labelledby=ch-email] form")
        mail.locator("textarea[name=addresses]").fill(
            f"Help@{TENANT}.example\nsales@{TENANT}.example"
        )
        mail.locator("input[name=from_address]").fill("not-an-address")
        mail.locator("button[type=submit]").click()
        page.wait_for_selector(
            f"section[aria-labelledby=ch-email] .form-status:has-text('{words['fix']}')"
        )
        assert mail.locator("input[name=from_address]").get_attribute("aria-invalid") == "true"
        mail.locator("input[name=from_address]").fill(f"reply@{TENANT}.example")
        mail.locator("button[type=submit]").click()
        wait_for(
            lambda: (
                data_of(pipeline, "channel", "email").get("from_address")
                == f"reply@{TENANT}.example"
            ),
            5,
            "the email channel in the worker's configuration",
        )
        saved = data_of(pipeline, "channel", "email")
        assert saved["addresses"] == [f"help@{TENANT}.example", f"sales@{TENANT}.example"]
        redrawn("section[aria-labelledby=ch-email] textarea[name=addresses]", "help@")
        page.evaluate("document.getElementById('toast').style.display = 'none'")
        page.locator("section[aria-labelledby=ch-email]").screenshot(
            path=str(DOCS / f"admin-email-{language}.png")
        )

        # Web chat: the team its chats go to, and pre-chat topics mapped to teams.
        page.click("nav button[data-section=webchat]")
        page.wait_for_selector(
            f"nav button[data-section=webchat][aria-current=page]:has-text('{words['webchat']}')"
        )
        web = page.locator("#main form")
        web.locator("select[name=team]").select_option("sales")
        web.locator("input[name=prechat]").check()
        topics = web.locator("textarea[name=topics]")
        topics.fill("returns | 退货 | Returns | nosuchteam")
        web.locator("button[type=submit]").click()
        page.wait_for_function(
            "el => el.getAttribute('aria-invalid') === 'true'", arg=topics.element_handle()
        )
        topics.fill("returns | 退货 | Returns | support\norders | 订单 | Orders | sales")
        web.locator("button[type=submit]").click()
        wait_for(
            lambda: len(data_of(pipeline, "widget", "-").get("topics", [])) == 2,
            5,
            "the web chat settings in the worker's configuration",
        )
        widget = data_of(pipeline, "widget", "-")
        assert widget["team"] == "sales" and widget["prechat"] is True
        assert widget["topics"][0] == {
            "id": "returns",
            "label": {"zh": "退货", "en": "Returns"},
            "team": "support",
        }
        redrawn("#main textarea[name=topics]", words["topic"])
        page.screenshot(path=str(DOCS / f"admin-webchat-{language}.png"), full_page=True)

        # AI: model and minimum confidence (live in the workers' responder).
        page.click("nav button[data-section=ai]")
        page.wait_for_selector(
            f"nav button[data-section=ai][aria-current=page]:has-text('{words['ai']}')"
        )
        ai = page.locator("#main form")
        ai.locator("input[name=min_confidence]").fill("1.5")
        ai.locator("button[type=submit]").click()
        page.wait_for_function(
            "el => el.getAttribute('aria-invalid') === 'true'",
            arg=ai.locator("input[name=min_confidence]").element_handle(),
        )
        ai.locator("input[name=model]").fill(f"qwen-plus-{language}")
        ai.locator("input[name=min_confidence]").fill("0.85")
        ai.locator("textarea[name=system_prompt]").fill("你是小鹿商城的客服，回答简洁。")
        ai.locator("button[type=submit]").click()
        wait_for(
            lambda: data_of(pipeline, "ai", "-").get("model") == f"qwen-plus-{language}",
            5,
            "the AI settings in the worker's configuration",
        )
        assert data_of(pipeline, "ai", "-")["min_confidence"] == 0.85
        redrawn("#main input[name=model]", "qwen-plus")
        page.screenshot(path=str(DOCS / f"admin-ai-{language}.png"), full_page=True)

        # Every section draws without an error (kept in the test's tmp dir to look at).
        for section in ("teams", "keys", "webhook", "wordlists", "faq", "canned", "hours"):
            page.click(f"nav button[data-section={section}]")
            page.wait_for_selector(f"nav button[data-section={section}][aria-current=page]")
            page.wait_for_selector("#main .card")
            assert page.locator("#main [role=alert].bad").count() == 0, section
            page.screenshot(path=str(tmp_path / f"{section}-{language}.png"), full_page=True)
        page.click("nav button[data-section=channels]")

        # The switch: the other language, then sign out.
        page.click("#lang")
        other = WORDS["en" if language == "zh" else "zh"]
        page.wait_for_selector(f"nav button[aria-current=page]:has-text('{other['channels']}')")
        page.click("#logout")
        page.wait_for_url("**/login")
        assert errors == [], errors
    finally:
        context.close()
