"""The widget and chat page at product level (issue 18), on the real stack.

- ``GET /v1/chat/settings`` follows the configuration topic live (widget colour,
  greeting, pre-chat, business hours) and the agents' presence.
- Socket protocol 2 (``v=2``): the ack names the message's event, the "received"
  notice marks it delivered, close and CSAT reach the chat, a ``rate`` frame becomes a
  ``CsatRated`` event; the offline form's message carries the e-mail to answer to.
- Headless Chromium in zh-CN and en-US, desktop and a 390×844 phone: pre-chat form,
  names and avatars, typing, sent/delivered marks, the unread badge, rating after the
  close, the offline form, the language switch. Keeps docs/widget-zh.png,
  docs/widget-en.png, docs/widget-mobile-zh.png and docs/chat-zh.png.

Tenant "wid" (tests/conftest.py): human-only, agent "wendy" (王芳). Tests run in file
order; each leaves wendy offline and its conversations closed.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis
import websockets
from aiokafka import AIOKafkaProducer

from connectors.config_log import config_record, publish_config
from connectors.delivery import NOTICE_TYPES
from connectors.identity import conversation_id_for
from connectors.webchat import NOTICE_PREFIXES, _avatar, _offline_text, _profile, profile_key
from kefu.settings import Settings
from schemas.keys import conversation_key
from schemas.records import CsatRated, MessageReceived
from schemas.topics import TopicNames
from tests.browser import launch
from tests.conftest import wait_for
from tests.test_console import Socket, http_base, is_type, ws_base
from tests.test_routing import events_of, post, presence

TENANT, AGENT = "wid", "wendy"
DOCS = Path(__file__).parent.parent / "docs"
COLOR = "#00796b"
WIDGET: dict[str, Any] = {
    "color": COLOR,
    "greeting": {
        "zh": "您好，这里是小鹿商城客服，请问有什么可以帮您？",
        "en": "Hi, this is Deer Shop support. How can we help?",
    },
    "prechat": True,
    # The pre-chat form's topic field: each topic's chats go to its team.
    "topics": [
        {"id": "delivery", "label": {"zh": "物流查询", "en": "Delivery"}, "team": "default"},
        {
            "id": "invoice",
            "label": {"zh": "发票与付款", "en": "Invoices and payment"},
            "team": "default",
        },
    ],
    "offline_message": {
        "zh": "客服工作时间为每天 9:00-21:00。请留下邮箱和问题，我们会尽快回复。",
        "en": "Our agents are in from 9:00 to 21:00. "
        "Leave your e-mail and question and we will reply soon.",
    },
}

# ----------------------------------------------------------------------- pure


def test_profile_and_offline_text() -> None:
    assert _profile(None) == {}
    assert _profile({"name": " 李雷 ", "email": "lilei@example.cn"}) == {
        "name": "李雷",
        "email": "lilei@example.cn",
    }
    assert _profile({"name": "", "email": ""}) == {}
    assert isinstance(_profile({"email": "not an address"}), str)
    assert isinstance(_profile({"name": "x" * 101}), str)
    assert isinstance(_profile("lilei@example.cn"), str)
    zh = _offline_text("包裹丢了", {"name": "李雷", "email": "l@e.cn"}, "zh")
    assert zh == "【离线留言】请回复至邮箱：l@e.cn（李雷）\n\n包裹丢了"
    en = _offline_text("Lost parcel", {"email": "b@e.com"}, None)
    assert en.startswith("[Offline message] Please reply by e-mail to: b@e.com\n\n")


def test_avatars_are_web_links_only() -> None:
    assert _avatar("https://cdn.example/a.png") == "https://cdn.example/a.png"
    assert _avatar("/v1/files/a.png") == "/v1/files/a.png"
    for bad in ("javascript:alert(1)", "data:image/png;base64,xx", "//evil.example/a", None):
        assert _avatar(bad) == ""


def test_protocol_1_filter_matches_what_delivery_writes() -> None:
    # The gateway keeps the newer notices from protocol-1 sockets by prefix: the prefix
    # must be what connectors.delivery serialises ("type" first, default separators).
    for kind in ("received", "closed", "csat", "rated"):
        assert kind in NOTICE_TYPES.values()
        assert json.dumps({"type": kind, "conversation_id": "c"}).startswith(NOTICE_PREFIXES)
    assert not json.dumps({"type": "queue", "position": 1}).startswith(NOTICE_PREFIXES)
    assert not json.dumps({"type": "reply", "text": "received"}).startswith(NOTICE_PREFIXES)


# ------------------------------------------------------------- on the stack


def chat_settings(pipeline: Settings, tenant: str = TENANT) -> dict[str, Any]:
    with httpx.Client(base_url=http_base(pipeline), timeout=10) as http:
        got = http.get("/v1/chat/settings", params={"tenant": tenant})
    assert got.status_code == 200, got.text
    assert got.headers["access-control-allow-origin"] == "*"
    body: dict[str, Any] = got.json()
    return body


def settings_when(
    pipeline: Settings, condition: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        found = chat_settings(pipeline)
        return found if condition(found) else None

    return wait_for(probe, 30, what)


def configure(
    pipeline: Settings, kind: str, data: dict[str, Any] | None, entity: str = "-"
) -> None:
    """What an administrator's change writes: one ConfigChanged on the config topic."""

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=pipeline.kafka.servers)
        await producer.start()
        try:
            record = config_record(TENANT, kind, entity, data, "test-admin")
            await publish_config(producer, TopicNames(pipeline.topic_prefix).config, record)
        finally:
            await producer.stop()

    asyncio.run(run())


