"""The agent console (/console, /v1/console/ws) and the web widget (/chat, /widget.js).

Pure: token hashes, login, frame validation, ``kefu agents token``. On the real stack:
the console protocol end to end (login, presence, live assigned/queued lists, history,
typing both ways, reply with a resend that is not a duplicate, transfer, hand back to
the AI, close, offline on disconnect), and the whole flow in headless Chromium: a
customer writes in /chat, the agent answers in /console, the customer sees it. Keeps
docs/console.png and docs/chat.png."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from click.testing import CliRunner
from pydantic import SecretStr

from connectors.console import AgentAccount, authenticate, parse_frame, token_hash
from connectors.identity import conversation_id_for
from kefu.cli import main
from kefu.cli_agents import agent_directory
from kefu.settings import AgentSettings, Settings, TenantSettings
from tests.browser import launch
from tests.conftest import wait_for

Frame = dict[str, Any]
DOCS = Path(__file__).parent.parent / "docs"

# --------------------------------------------------------------------------- pure


def test_login_checks_the_token_hash_in_constant_time() -> None:
    directory = {
        "t": {
            "ann": AgentAccount(token_sha256=token_hash("s3cret")),
            "nokey": AgentAccount(token_sha256=""),
        }
    }
    assert authenticate(directory, "t", "ann", "s3cret") == directory["t"]["ann"]
    assert authenticate(directory, "t", "ann", "wrong") is None
    assert authenticate(directory, "t", "bob", "s3cret") is None
    assert authenticate(directory, "other", "ann", "s3cret") is None
    # No hash configured: nobody logs in, whatever they present.
    assert authenticate(directory, "t", "nokey", "") is None
    assert authenticate(directory, "t", "nokey", "x") is None
    upper = {"t": {"ann": AgentAccount(token_sha256=token_hash("s3cret").upper())}}
    assert authenticate(upper, "t", "ann", "s3cret") is not None


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "[]",
        '{"type": "nope"}',
        '{"type": "presence", "presence": "busy"}',
        '{"type": "reply", "conversation_id": "c", "text": ""}',
        '{"type": "reply", "conversation_id": "c", "text": "hi", "extra": 1}',
        '{"type": "reply", "conversation_id": "bad id", "text": "hi"}',
        '{"type": "reply", "conversation_id": "c", "text": "' + "x" * 8001 + '"}',
        '{"type": "transfer", "conversation_id": "c"}',
        '{"type": "transfer", "conversation_id": "c", "team": "a b"}',
        # Attachments: a list of upload ids, at most ten; whitespace alone is no reply.
        '{"type": "reply", "conversation_id": "c", "text": "  "}',
        '{"type": "reply", "conversation_id": "c", "text": "", "attachments": []}',
        '{"type": "reply", "conversation_id": "c", "attachments": "abc"}',
        '{"type": "reply", "conversation_id": "c", "attachments": [""]}',
        '{"type": "reply", "conversation_id": "c", "attachments": '
        + json.dumps(["a" * 20] * 11)
        + "}",
    ],
)
def test_bad_frames_are_refused_with_a_reason(frame: str) -> None:
    with pytest.raises(ValueError):
        parse_frame(frame)


def test_good_frames_parse() -> None:
    assert parse_frame('{"type": "presence", "presence": "away"}').type == "presence"
    transfer = parse_frame('{"type": "transfer", "conversation_id": "c", "agent": "dave"}')
    assert transfer.type == "transfer" and transfer.agent == "dave"
    picture = parse_frame('{"type": "reply", "conversation_id": "c", "attachments": ["u1"]}')
    assert picture.type == "reply" and picture.text == "" and picture.attachments == ["u1"]
    both = parse_frame('{"type": "reply", "conversation_id": "c", "text": "see", "id": "r"}')
    assert both.type == "reply" and both.attachments == []


def test_agents_token_prints_a_token_and_its_hash() -> None:
    result = CliRunner().invoke(main, ["agents", "token", "--tenant", "acme", "--agent", "ann"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(":", 1) for line in result.output.splitlines()[:2])
    token, digest = lines["token"].strip(), lines["sha256"].strip()
    assert len(token) >= 32 and token_hash(token) == digest
    assert "tenants.acme.agents" in result.output and digest in result.output
    again = CliRunner().invoke(main, ["agents", "token", "--agent", "ann"])
    assert token not in again.output  # a new token every time


def test_agent_directory_from_settings() -> None:
    settings = Settings(
        tenants={
            "t": TenantSettings(
                api_key=SecretStr("k"),
                agents={
                    "ann": AgentSettings(
                        token_sha256=SecretStr(token_hash("x")), team="vip", skills=["zh"]
                    )
                },
            )
        }
    )
    directory = agent_directory(settings)
    assert directory["t"]["ann"] == AgentAccount(
        token_sha256=token_hash("x"), team="vip", skills=("zh",), capacity=3
    )
    assert authenticate(directory, "t", "ann", "x") is not None


# ------------------------------------------------------------------- the protocol


def ws_base(settings: Settings) -> str:
    return f"ws://{settings.gateway.host}:{settings.gateway.port}"


def http_base(settings: Settings) -> str:
    return f"http://{settings.gateway.host}:{settings.gateway.port}"


class Socket:
    """A WebSocket client that keeps every frame and waits for one that matches."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.frames: list[Frame] = []

    async def send(self, **frame: Any) -> None:
        await self.socket.send(json.dumps(frame))

    async def expect(
        self, match: Callable[[Frame], bool], what: str, within: float = 45.0
    ) -> Frame:
        """The first frame (already received or to come) that matches."""
        for seen in self.frames:
            if match(seen):
                return seen
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; last: {self.frames[-3:]}")
            try:
                raw = await asyncio.wait_for(self.socket.recv(), left)
            except TimeoutError:
                continue
            frame: Frame = json.loads(raw)
            self.frames.append(frame)
            if match(frame):
                return frame

    def forget(self) -> None:
        self.frames.clear()


