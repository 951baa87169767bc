"""Attachments in the pages: the web chat (/chat, and the widget around it) and the agent
console (/console), on the real stack.

- The console's upload route (``POST /v1/console/uploads``): the agent's token, and
  only a conversation assigned to them; the reply frame's ``attachments`` become the
  reply's, which the customer's socket gets with signed links.
- Headless Chromium in Chinese and in English: a customer sends a picture (file picker)
  with a caption, then a pasted screenshot and a dropped file; the agent sees the
  thumbnails and the file card, opens the picture full size, and answers with a picture
  that the customer sees (and the widget shows). Keeps docs/attachments-*.png.
- A file over the limit and an executable named like a photo: the page says why in
  plain words, and nothing is sent.

Tenant "files" (tests/conftest.py): human-only, agent "fay" (token "fay-token")."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import websockets
from PIL import Image, ImageDraw

from connectors.identity import conversation_id_for
from kefu.settings import Settings
from schemas.keys import conversation_key, messages_key
from tests.browser import launch
from tests.conftest import wait_for
from tests.test_console import Socket, assigned, http_base, is_type, login, ws_base

TENANT, AGENT, TOKEN = "files", "fay", "fay-token"
DOCS = Path(__file__).parent.parent / "docs"
# A Windows executable's first bytes: sniffed as application/x-msdownload, whatever its name.
EXE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + b"\x00" * 48 + b"PE\x00\x00"


def invoice_png(width: int = 900, height: int = 600) -> bytes:
    """A picture that looks like a scanned invoice (no text: no font needed)."""
    image = Image.new("RGB", (width, height), "#fdfdf8")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width, 90), fill="#0b5394")
    draw.rectangle((40, 130, 360, 150), fill="#999999")
    draw.rectangle((40, 170, 280, 186), fill="#bbbbbb")
    for row in range(6):
        y = 240 + row * 44
        draw.line((40, y, width - 40, y), fill="#cccccc", width=2)
        draw.rectangle((40, y + 12, 300 + (row * 37) % 200, y + 28), fill="#d0d0d0")
        draw.rectangle((width - 200, y + 12, width - 60, y + 28), fill="#b0b0b0")
    draw.ellipse((width - 230, height - 190, width - 60, height - 20), outline="#cc0000", width=8)
    return _png(image)


def marked_png(width: int = 800, height: int = 520) -> bytes:
    """The agent's answer: where to find the order number, circled."""
    image = Image.new("RGB", (width, height), "#ffffff")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width, 70), fill="#274e13")
    for row in range(5):
        y = 120 + row * 70
        draw.rectangle((50, y, width - 50, y + 40), fill="#eeeeee")
    draw.rectangle((60, 265, 420, 295), fill="#ffe599")
    draw.ellipse((30, 240, 450, 320), outline="#e69138", width=7)
    return _png(image)


def screenshot_png() -> bytes:
    image = Image.new("RGB", (640, 400), "#f3f6fb")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 640, 36), fill="#444444")
    draw.rectangle((30, 70, 610, 370), fill="#ffffff", outline="#cccccc")
    draw.rectangle((60, 110, 360, 140), fill="#f4cccc")
    return _png(image)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis.dsn, decode_responses=True)


def listed(settings: Settings, conversation: str) -> list[dict[str, Any]]:
    raw = redis_client(settings).lrange(messages_key(TENANT, conversation), 0, -1)
    return [json.loads(m) for m in raw]


# ------------------------------------------------------------ the console's route