def online(pipeline: Settings, state: str) -> None:
    presence(pipeline, TENANT, AGENT, state)
    settings_when(pipeline, lambda s: s["agents_online"] == (state == "online"), f"{AGENT} {state}")


def conversation_field(pipeline: Settings, conversation: str, name: str) -> str:
    client = redis.Redis.from_url(pipeline.redis.dsn)
    try:
        value = client.hget(conversation_key(TENANT, conversation), name)
    finally:
        client.close()
    return value.decode() if isinstance(value, bytes) else ""


def field_is(pipeline: Settings, conversation: str, name: str, value: str) -> None:
    wait_for(
        lambda: conversation_field(pipeline, conversation, name) == value,
        60,
        f"{name} = {value!r} for {conversation}",
    )


def reply(pipeline: Settings, conversation: str, text: str) -> None:
    field_is(pipeline, conversation, "assignee", AGENT)
    post(
        pipeline,
        TENANT,
        f"/v1/conversations/{conversation}/replies",
        {"agent_id": AGENT, "text": text, "message_id": uuid.uuid4().hex},
    )


def close(pipeline: Settings, conversation: str) -> None:
    path = f"/v1/conversations/{conversation}/close"
    post(pipeline, TENANT, path, {"closed_by": AGENT, "reason": "resolved"})
    field_is(pipeline, conversation, "status", "closed")


def profile_of(pipeline: Settings, conversation: str) -> dict[bytes, bytes]:
    client = redis.Redis.from_url(pipeline.redis.dsn)
    try:
        return cast(dict[bytes, bytes], client.hgetall(profile_key(TENANT, conversation)))
    finally:
        client.close()


def agent_typing(pipeline: Settings, conversation: str) -> None:
    # What the console publishes when the agent types (connectors/console.py).
    client = redis.Redis.from_url(pipeline.redis.dsn)
    try:
        frame = {"type": "typing", "from": "agent", "conversation_id": conversation}
        client.publish(f"kefu:{TENANT}:out:{conversation}", json.dumps(frame))
    finally:
        client.close()


def chat_url(pipeline: Settings, customer: str, version: str = "2") -> str:
    query = f"tenant={TENANT}&customer={customer}" + (f"&v={version}" if version else "")
    return f"{ws_base(pipeline)}/v1/chat/ws?{query}"