def assigned(conversation: str) -> Callable[[Frame], bool]:
    return lambda f: (
        f["type"] == "snapshot" and any(c["conversation_id"] == conversation for c in f["assigned"])
    )


def queued(conversation: str) -> Callable[[Frame], bool]:
    return lambda f: (
        f["type"] == "snapshot" and any(c["conversation_id"] == conversation for c in f["queued"])
    )


def not_assigned(conversation: str) -> Callable[[Frame], bool]:
    return lambda f: (
        f["type"] == "snapshot" and all(c["conversation_id"] != conversation for c in f["assigned"])
    )


def is_type(kind: str, **fields: Any) -> Callable[[Frame], bool]:
    return lambda f: f["type"] == kind and all(f.get(k) == v for k, v in fields.items())


async def login(settings: Settings, tenant: str, agent: str, token: str) -> Any:
    socket = await websockets.connect(f"{ws_base(settings)}/v1/console/ws")
    await socket.send(
        json.dumps({"type": "login", "tenant": tenant, "agent": agent, "token": token})
    )
    return socket


def test_console_refuses_bad_logins(pipeline: Settings) -> None:
    async def closed_with(first: str) -> int | None:
        async with websockets.connect(f"{ws_base(pipeline)}/v1/console/ws") as socket:
            await socket.send(first)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(socket.recv(), 30)
            return closed.value.rcvd.code if closed.value.rcvd else None

    def login_frame(tenant: str, agent: str, token: str) -> str:
        return json.dumps({"type": "login", "tenant": tenant, "agent": agent, "token": token})

    async def run() -> None:
        assert await closed_with(login_frame("desk2", "carol", "wrong")) == 4401
        assert await closed_with(login_frame("desk2", "mallory", "mallory-token")) == 4401
        assert await closed_with(login_frame("desk", "carol", "carol-token")) == 4401
        assert await closed_with('{"type": "presence", "presence": "online"}') == 4400
        assert await closed_with("not json") == 4400

    asyncio.run(run())
    with httpx.Client(base_url=http_base(pipeline), timeout=10) as http:
        page = http.get("/console")
        assert page.status_code == 200 and "kefu console" in page.text
        script = http.get("/widget.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("application/javascript")
        assert "/chat?" in script.text


def test_console_protocol_end_to_end(pipeline: Settings) -> None:
    tenant = "desk2"
    who = f"cust-{uuid.uuid4().hex[:8]}"
    conversation = conversation_id_for(tenant, "web", who)
    chat_url = f"{ws_base(pipeline)}/v1/chat/ws?tenant={tenant}&customer={who}"

    async def run() -> None:
        carol = Socket(await login(pipeline, tenant, "carol", "carol-token"))
        welcome = await carol.expect(is_type("welcome"), "welcome")
        assert welcome["team"] == "default" and welcome["capacity"] == 2
        await carol.send(type="presence", presence="online")
        await carol.expect(is_type("ack", command="presence"), "presence ack")
        await carol.expect(
            lambda f: f["type"] == "snapshot" and f["presence"]["presence"] == "online",
            "carol online in the read model",
        )

        customer = Socket(await websockets.connect(chat_url))
        await customer.expect(is_type("history"), "history")
        await customer.send(type="message", id="m1", text="My parcel is lost, idiots")
        await customer.expect(is_type("ack", id="m1"), "customer ack")
        # The widget resends an unacknowledged message under the same id: not a second one.
        customer.forget()
        await customer.send(type="message", id="m1", text="My parcel is lost, idiots")
        await customer.expect(is_type("ack", id="m1"), "resend ack")
        snapshot = await carol.expect(assigned(conversation), "assigned to carol")
        row = next(c for c in snapshot["assigned"] if c["conversation_id"] == conversation)
        assert row["channel"] == "web" and row["customer_id"] == who

        # History, kept live, with the moderation verdict (abuse is masked by default).
        await carol.send(type="open", conversation_id=conversation)
        history = await carol.expect(
            lambda f: f["type"] == "conversation" and len(f["messages"]) >= 1,
            "history with the customer's message",
        )
        assert history["state"]["assignee"] == "carol"
        assert history["state"]["moderation"] == "mask"
        [said] = history["messages"]
        assert said["text"] == "My parcel is lost, ******" and said["verdict"] == "mask"
        await carol.expect(
            lambda f: (
                assigned(conversation)(f)
                and any(c.get("moderation") == "mask" for c in f["assigned"])
            ),
            "the flag in the list",
        )

        # Typing, both ways (carol's socket subscribes within a poll of the assignment).
        async def customer_typing_reaches_carol() -> None:
            while True:
                await customer.send(type="typing")
                try:
                    await carol.expect(
                        is_type("typing", conversation_id=conversation), "typing", within=1.5
                    )
                    return
                except AssertionError:
                    continue

        await asyncio.wait_for(customer_typing_reaches_carol(), 30)
        await carol.send(type="typing", conversation_id=conversation)
        await customer.expect(is_type("typing", **{"from": "agent"}), "agent typing")

        # Reply; the resend of the same id is not a second message.
        await carol.send(type="reply", conversation_id=conversation, text="On it!", id="r1")
        first = await carol.expect(is_type("ack", command="reply", id="r1"), "reply ack")
        await carol.send(type="reply", conversation_id=conversation, text="On it!", id="r1")
        carol.forget()
        again = await carol.expect(is_type("ack", command="reply", id="r1"), "resend ack")
        assert again["command_id"] == first["command_id"]
        await carol.send(type="reply", conversation_id=conversation, text="Found it.", id="r2")
        await customer.expect(is_type("reply", text="Found it."), "second reply")
        replies = [f for f in customer.frames if f["type"] == "reply"]
        assert [(f["text"], f["author"]) for f in replies] == [
            ("On it!", "carol"),
            ("Found it.", "carol"),
        ]
        await carol.expect(
            lambda f: (
                f["type"] == "conversation"
                and [m["role"] for m in f["messages"]] == ["customer", "agent", "agent"]
                and [m["text"] for m in f["messages"] if m["role"] == "agent"]
                == ["On it!", "Found it."]
            ),
            "the console's history has one customer message and both replies once",
        )

        # Not hers: refused at the edge.
        await carol.send(type="close", conversation_id="web-nope")
        refused = await carol.expect(is_type("error", conversation_id="web-nope"), "refused")
        assert "not assigned" in refused["reason"]
        await carol.send(type="presence", presence="busy")
        await carol.expect(lambda f: f["type"] == "error" and "presence" in f["reason"], "bad")

        # Transfer to billing: dave sees it waiting, goes online, takes it, hands it
        # back to the AI.
        dave = Socket(await login(pipeline, tenant, "dave", "dave-token"))
        await dave.expect(is_type("welcome", team="billing"), "dave's welcome")
        await carol.send(type="transfer", conversation_id=conversation, team="billing")
        await carol.expect(is_type("ack", command="transfer"), "transfer ack")
        await carol.expect(not_assigned(conversation), "carol no longer has it")
        await dave.expect(queued(conversation), "waiting in billing")
        await dave.send(type="presence", presence="online")
        await dave.expect(assigned(conversation), "assigned to dave")
        await dave.send(type="handback", conversation_id=conversation)
        await dave.expect(is_type("ack", command="handback"), "handback ack")
        await dave.expect(not_assigned(conversation), "back with the AI")
        await dave.socket.close()

        # Close: a second customer, assigned to carol, closed by her.
        other = f"cust-{uuid.uuid4().hex[:8]}"
        second = conversation_id_for(tenant, "web", other)
        async with websockets.connect(
            f"{ws_base(pipeline)}/v1/chat/ws?tenant={tenant}&customer={other}"
        ) as socket:
            await socket.recv()
            await socket.send(json.dumps({"type": "message", "id": "x1", "text": "hello"}))
            await carol.expect(assigned(second), "second conversation assigned")
        await carol.send(type="open", conversation_id=second)
        await carol.send(type="close", conversation_id=second, reason="resolved")
        await carol.expect(is_type("ack", command="close"), "close ack")
        await carol.expect(not_assigned(second), "closed conversations leave the list")
        await carol.expect(
            lambda f: (
                f["type"] == "conversation"
                and f["conversation_id"] == second
                and f["state"]["status"] == "closed"
            ),
            "closed in the read model",
        )
        await customer.socket.close()
        await carol.socket.close()

    asyncio.run(run())

    # The last console socket of an agent going away takes them offline.
    async def presence_of(agent: str) -> str:
        import redis.asyncio as aioredis

        from schemas.keys import agents_key

        client = aioredis.Redis.from_url(pipeline.redis.dsn)
        try:
            raw = await client.hget(agents_key(tenant), agent)
        finally:
            await client.aclose()
        return str(json.loads(raw)["presence"]) if raw else ""

    wait_for(lambda: asyncio.run(presence_of("carol")) == "offline", 30, "carol offline")
    wait_for(lambda: asyncio.run(presence_of("dave")) == "offline", 30, "dave offline")


# ---------------------------------------------------------------- the browser flow


def test_customer_and_agent_in_headless_chromium(pipeline: Settings) -> None:
    import playwright.sync_api as sync_api

    base = http_base(pipeline)
    who = f"web-{uuid.uuid4().hex[:8]}"
    errors: list[str] = []

    def watch(page: Any, name: str) -> None:
        def on_console(message: Any) -> None:
            if message.type == "error":
                errors.append(f"{name}: {message.text}")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: errors.append(f"{name}: {exc}"))

    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            agent = browser.new_page(viewport={"width": 1280, "height": 760})
            watch(agent, "console")
            assert (response := agent.goto(f"{base}/console?tenant=desk&agent=alice"))
            assert response.ok and agent.title() == "kefu console"
            agent.fill("#token", "alice-token")
            agent.click("#login-btn")
            agent.wait_for_selector("body[data-state=ready]", timeout=30_000)
            agent.click("button[data-presence=online]")
            agent.wait_for_selector("body[data-presence=online]", timeout=45_000)

            customer = browser.new_page(viewport={"width": 720, "height": 640})
            watch(customer, "chat")
            assert (response := customer.goto(f"{base}/chat?tenant=desk&customer={who}"))
            assert response.ok
            customer.wait_for_selector("body[data-connected=true]", timeout=30_000)
            customer.fill("#text", "Hello, my order #1234 never arrived, idiots")
            customer.click("#send button")
            customer.wait_for_selector("#log p.customer:not(.pending)", timeout=30_000)

            conversation = conversation_id_for("desk", "web", who)
            row = f'#assigned li[data-conversation-id="{conversation}"]'
            agent.wait_for_selector(row, timeout=60_000)
            agent.click(row)
            agent.wait_for_selector("#messages .msg.customer", timeout=30_000)
            assert "never arrived" in (agent.text_content("#messages") or "")
            agent.wait_for_selector("#messages .msg.flagged .badge.mask", timeout=30_000)
            agent.wait_for_selector(f"{row} .badge.mask", timeout=30_000)

            # Typing both ways.
            customer.fill("#text", "are you t")
            customer.type("#text", "h")
            agent.wait_for_function(
                "document.getElementById('typing').textContent.includes('typing')",
                timeout=30_000,
            )
            customer.fill("#text", "")
            agent.type("#reply-text", "S")
            customer.wait_for_function(
                "document.getElementById('typing').textContent.includes('typing')",
                timeout=30_000,
            )
            agent.fill("#reply-text", "Sorry about that! I have sent a replacement.")
            agent.click("#reply-btn")
            customer.wait_for_selector("#log p.agent", timeout=60_000)
            assert "replacement" in (customer.text_content("#log p.agent") or "")
            agent.wait_for_selector("#messages .msg.agent", timeout=30_000)

            DOCS.mkdir(exist_ok=True)
            agent.screenshot(path=str(DOCS / "console.png"))
            customer.screenshot(path=str(DOCS / "chat.png"))

            # The embeddable script: a floating button opens the chat in an iframe.
            host = browser.new_page(viewport={"width": 900, "height": 700})
            watch(host, "widget host")
            host.set_content(
                "<html><body><h1>Shop</h1>"
                f'<script src="{base}/widget.js" data-tenant="desk" '
                f'data-customer="{who}"></script></body></html>'
            )
            host.click("#kefu-widget-button")
            frame = host.frame_locator("#kefu-widget-frame")
            frame.locator("#log p.agent").wait_for(timeout=30_000)  # history on (re)connect
            assert "replacement" in (frame.locator("#log p.agent").text_content() or "")
            host.screenshot(path=str(DOCS / "widget.png"))
        finally:
            browser.close()
    assert errors == []