def test_console_upload_is_the_assigned_agents_and_reaches_the_customer(
    pipeline: Settings,
) -> None:
    who = f"att-{uuid.uuid4().hex[:8]}"
    conversation = conversation_id_for(TENANT, "web", who)
    chat_url = f"{ws_base(pipeline)}/v1/chat/ws?tenant={TENANT}&customer={who}"
    picture = marked_png()

    def upload(http: httpx.Client, data: bytes, token: str = TOKEN, **form: str) -> httpx.Response:
        fields = {"tenant": TENANT, "agent": AGENT, "conversation_id": conversation, **form}
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return http.post(
            "/v1/console/uploads",
            data=fields,
            files={"file": ("标注.png", data, "image/png")},
            headers=headers,
        )

    async def run(http: httpx.Client) -> None:
        fay = Socket(await login(pipeline, TENANT, AGENT, TOKEN))
        await fay.expect(is_type("welcome"), "welcome")
        await fay.send(type="presence", presence="online")
        await fay.expect(is_type("ack", command="presence"), "presence ack")
        customer = Socket(await websockets.connect(chat_url))
        await customer.expect(is_type("history"), "history")
        await customer.send(type="message", id="c1", text="my invoice is wrong")
        await customer.expect(is_type("ack", id="c1"), "customer ack")
        await fay.expect(assigned(conversation), "assigned to fay", within=60)

        # Who may upload: the agent's token, for a conversation assigned to them.
        assert upload(http, picture, token="").status_code == 401
        assert upload(http, picture, token="wrong").status_code == 401
        assert upload(http, picture, tenant="files2").status_code == 401
        assert upload(http, picture, conversation_id="no-such-conversation").status_code == 404
        other = f"web:someone-else-{uuid.uuid4().hex[:6]}"
        redis_client(pipeline).hset(
            conversation_key(TENANT, other), mapping={"assignee": "zed", "channel": "web"}
        )
        try:
            refused = upload(http, picture, conversation_id=other)
            assert refused.status_code == 403 and "not assigned" in refused.text
        finally:
            redis_client(pipeline).delete(conversation_key(TENANT, other))
        exe = upload(http, EXE)
        assert exe.status_code == 415 and "x-msdownload" in exe.text
        stored = upload(http, picture)
        assert stored.status_code == 201, stored.text
        shown = stored.json()
        assert shown["kind"] == "image" and shown["name"] == "标注.png"
        assert shown["width"] == 800 and shown["thumbnail_url"].startswith("/v1/files/")
        assert "storage_key" not in shown

        # The reply frame: an unknown id is refused, the upload's id is the reply's.
        await fay.send(
            type="reply",
            conversation_id=conversation,
            id="r0",
            attachments=["x" * 24],
        )
        error = await fay.expect(is_type("error", id="r0"), "unknown upload refused")
        assert "unknown or expired" in error["reason"]
        await fay.send(
            type="reply",
            conversation_id=conversation,
            id="r1",
            text="",
            attachments=[shown["attachment_id"]],
        )
        await fay.expect(is_type("ack", id="r1"), "reply ack")
        reply = await customer.expect(
            lambda f: f["type"] == "reply" and bool(f.get("attachments")), "reply with a picture"
        )
        [got] = reply["attachments"]
        assert got["name"] == "标注.png" and got["kind"] == "image"
        image = await asyncio.to_thread(http.get, got["url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(image.content)).size == (800, 520)

        # The console's history shows it with signed links, never the storage keys.
        await fay.send(type="open", conversation_id=conversation)
        history = await fay.expect(
            lambda f: (
                f["type"] == "conversation"
                and any(m.get("attachments") for m in f["messages"] if m["role"] == "agent")
            ),
            "the reply in the console's history",
        )
        [mine] = [m for m in history["messages"] if m.get("attachments")]
        assert mine["author"] == AGENT and "storage_key" not in mine["attachments"][0]
        thumb = await asyncio.to_thread(http.get, mine["attachments"][0]["thumbnail_url"])
        assert thumb.status_code == 200

        await fay.send(type="close", conversation_id=conversation)
        await fay.expect(is_type("ack", command="close"), "close ack")
        await fay.socket.close()
        await customer.socket.close()

    with httpx.Client(base_url=http_base(pipeline), timeout=30) as http:
        asyncio.run(run(http))


# ------------------------------------------------------------------- the browser


def watch(page: Any, name: str, errors: list[str]) -> None:
    def on_console(message: Any) -> None:
        # A refused upload is a 4xx the page explains: the browser logs it as well.
        if message.type == "error" and "Failed to load resource" not in message.text:
            errors.append(f"{name}: {message.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(f"{name}: {exc}"))


LOADED = """(selector) => {
  const images = [...document.querySelectorAll(selector)];
  return images.length > 0 && images.every((i) => i.complete && i.naturalWidth > 0);
}"""

# A paste or a drop, as the browser fires them for a screenshot or a file from the desktop.
HAND_OVER = """([kind, selector, b64, name, type]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type }));
  const target = document.querySelector(selector);
  const init = { bubbles: true, cancelable: true };
  if (kind === "paste") {
    target.dispatchEvent(new ClipboardEvent("paste", { ...init, clipboardData: data }));
  } else {
    for (const event of ["dragenter", "dragover", "drop"]) {
      target.dispatchEvent(new DragEvent(event, { ...init, dataTransfer: data }));
    }
  }
}"""


def hand_over(page: Any, kind: str, selector: str, data: bytes, name: str, type_: str) -> None:
    page.evaluate(HAND_OVER, [kind, selector, base64.b64encode(data).decode(), name, type_])


@pytest.fixture
def browser() -> Iterator[Any]:
    import playwright.sync_api as sync_api

    with sync_api.sync_playwright() as p:
        chromium = launch(p)
        try:
            yield chromium
        finally:
            chromium.close()


WORDS = {
    "zh": {
        "locale": "zh-CN",
        "invoice": "发票.png",
        "caption": "这是我的发票，金额不对",
        "notes": "说明.txt",
        "marked": "订单号位置.png",
        "answer": "订单号在这里，我已经帮您改好了。",
        "attach": "添加附件",
    },
    "en": {
        "locale": "en-US",
        "invoice": "invoice.png",
        "caption": "Here is my invoice, the amount is wrong",
        "notes": "notes.txt",
        "marked": "order-number.png",
        "answer": "The order number is here; I have corrected it for you.",
        "attach": "Attach a file",
    },
}


@pytest.mark.parametrize("language", ["zh", "en"])
def test_pictures_both_ways_in_chromium(pipeline: Settings, browser: Any, language: str) -> None:
    words = WORDS[language]
    base = http_base(pipeline)
    who = f"pic-{language}-{uuid.uuid4().hex[:6]}"
    conversation = conversation_id_for(TENANT, "web", who)
    errors: list[str] = []

    agent_context = browser.new_context(
        locale=words["locale"], viewport={"width": 1280, "height": 800}
    )
    customer_context = browser.new_context(
        locale=words["locale"], viewport={"width": 720, "height": 760}
    )
    try:
        agent = agent_context.new_page()
        watch(agent, "console", errors)
        assert (response := agent.goto(f"{base}/console?tenant={TENANT}&agent={AGENT}"))
        assert response.ok
        agent.fill("#token", TOKEN)
        agent.click("#login-btn")
        agent.wait_for_selector("body[data-state=ready]", timeout=30_000)
        agent.click("button[data-presence=online]")
        agent.wait_for_selector("body[data-presence=online]", timeout=45_000)

        customer = customer_context.new_page()
        watch(customer, "chat", errors)
        assert (response := customer.goto(f"{base}/chat?tenant={TENANT}&customer={who}"))
        assert response.ok
        customer.wait_for_selector("body[data-connected=true]", timeout=30_000)
        assert customer.get_attribute("#attach", "aria-label") == words["attach"]

        # 1. The attach button's file picker: a picture with a caption.
        customer.set_input_files(
            "#file",
            files=[{"name": words["invoice"], "mimeType": "image/png", "buffer": invoice_png()}],
        )
        customer.wait_for_selector("#tray .chip[data-state=ready]", timeout=30_000)
        assert customer.text_content("#tray .chip .name") == words["invoice"]
        customer.fill("#text", words["caption"])
        customer.click("#send-btn")
        customer.wait_for_selector("#log p.customer:not(.pending) .thumb img", timeout=30_000)
        assert customer.text_content("#tray") == ""

        # 2. A pasted screenshot and a dropped file, sent together without text.
        hand_over(customer, "paste", "#text", screenshot_png(), "image.png", "image/png")
        notes = "订单 1234：金额应为 99 元\n".encode() if language == "zh" else b"order 1234\n"
        hand_over(customer, "drop", "#log", notes, words["notes"], "text/plain")
        customer.wait_for_function(
            "document.querySelectorAll('#tray .chip[data-state=ready]').length === 2",
            timeout=30_000,
        )
        customer.focus("#text")
        customer.keyboard.press("Enter")  # Enter sends, the text box empty
        customer.wait_for_selector("#log p.customer:not(.pending) .file", timeout=30_000)
        customer.wait_for_function(LOADED, arg="#log .thumb img", timeout=30_000)

        # The agent sees both messages: thumbnails and the file card.
        row = f'#assigned li[data-conversation-id="{conversation}"]'
        agent.wait_for_selector(row, timeout=60_000)
        agent.click(row)
        agent.wait_for_function(
            "document.querySelectorAll('#messages .msg.customer .thumb img').length === 2",
            timeout=30_000,
        )
        agent.wait_for_function(LOADED, arg="#messages .thumb img", timeout=30_000)
        first = agent.locator("#messages .msg.customer .thumb img").first
        assert first.get_attribute("alt") == words["invoice"]
        assert words["caption"] in (agent.text_content("#messages") or "")
        card = agent.locator("#messages .msg.customer .file")
        assert card.locator(".name").text_content() == words["notes"]
        assert card.locator(".size").text_content() == f"{len(notes)} B"
        assert (card.get_attribute("href") or "").startswith(f"{base}/v1/files/")
        screenshot_name = agent.locator("#messages .msg.customer .thumb img").nth(1)
        assert (screenshot_name.get_attribute("alt") or "").startswith("screenshot")

        # Opening the picture: full size in the lightbox; Escape closes it, keyboard only.
        agent.locator("#messages .msg.customer .thumb").first.focus()
        agent.keyboard.press("Enter")
        agent.wait_for_selector("#lightbox:not([hidden])", timeout=10_000)
        agent.wait_for_function(LOADED, arg="#lightbox-img", timeout=30_000)
        assert agent.evaluate("document.getElementById('lightbox-img').naturalWidth") == 900
        assert agent.evaluate("document.activeElement.id") == "lightbox-close"
        agent.keyboard.press("Escape")
        agent.wait_for_selector("#lightbox", state="hidden", timeout=10_000)

        # The agent answers with a picture.
        agent.set_input_files(
            "#file",
            files=[{"name": words["marked"], "mimeType": "image/png", "buffer": marked_png()}],
        )
        agent.wait_for_selector("#tray .chip[data-state=ready]", timeout=30_000)
        agent.fill("#reply-text", words["answer"])
        agent.click("#reply-btn")
        agent.wait_for_selector("#messages .msg.agent .thumb img", timeout=60_000)
        agent.wait_for_function(LOADED, arg="#messages .thumb img", timeout=30_000)
        assert agent.text_content("#tray") == ""

        # The customer sees it, and opens it.
        customer.wait_for_selector("#log p.agent .thumb img", timeout=60_000)
        customer.wait_for_function(LOADED, arg="#log .thumb img", timeout=30_000)
        assert customer.get_attribute("#log p.agent .thumb img", "alt") == words["marked"]
        assert words["answer"] in (customer.text_content("#log p.agent") or "")
        customer.click("#log p.agent .thumb")
        customer.wait_for_function(LOADED, arg="#lightbox-img", timeout=30_000)
        assert customer.evaluate("document.getElementById('lightbox-img').naturalWidth") == 800
        customer.click("#lightbox-close")
        customer.wait_for_selector("#lightbox", state="hidden", timeout=10_000)

        DOCS.mkdir(exist_ok=True)
        agent.screenshot(path=str(DOCS / f"attachments-console-{language}.png"))
        customer.screenshot(path=str(DOCS / f"attachments-chat-{language}.png"))

        # The widget (one script tag) shows the same conversation, pictures included.
        host = customer_context.new_page()
        watch(host, "widget host", errors)
        host.set_content(
            "<html><body><h1>Shop</h1>"
            f'<script src="{base}/widget.js" data-tenant="{TENANT}" '
            f'data-customer="{who}"></script></body></html>'
        )
        host.click("#kefu-widget-button")
        frame = host.frame_locator("#kefu-widget-frame")
        frame.locator("#log p.agent .thumb img").wait_for(timeout=30_000)
        assert frame.locator("#log .file .name").text_content() == words["notes"]
        assert frame.locator("#attach").get_attribute("aria-label") == words["attach"]

        # Free fay for the next test.
        agent.click("#close-btn")
        agent.wait_for_selector(f"{row}", state="detached", timeout=60_000)
    finally:
        agent_context.close()
        customer_context.close()
    assert errors == []


def said(page: Any) -> str:
    """The page's notice, once it says something (then it is cleared for the next)."""
    page.wait_for_selector("#notice:not(:empty)", timeout=30_000)
    text = str(page.text_content("#notice"))
    page.evaluate("document.getElementById('notice').textContent = ''")
    return text


def test_refused_files_are_explained_and_nothing_is_sent(pipeline: Settings, browser: Any) -> None:
    base = http_base(pipeline)
    who = f"bad-{uuid.uuid4().hex[:6]}"
    conversation = conversation_id_for(TENANT, "web", who)
    errors: list[str] = []
    context = browser.new_context(locale="en-US", viewport={"width": 720, "height": 640})
    try:
        page = context.new_page()
        watch(page, "chat", errors)
        page.goto(f"{base}/chat?tenant={TENANT}&customer={who}")
        page.wait_for_selector("body[data-connected=true]", timeout=30_000)

        # Over the web chat's limit (1 MB in the test settings).
        big = invoice_png()[:64] + b"\x00" * (1024 * 1024 + 4096)
        page.set_input_files(
            "#file", files=[{"name": "scan.png", "mimeType": "image/png", "buffer": big}]
        )
        notice = said(page)
        assert "scan.png” is too large" in notice and "at most 1.0 MB" in notice, notice
        assert page.text_content("#tray") == ""

        # An executable that calls itself a photo.
        page.set_input_files(
            "#file", files=[{"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": EXE}]
        )
        notice = said(page)
        assert "photo.jpg” can't be sent: this type of file is not allowed" in notice, notice
        assert page.text_content("#tray") == ""
        assert page.is_enabled("#send-btn")

        # Pressing Send now sends nothing: no text, no attachment.
        page.click("#send-btn")
        assert page.locator("#log p.customer").count() == 0
        # A text afterwards goes alone: the refused files were never attached.
        page.fill("#text", "never mind, here is the number: 1234")
        page.click("#send-btn")
        page.wait_for_selector("#log p.customer:not(.pending)", timeout=30_000)
        assert page.text_content("#notice") == ""
        stored = wait_for(lambda: listed(pipeline, conversation), 60, "the text message")
        assert [m.get("attachments") for m in stored] == [None]
        assert page.locator("#log .thumb, #log .file").count() == 0
    finally:
        context.close()
    assert errors == []


def undecodable_jpeg() -> bytes:
    """A well-formed JPEG (header, segments, end marker: what the upload checks) whose
    scan names a Huffman table no DHT defines: its pixels do not decode."""
    out = io.BytesIO()
    Image.new("RGB", (320, 200), (30, 120, 200)).save(out, "JPEG")
    data = out.getvalue()
    sos = data.index(b"\xff\xda")
    return data[: sos + 6] + b"\x33" + data[sos + 7 :]


def test_a_picture_that_does_not_decode_is_shown_as_a_file(
    pipeline: Settings, browser: Any
) -> None:
    """Accepted at upload (its structure is sound), its thumbnail answers 422 once its
    pixels are decoded: the page shows the file card instead, and the file downloads."""
    base = http_base(pipeline)
    who = f"broken-{uuid.uuid4().hex[:6]}"
    conversation = conversation_id_for(TENANT, "web", who)
    with httpx.Client(base_url=base, timeout=30) as http:
        uploaded = http.post(
            "/v1/chat/uploads",
            params={"tenant": TENANT, "customer": who, "name": "broken.jpg"},
            content=undecodable_jpeg(),
            headers={"Content-Type": "application/octet-stream"},
        )
        assert uploaded.status_code == 201, uploaded.text
        shown = uploaded.json()
        assert shown["kind"] == "image" and http.get(shown["thumbnail_url"]).status_code == 422

        async def send() -> None:
            url = f"{ws_base(pipeline)}/v1/chat/ws?tenant={TENANT}&customer={who}"
            customer = Socket(await websockets.connect(url))
            await customer.expect(is_type("history"), "history")
            await customer.send(
                type="message", id="b1", text="", attachments=[shown["attachment_id"]]
            )
            await customer.expect(is_type("ack", id="b1"), "ack")
            await customer.socket.close()

        with ThreadPoolExecutor(1) as thread:  # the browser's loop runs in this one
            thread.submit(asyncio.run, send()).result()
        wait_for(lambda: listed(pipeline, conversation), 60, "the message")
        errors: list[str] = []
        context = browser.new_context(locale="en-US", viewport={"width": 720, "height": 640})
        try:
            page = context.new_page()
            watch(page, "chat", errors)
            page.goto(f"{base}/chat?tenant={TENANT}&customer={who}")
            card = page.locator("#log p.customer .file")
            card.wait_for(timeout=30_000)
            assert card.locator(".name").text_content() == "broken.jpg"
            assert page.locator("#log .thumb").count() == 0
            assert http.get(card.get_attribute("href") or "").status_code == 200
        finally:
            context.close()
        # Out of the files tenant's queue: its agent is the other tests'.
        closed = http.post(
            f"/v1/conversations/{conversation}/close",
            json={"closed_by": "test"},
            headers={"X-Api-Key": "files-test-key"},
        )
        assert closed.status_code in (202, 404, 409), closed.text
    assert errors == []
