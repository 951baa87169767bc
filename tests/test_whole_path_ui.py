"""Issue 18's whole path in headless Chromium, on the real stack, once in Chinese (zh-CN)
and once in English (en-US), each in one browser with a context per person:

1. the tenant's admin signs in at /login and, through /admin's forms, creates a team,
   invites an agent into it (the one-time password is shown) and adds a canned response;
2. the new agent signs in at /login with that password, lands in /console (session
   cookie) and goes online;
3. a customer opens a shop's page with the widget's one script tag and writes;
4. the conversation reaches the new agent (the default team's line, where web chats
   arrive: web chats are routed to ``<tenant>:default``, so the agent is in that team and
   the new one); the agent types ``/``, picks the canned response, sends it and adds an
   internal note;
5. the customer sees the canned reply and never the note (page text and every socket
   frame); the agent closes; the customer rates 5 stars in the chat;
6. on the log: ``NoteAdded`` by the agent, ``CsatRated`` 5 for the conversation.

Keeps docs/path-{admin,console,widget}-{zh,en}.png.

Tenant "path" (tests/conftest.py): human-only, no agents seeded; its admin key only
creates the admin's account, as an operator would hand one over.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.identity import conversation_id_for
from kefu.settings import Settings
from schemas.records import CsatRated, MessageReceived, NoteAdded
from tests.browser import launch
from tests.conftest import wait_for
from tests.test_accounts import base
from tests.test_routing import events_of

TENANT = "path"
ADMIN_KEY = {"X-Admin-Key": "path-admin-key"}
DOCS = Path(__file__).parent.parent / "docs"
TIMEOUT = 60_000  # ms: a condition in the browser

WORDS: dict[str, dict[str, str]] = {
    "zh": {
        "locale": "zh-CN",
        "lang": "zh-CN",
        "shop": "小鹿商城",
        "team": "售后一组",
        "agent": "陈晓梅",
        "customer_text": "你好，我买的蓝牙耳机左耳没有声音，可以换货吗？",
        "canned_title": "换货流程",
        "canned_text": (
            "您好，很抱歉给您带来不便。请在订单页点击「申请售后」并选择换货，"
            "我们收到耳机后 48 小时内为您寄出新的。"
        ),
        "note": "客户在保修期内，已核实订单，可直接换货（内部备注）",
        "rated": "感谢您的评价（5 星）！",
        "closed": "本次对话已结束",
    },
    "en": {
        "locale": "en-US",
        "lang": "en",
        "shop": "Deer Shop",
        "team": "After-sales",
        "agent": "Amy Chen",
        "customer_text": "Hi, my left earbud makes no sound. Can I exchange the headphones?",
        "canned_title": "Exchange",
        "canned_text": (
            "Sorry about that! Open your order, choose Return or exchange, then Exchange: "
            "we ship the new pair within 48 hours of receiving yours."
        ),
        "note": "Within warranty, order checked: exchange approved (internal note)",
        "rated": "Thank you for your rating (5 of 5)!",
        "closed": "This conversation has ended.",
    },
}


@pytest.fixture(scope="module")
def admin(pipeline: Settings) -> dict[str, str]:
    """The tenant's first administrator, as test_admin_ui makes one: invited with the
    tenant's admin key; they get a one-time password."""
    who = f"boss-{uuid.uuid4().hex[:6]}"
    email = f"{who}@path.example"
    with httpx.Client(base_url=base(pipeline), timeout=30) as http:
        invited = http.post(
            f"/v1/admin/config/agent/{who}/invite",
            json={"name": "店长 Boss", "email": email, "role": "admin", "teams": ["default"]},
            headers=ADMIN_KEY,
        )
    assert invited.status_code == 201, invited.text
    return {"email": email, "password": invited.json()["password"]}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    import playwright.sync_api as sync_api

    with sync_api.sync_playwright() as p:
        chromium = launch(p)
        try:
            yield chromium
        finally:
            chromium.close()


def chat_settings(pipeline: Settings) -> dict[str, Any]:
    with httpx.Client(base_url=base(pipeline), timeout=10) as http:
        got = http.get("/v1/chat/settings", params={"tenant": TENANT})
    assert got.status_code == 200, got.text
    body: dict[str, Any] = got.json()
    return body


def watch(page: Any, errors: list[str]) -> Any:
    page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}"))
    return page