def test_web_chats_go_to_the_widgets_team_or_the_picked_topics(pipeline: Settings) -> None:
    """The widget's ``team`` routes every web chat of the tenant; a pre-chat topic mapped
    to a team routes that chat there; a topic or team the tenant does not have falls
    back (never a queue of a team that does not exist). Live: no restart."""
    tenant = f"route{uuid.uuid4().hex[:6]}"
    widget = {
        "team": "sales",
        "prechat": True,
        "topics": [
            {"id": "invoice", "label": {"zh": "发票", "en": "Invoices"}, "team": "billing"},
            {"id": "gone", "label": {"en": "Old"}, "team": "nosuchteam"},
        ],
    }

    async def publish() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=pipeline.kafka.servers)
        await producer.start()
        topic = TopicNames(pipeline.topic_prefix).config
        try:
            for kind, entity, data in (
                ("tenant", "-", {"name": "Route", "ai_enabled": False}),
                ("team", "sales", {"name": "销售"}),
                ("team", "billing", {"name": "财务"}),
                ("widget", "-", widget),
            ):
                await publish_config(
                    producer, topic, config_record(tenant, kind, entity, data, "t")
                )
        finally:
            await producer.stop()

    asyncio.run(publish())
    with httpx.Client(base_url=http_base(pipeline), timeout=10) as http:

        def topics() -> list[dict[str, Any]] | None:
            got = http.get("/v1/chat/settings", params={"tenant": tenant})
            found: list[dict[str, Any]] = got.json().get("topics") if got.status_code == 200 else []
            return found or None

        shown = wait_for(topics, 30, "the topics in the chat settings")
    assert shown[0] == {"id": "invoice", "label": {"zh": "发票", "en": "Invoices"}}
    assert "team" not in shown[0]  # the teams stay server-side

    async def start(customer: str, profile: dict[str, str] | None) -> str:
        url = f"{ws_base(pipeline)}/v1/chat/ws?tenant={tenant}&customer={customer}&v=2"
        async with websockets.connect(url) as socket:
            assert json.loads(await socket.recv())["type"] == "history"
            frame: dict[str, Any] = {"type": "message", "id": "m1", "text": "你好"}
            if profile:
                frame["profile"] = profile
            await socket.send(json.dumps(frame))
            while (got := json.loads(await asyncio.wait_for(socket.recv(), 30)))["type"] != "ack":
                pass
            return str(got["conversation_id"])

    def queue_of(conversation: str) -> str | None:
        client = redis.Redis.from_url(pipeline.redis.dsn)
        try:
            value = client.hget(conversation_key(tenant, conversation), "queue")
        finally:
            client.close()
        return value.decode() if isinstance(value, bytes) and value else None

    person = {"name": "李雷", "email": "lilei@example.cn"}
    plain = asyncio.run(start("c-plain", None))
    picked = asyncio.run(start("c-invoice", {**person, "topic": "invoice"}))
    stale = asyncio.run(start("c-gone", {**person, "topic": "gone"}))
    unknown = asyncio.run(start("c-unknown", {**person, "topic": "nope"}))
    assert wait_for(lambda: queue_of(plain), 60, "the plain chat routed") == f"{tenant}:sales"
    assert wait_for(lambda: queue_of(picked), 60, "the topic's chat") == f"{tenant}:billing"
    assert wait_for(lambda: queue_of(stale), 60, "the stale topic") == f"{tenant}:sales"
    assert wait_for(lambda: queue_of(unknown), 60, "the unknown topic") == f"{tenant}:sales"


def test_settings_follow_the_configuration_and_presence_live(pipeline: Settings) -> None:
    first = chat_settings(pipeline)
    assert first["agents"] == {AGENT: {"name": "王芳", "avatar": ""}}
    assert first["ai"] is False and first["open_now"] is True
    assert first["prechat"] is False and first["color"] == "#1565c0"
    assert set(first) >= {"greeting", "offline_message", "available", "agents_online"}
    assert chat_settings(pipeline, "demo")["ai"] is True
    with httpx.Client(base_url=http_base(pipeline), timeout=10) as http:
        assert http.get("/v1/chat/settings", params={"tenant": "nope"}).status_code == 404

    configure(pipeline, "widget", WIDGET)
    # The seeded agent (kefu/config.py) with an avatar no page may load.
    seeded = {"name": "王芳", "role": "agent", "teams": ["default"], "skills": [], "capacity": 2}
    agent = {**seeded, "disabled": False, "avatar": "javascript:alert(1)"}
    configure(pipeline, "agent", agent, AGENT)
    live = settings_when(pipeline, lambda s: s["color"] == COLOR, "the widget change")
    assert live["greeting"] == WIDGET["greeting"] and live["prechat"] is True
    assert live["offline_message"] == WIDGET["offline_message"]
    assert live["agents"][AGENT]["avatar"] == ""  # never a script URL

    # Nobody online and no AI: the page offers the offline form.
    assert live["available"] is False
    online(pipeline, "online")
    assert chat_settings(pipeline)["available"] is True
    # Outside business hours (a week with no hours at all), even with an agent online.
    configure(pipeline, "hours", {"timezone": "Asia/Shanghai", "days": {}})
    closed = settings_when(pipeline, lambda s: not s["open_now"], "the business hours")
    assert closed["available"] is False and closed["agents_online"] is True
    configure(pipeline, "hours", None)  # deleted: always open again
    settings_when(pipeline, lambda s: s["open_now"], "the hours deleted")
    online(pipeline, "offline")
    assert chat_settings(pipeline)["available"] is False