def sign_in(page: Any, pipeline: Settings, email: str, password: str) -> None:
    page.goto(f"{base(pipeline)}/login")
    page.fill("#tenant", TENANT)
    page.fill("#email", email)
    page.fill("#password", password)
    page.click("#submit")


def section(page: Any, name: str) -> Any:
    """Opens an /admin section; returns its (only) edit form."""
    page.click(f"nav button[data-section={name}]")
    page.wait_for_selector(f"nav button[data-section={name}][aria-current=page]")
    page.wait_for_selector("#main .card form")
    return page.locator("#main form").last


def in_log(pipeline: Settings, conversation: str, kind: type[Any]) -> list[Any]:
    # In a thread: Playwright's sync API holds this thread's event loop.
    with ThreadPoolExecutor(1) as thread:
        found: list[Any] = thread.submit(events_of, pipeline, conversation, kind).result()
    return found


@pytest.mark.parametrize("language", ["zh", "en"])
def test_whole_path_in_chromium(
    pipeline: Settings, admin: dict[str, str], browser: Any, language: str
) -> None:
    words = WORDS[language]
    suffix = f"{language}-{uuid.uuid4().hex[:4]}"
    team, agent, canned = f"aftersales-{suffix}", f"agent-{suffix}", f"exchange-{suffix}"
    agent_email = f"{agent}@path.example"
    customer = f"buyer-{suffix}"
    conversation = conversation_id_for(TENANT, "web", customer)
    url = base(pipeline)
    errors: list[str] = []
    viewport = {"width": 1280, "height": 820}
    DOCS.mkdir(exist_ok=True)

    # 1. The admin: a team, an agent in it, a canned response, all through /admin's forms.
    boss = browser.new_context(locale=words["locale"], viewport=viewport)
    try:
        page = watch(boss.new_page(), errors)
        sign_in(page, pipeline, admin["email"], admin["password"])
        page.wait_for_url("**/admin*")
        page.wait_for_selector("nav button[data-section=agents][aria-current=page]")
        assert page.get_attribute("html", "lang") == words["lang"]

        form = section(page, "teams")
        form.locator("input[name=id]").fill(team)
        form.locator("input[name=name]").fill(words["team"])
        form.locator("button[type=submit]").click()
        page.wait_for_selector(f"#main table td:text-is('{team}')", timeout=TIMEOUT)

        section(page, "agents")
        form = page.locator("form[aria-labelledby=invite-title]")
        form.locator("input[name=id]").fill(agent)
        form.locator("input[name=name]").fill(words["agent"])
        form.locator("input[name=email]").fill(agent_email)
        # Web chats wait in the default team's line: the agent takes them, and is in
        # the new team too.
        form.locator("input[name=teams]").fill(f"default, {team}")
        form.locator("button[type=submit]").click()
        page.wait_for_selector(f"#once-box .once:has-text('{agent}') code", timeout=TIMEOUT)
        password = page.locator("#once-box .once code").inner_text()
        assert len(password) >= 12
        row = page.locator("#main table tr", has=page.locator(f"td:text-is('{agent}')"))
        assert f"default, {team}" in row.inner_text()
        page.screenshot(path=str(DOCS / f"path-admin-{language}.png"), full_page=True)

        form = section(page, "canned")
        form.locator("input[name=id]").fill(canned)
        form.locator("input[name=title]").fill(words["canned_title"])
        form.locator("input[name=shortcut]").fill(f"ex{language}")
        form.locator("textarea[name=text]").fill(words["canned_text"])
        form.locator("button[type=submit]").click()
        page.wait_for_selector(f"#main table td:text-is('{canned}')", timeout=TIMEOUT)
    finally:
        boss.close()

    # 2. The agent signs in with the one-time password and goes online.
    desk = browser.new_context(locale=words["locale"], viewport={"width": 1440, "height": 860})
    shop = browser.new_context(locale=words["locale"], viewport=viewport)
    try:
        console = watch(desk.new_page(), errors)
        sign_in(console, pipeline, agent_email, password)
        console.wait_for_url("**/console*")
        console.wait_for_selector("body[data-state=ready]", timeout=TIMEOUT)
        assert console.get_attribute("body", "data-via") == "session"
        assert console.get_attribute("html", "lang") == words["lang"]
        console.click("button[data-presence=online]")
        console.wait_for_selector("body[data-presence=online]", timeout=TIMEOUT)
        wait_for(lambda: chat_settings(pipeline)["available"], 30, "the agent available")

        # 3. A customer on a shop's page with the one script tag.
        host = watch(shop.new_page(), errors)
        frames: list[str] = []  # every frame the customer's page receives on a socket
        host.on(
            "websocket",
            lambda ws: ws.on("framereceived", lambda payload: frames.append(str(payload))),
        )
        host.set_content(
            f"<html><head><title>{words['shop']}</title></head>"
            "<body style='font-family:sans-serif;background:#fafafa'>"
            f"<h1 style='margin:2rem'>{words['shop']}</h1>"
            f'<script src="{url}/widget.js" data-tenant="{TENANT}" '
            f'data-customer="{customer}"></script></body></html>'
        )
        host.locator("#kefu-widget-button").click()
        chat = host.frame_locator("#kefu-widget-frame")
        chat.locator("body[data-connected=true]").wait_for(timeout=TIMEOUT)
        assert chat.locator("html").get_attribute("lang") == words["lang"]
        chat.locator("#text").fill(words["customer_text"])
        chat.locator("#send-btn").click()
        chat.locator("#log p.customer .mark[data-state=delivered]").wait_for(timeout=TIMEOUT)

        # 4. It reaches the new agent, who answers with the canned response and a note.
        row = f'#assigned li[data-conversation-id="{conversation}"]'
        console.wait_for_selector(row, timeout=TIMEOUT)
        console.click(row)
        console.wait_for_selector(
            f"#messages .msg.customer:has-text('{words['customer_text']}')", timeout=TIMEOUT
        )
        console.focus("#reply-text")
        console.keyboard.type("/")
        option = console.locator(f'#canned li[role=option][data-canned-id="{canned}"]')
        option.wait_for(timeout=TIMEOUT)
        assert words["canned_title"] in option.inner_text()
        option.click()
        assert console.input_value("#reply-text") == words["canned_text"]
        assert console.is_hidden("#canned")
        console.keyboard.press("Enter")
        console.locator("#messages .msg.agent", has_text=words["canned_text"]).wait_for(
            timeout=TIMEOUT
        )
        console.click("#mode-note")
        console.wait_for_selector("body[data-mode=note]")
        console.fill("#reply-text", words["note"])
        console.keyboard.press("Enter")
        console.locator("#messages .msg.note", has_text=words["note"]).wait_for(timeout=TIMEOUT)
        console.click("#mode-reply")
        console.wait_for_selector("body[data-mode=reply]")

        # 5. The customer has the canned reply, with the agent's name; never the note.
        reply = chat.locator("#log p.agent", has_text=words["canned_text"])
        reply.wait_for(timeout=TIMEOUT)
        assert reply.locator(".who").inner_text() == words["agent"]
        # The picture without the new-conversation toast over the customer's profile.
        console.wait_for_function("document.getElementById('toast').style.display === 'none'")
        console.screenshot(path=str(DOCS / f"path-console-{language}.png"))

        console.click("#close-btn")
        console.wait_for_selector(row, state="detached", timeout=TIMEOUT)
        chat.locator("#log .csat").wait_for(timeout=TIMEOUT)
        assert words["closed"] in (chat.locator("#log").text_content() or "")
        chat.locator(".stars button[data-rating='5']").click()
        assert chat.locator(".stars button[aria-pressed=true]").get_attribute("data-rating") == "5"
        chat.locator("#csat-submit").click()
        chat.locator(".csat .done").wait_for(timeout=TIMEOUT)
        assert chat.locator(".csat .done").text_content() == words["rated"]
        host.screenshot(path=str(DOCS / f"path-widget-{language}.png"))

        shown = chat.locator("body").inner_text()
        assert words["canned_text"] in shown and words["note"] not in shown
        assert any(words["canned_text"] in f for f in frames), "the reply came by the socket"
        assert all(words["note"] not in f for f in frames)

        console.click("button[data-presence=offline]")
        console.wait_for_selector("body[data-presence=offline]", timeout=TIMEOUT)
    finally:
        shop.close()
        desk.close()

    # 6. On the log: the customer's words, the note as an event of its own, the rating.
    (received,) = in_log(pipeline, conversation, MessageReceived)
    assert received.text == words["customer_text"]
    notes = in_log(pipeline, conversation, NoteAdded)
    assert [(n.author, n.text) for n in notes] == [(agent, words["note"])]
    (csat,) = in_log(pipeline, conversation, CsatRated)
    assert (csat.rating, csat.assignee) == (5, agent)
    assert errors == [], errors