def test_offline_form_leaves_a_message_with_the_email(pipeline: Settings) -> None:
    customer = f"off-{uuid.uuid4().hex[:8]}"
    conversation = conversation_id_for(TENANT, "web", customer)

    async def run() -> dict[str, Any]:
        async with websockets.connect(chat_url(pipeline, customer)) as raw:
            chat = Socket(raw)
            history = await chat.expect(is_type("history"), "history")
            assert history["status"] == "" and history["profile"] == {"name": "", "email": ""}
            base = {"type": "message", "text": "我的包裹丢了", "language": "zh", "offline": True}
            await chat.send(**base, id="o1")
            refused = await chat.expect(is_type("error", id="o1"), "no e-mail refused")
            assert refused["field"] == "email"
            await chat.send(**base, id="o2", profile={"name": "李雷", "email": "lilei@"})
            refused = await chat.expect(is_type("error", id="o2"), "a bad e-mail refused")
            assert refused["field"] == "profile" and "e-mail" in refused["reason"]
            profile = {"name": "李雷", "email": "lilei@example.cn"}
            await chat.send(**base, id="o3", profile=profile)
            ack = await chat.expect(is_type("ack", id="o3"), "the offline message")
            # Delivered: the read model lists it (the worker's notice after projecting).
            await chat.expect(is_type("received", message_id=ack["message_id"]), "received")
        async with websockets.connect(chat_url(pipeline, customer)) as raw:
            again = await Socket(raw).expect(is_type("history"), "history again")
        # Protocol 1 is as it was: no extra fields.
        async with websockets.connect(chat_url(pipeline, customer, version="")) as raw:
            older = await Socket(raw).expect(is_type("history"), "protocol-1 history")
            assert set(older) == {"type", "conversation_id", "messages"}
        return again

    again = asyncio.run(run())
    assert again["profile"] == {"name": "李雷", "email": "lilei@example.cn"}
    assert [m["role"] for m in again["messages"]] == ["customer"]
    (received,) = events_of(pipeline, conversation, MessageReceived)
    assert received.text == "【离线留言】请回复至邮箱：lilei@example.cn（李雷）\n\n我的包裹丢了"
    kept = profile_of(pipeline, conversation)
    assert kept[b"email"] == b"lilei@example.cn" and kept[b"name"] == "李雷".encode()
    close(pipeline, conversation)  # out of the line, so wendy is free for the next tests


def test_a_closed_chat_is_rated_with_a_rate_frame(pipeline: Settings) -> None:
    customer = f"rate-{uuid.uuid4().hex[:8]}"
    conversation = conversation_id_for(TENANT, "web", customer)
    online(pipeline, "online")

    async def run() -> None:
        async with websockets.connect(chat_url(pipeline, customer)) as raw:
            chat = Socket(raw)
            await chat.expect(is_type("history"), "history")
            await chat.send(type="message", id="r1", text="你好，我要退货", language="zh")
            ack = await chat.expect(is_type("ack", id="r1"), "ack")
            await chat.expect(is_type("received", message_id=ack["message_id"]), "received")
            await chat.send(type="rate", id="too-early", rating=5)
            early = await chat.expect(is_type("error", id="too-early"), "rating an open chat")
            assert "open" in early["reason"]
            await asyncio.to_thread(reply, pipeline, conversation, "好的，已为您办理。")
            got = await chat.expect(is_type("reply"), "the agent's reply")
            assert got["author"] == AGENT
            await asyncio.to_thread(close, pipeline, conversation)
            await chat.expect(is_type("closed"), "the close")
            await chat.expect(is_type("csat"), "the rating asked for")
            for bad in (0, 6, "5", True, 4.5):
                await chat.send(type="rate", id=f"bad-{bad}", rating=bad)
                await chat.expect(is_type("error", id=f"bad-{bad}"), f"rating {bad!r} refused")
            await chat.send(type="rate", id="rate-1", rating=4, comment="处理得很快")
            await chat.expect(
                lambda f: f["type"] == "ack" and f.get("kind") == "rate", "the rating durable"
            )
            rated = await chat.expect(is_type("rated"), "the rating recorded")
            assert rated["rating"] == 4
        async with websockets.connect(chat_url(pipeline, customer)) as raw:
            history = await Socket(raw).expect(is_type("history"), "history after")
            assert history["status"] == "closed"
        field_is(pipeline, conversation, "csat", "4")

    asyncio.run(run())
    (csat,) = events_of(pipeline, conversation, CsatRated)
    assert (csat.rating, csat.comment, csat.assignee) == (4, "处理得很快", AGENT)
    online(pipeline, "offline")


# ------------------------------------------------------------------- Chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    import playwright.sync_api as sync_api

    with sync_api.sync_playwright() as p:
        chromium = launch(p)
        try:
            yield chromium
        finally:
            chromium.close()


def host_page(context: Any, pipeline: Settings, customer: str, errors: list[str]) -> Any:
    """A shop's page with the one script tag."""
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_content(
        "<html><head><title>小鹿商城</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1"></head>'
        "<body style='font-family:sans-serif;"
        "background:#fafafa'><h1 style='margin:2rem'>小鹿商城 Deer Shop</h1>"
        "<p style='margin:2rem'>Spring sale: everything 20% off.</p>"
        f'<script src="{http_base(pipeline)}/widget.js" data-tenant="{TENANT}" '
        f'data-customer="{customer}"></script></body></html>'
    )
    return page


def rgb(hex_color: str) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def test_widget_in_chinese_desktop_and_mobile(pipeline: Settings, browser: Any) -> None:
    settings_when(pipeline, lambda s: s["color"] == COLOR and s["prechat"], "the widget config")
    online(pipeline, "online")
    customer = f"zh-{uuid.uuid4().hex[:8]}"
    conversation = conversation_id_for(TENANT, "web", customer)
    errors: list[str] = []
    context = browser.new_context(locale="zh-CN", viewport={"width": 1280, "height": 800})
    try:
        host = host_page(context, pipeline, customer, errors)
        launcher = host.locator("#kefu-widget-button")
        assert launcher.get_attribute("aria-label") == "在线客服"
        host.wait_for_function(
            f"getComputedStyle(document.getElementById('kefu-widget-button'))"
            f".backgroundColor === '{rgb(COLOR)}'"
        )
        launcher.click()
        assert launcher.get_attribute("aria-expanded") == "true"
        frame = host.frame_locator("#kefu-widget-frame")
        # The pre-chat form first; the greeting in the tenant's words. (A Playwright wait:
        # the sync API only learns of the frame's navigation while it waits or calls,
        # so polling ``host.frames`` alone can spin on a stale URL.)
        frame.locator("#prechat:not([hidden])").wait_for(timeout=30_000)
        chat = next(f for f in host.frames if "/chat?" in f.url)
        assert frame.locator("#greeting p").text_content() == WIDGET["greeting"]["zh"]
        frame.locator("#prechat-start").click()
        assert frame.locator("#prechat-name-error").text_content() == "请填写您的称呼。"
        assert frame.locator("#prechat-name").get_attribute("aria-invalid") == "true"
        frame.locator("#prechat-name").fill("李雷")
        frame.locator("#prechat-email").fill("lilei@example.cn")
        # The topic field, in the visitor's language; the pick goes with the message.
        assert frame.locator("#prechat-topic-label").text_content() == "咨询类型"
        labels = frame.locator("#prechat-topic option").all_text_contents()
        assert labels == ["物流查询", "发票与付款"], labels
        frame.locator("#prechat-topic").select_option("delivery")
        DOCS.mkdir(exist_ok=True)
        host.screenshot(path=str(DOCS / "widget-prechat-zh.png"))
        frame.locator("#prechat-start").click()
        frame.locator("#prechat").wait_for(state="hidden")
        assert chat.evaluate("document.activeElement.id") == "text"

        frame.locator("#text").fill("你好，我的快递三天了还没到，能帮我查一下吗？")
        frame.locator("#send-btn").click()
        # ✓ once durable, ✓✓ once the conversation's record lists it.
        frame.locator("#log p.customer .mark[data-state=delivered]").wait_for(timeout=30_000)
        mark = frame.locator("#log p.customer .mark")
        assert mark.get_attribute("aria-label") == "已送达"
        kept = profile_of(pipeline, conversation)
        assert kept[b"email"] == b"lilei@example.cn" and kept[b"topic"] == b"delivery"
        field_is(pipeline, conversation, "queue", f"{TENANT}:default")  # the topic's team

        field_is(pipeline, conversation, "assignee", AGENT)
        agent_typing(pipeline, conversation)
        frame.locator("#typing .dots").wait_for(timeout=15_000)
        assert "正在输入" in (frame.locator("#typing").text_content() or "")
        reply(pipeline, conversation, "您好，我是王芳，马上帮您查询物流信息。")
        frame.locator("#log p.agent").wait_for(timeout=30_000)
        assert frame.locator("#log p.agent .who").text_content() == "王芳"
        assert frame.locator("#log .row[data-author=wendy] .avatar").first.text_content() == "王"
        assert frame.locator("#typing").text_content() == ""

        # Closed with Escape: focus back on the launcher; a reply meanwhile: a badge.
        frame.locator("#text").press("Escape")
        host.locator("#kefu-widget-panel").wait_for(state="hidden")
        assert host.evaluate("document.activeElement.id") == "kefu-widget-button"
        reply(pipeline, conversation, "查到了：您的包裹在转运中心，预计明天上午送达。")
        host.locator("#kefu-widget-badge:not([hidden])").wait_for(timeout=30_000)
        assert host.locator("#kefu-widget-badge").text_content() == "1"
        assert "1 条新消息" in (launcher.get_attribute("aria-label") or "")
        launcher.click()
        host.locator("#kefu-widget-badge").wait_for(state="hidden")
        frame.locator("#log p.agent").nth(1).wait_for()
        agent_typing(pipeline, conversation)
        frame.locator("#typing .dots").wait_for(timeout=15_000)
        assert "王芳正在输入" in (frame.locator("#typing").text_content() or "")
        DOCS.mkdir(exist_ok=True)
        host.screenshot(path=str(DOCS / "widget-zh.png"))

        # Closed by the agent: the chat asks for a rating, which becomes a CsatRated.
        close(pipeline, conversation)
        frame.locator("#log .csat").wait_for(timeout=30_000)
        assert "本次对话已结束" in (frame.locator("#log").text_content() or "")
        frame.locator("#csat-submit").click()
        assert frame.locator(".csat .field-error").text_content() == "请先选择星级。"
        frame.locator(".stars button[data-rating='4']").focus()
        frame.locator(".stars button[data-rating='4']").press("ArrowRight")  # keyboard: 5
        assert frame.locator(".stars button[aria-pressed=true]").get_attribute("data-rating") == "5"
        frame.locator("#csat-comment").fill("王芳很耐心，谢谢！")
        frame.locator("#csat-submit").click()
        frame.locator(".csat .done").wait_for(timeout=30_000)
        assert frame.locator(".csat .done").text_content() == "感谢您的评价（5 星）！"
        field_is(pipeline, conversation, "csat", "5")

        # The chat page on its own: the same conversation, from the history.
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_viewport_size({"width": 900, "height": 820})
        assert page.goto(f"{http_base(pipeline)}/chat?tenant={TENANT}&customer={customer}")
        page.wait_for_selector("body[data-connected=true]")
        page.wait_for_selector(".csat .done")
        assert page.locator("#log p.customer .mark[data-state=delivered]").count() == 1
        assert page.locator("#log").get_attribute("aria-live") == "polite"
        assert page.evaluate("document.documentElement.lang") == "zh-CN"
        page.screenshot(path=str(DOCS / "chat-zh.png"))
    finally:
        context.close()

    # A phone: the chat fills the screen and the launcher steps aside.
    phone = browser.new_context(
        locale="zh-CN",
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    try:
        host = host_page(phone, pipeline, customer, errors)
        host.locator("#kefu-widget-button").tap()
        frame = host.frame_locator("#kefu-widget-frame")
        frame.locator("body[data-connected=true]").wait_for(timeout=30_000)
        frame.locator(".csat .done").wait_for()
        box = host.locator("#kefu-widget-panel").bounding_box()
        assert box == {"x": 0, "y": 0, "width": 390, "height": 844}, box
        assert not host.locator("#kefu-widget-button").is_visible()
        host.screenshot(path=str(DOCS / "widget-mobile-zh.png"))
        frame.locator("#close-chat").tap()  # the frame asks the widget to close
        host.locator("#kefu-widget-button").wait_for(state="visible")
    finally:
        phone.close()
    online(pipeline, "offline")
    assert errors == [], errors


def test_widget_in_english_offline_form_and_language_switch(
    pipeline: Settings, browser: Any
) -> None:
    online(pipeline, "offline")  # whatever an earlier test left
    settings_when(pipeline, lambda s: s["available"] is False, "nobody available")
    customer = f"en-{uuid.uuid4().hex[:8]}"
    conversation = conversation_id_for(TENANT, "web", customer)
    errors: list[str] = []
    context = browser.new_context(locale="en-US", viewport={"width": 1280, "height": 800})
    try:
        host = host_page(context, pipeline, customer, errors)
        launcher = host.locator("#kefu-widget-button")
        assert launcher.get_attribute("aria-label") == "Chat with us"
        launcher.click()
        frame = host.frame_locator("#kefu-widget-frame")
        frame.locator("body[data-mode=offline]").wait_for(timeout=30_000)
        assert frame.locator("#status").text_content() == "Offline now"
        # The pre-chat topics (asked when someone is available) in English too.
        assert frame.locator("#prechat-topic-label").text_content() == "Topic"
        topics = frame.locator("#prechat-topic option").all_text_contents()
        assert topics == ["Delivery", "Invoices and payment"], topics
        assert frame.locator("#offline-text").text_content() == WIDGET["offline_message"]["en"]
        assert frame.locator("#prechat").is_hidden()  # the offline form asks instead
        assert frame.locator("#send-btn").text_content() == "Leave message"

        frame.locator("#offline-name").fill("Bob Smith")
        frame.locator("#offline-email").fill("bob@")
        frame.locator("#text").fill("My parcel arrived damaged. Can I get a replacement?")
        frame.locator("#send-btn").click()
        assert (
            frame.locator("#offline-email-error").text_content() == "This is not an e-mail address."
        )
        assert frame.locator("#log p.customer").count() == 0  # nothing sent
        frame.locator("#offline-email").fill("bob@example.com")
        frame.locator("#send-btn").click()
        frame.locator("#log p.customer .mark[data-state=delivered]").wait_for(timeout=30_000)
        thanks = frame.locator("#offline-text").text_content() or ""
        assert thanks == "Thank you: we got your message and will reply to bob@example.com."
        assert frame.locator("#offline-fields").is_hidden()
        host.screenshot(path=str(DOCS / "widget-en.png"))

        # The switch: Chinese, then back; the launcher follows.
        frame.locator("#lang").click()
        assert frame.locator("#send-btn").text_content() == "发送"
        assert frame.locator("#log p.customer .mark").get_attribute("aria-label") == "已送达"
        host.wait_for_function(
            "document.getElementById('kefu-widget-button')"
            ".getAttribute('aria-label') === '在线客服'"
        )
        frame.locator("#lang").click()
        assert frame.locator("#title").text_content() == "Customer service"
    finally:
        context.close()
    # In a thread: Playwright's sync API holds this thread's event loop.
    with ThreadPoolExecutor(1) as thread:
        found = thread.submit(events_of, pipeline, conversation, MessageReceived).result()
    (received,) = found
    assert received.text.startswith("[Offline message] Please reply by e-mail to: bob@example.com")
    close(pipeline, conversation)
    assert errors == [], errors
