"""The agent console at product level (issue 18): internal notes, canned responses,
search, the customer's profile and past conversations, sign-in by session cookie,
unread counts, alerts for new conversations, keyboard shortcuts, Chinese and English.

Pure: the new frames. On the real stack (tenant desk3: agents gina, and hal in team
billing): a note is a ``NoteAdded`` on the log, shown in the console, never to the
customer (web chat socket, its history, the REST view); canned responses changed on
the config topic reach an open console; search and the profile come from ClickHouse,
scoped to the agent's tenant; the ``kefu_session`` cookie logs the console in. In
headless Chromium, zh-CN (desk4, signed in with email and password) and en-US (desk5,
token): the whole desk, with docs/console-features-zh.png and -en.png."""

from __future__ import annotations

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
import websockets.sync.client
from aiokafka import AIOKafkaProducer

from connectors import accounts
from connectors.accounts import COOKIE, secret_context
from connectors.config_log import SecretBox, config_record, publish_config
from connectors.console import parse_frame
from connectors.identity import conversation_id_for
from kefu.config import config_key
from kefu.settings import Settings
from schemas.records import NoteAdded
from schemas.topics import TopicNames
from tests.browser import launch
from tests.conftest import wait_for
from tests.kafka_helpers import read_events
from tests.test_console import Socket, assigned, http_base, is_type, login, not_assigned, ws_base

DOCS = Path(__file__).parent.parent / "docs"
TENANT = "desk3"

# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    "frame",
    [
        '{"type": "note", "conversation_id": "c", "text": "  "}',
        '{"type": "note", "conversation_id": "c"}',
        '{"type": "note", "conversation_id": "c", "text": "x", "attachments": []}',
        '{"type": "note", "conversation_id": "c", "text": "' + "x" * 8001 + '"}',
        '{"type": "search", "query": "a"}',
        '{"type": "search", "query": "' + "q" * 201 + '"}',
        '{"type": "search", "query": "ok", "tenant": "other"}',
        '{"type": "profile"}',
        '{"type": "profile", "conversation_id": "bad id"}',
    ],
)
def test_bad_feature_frames_are_refused(frame: str) -> None:
    with pytest.raises(ValueError):
        parse_frame(frame)


def test_feature_frames_parse() -> None:
    note = parse_frame('{"type": "note", "conversation_id": "c", "text": "VIP", "id": "n1"}')
    assert note.type == "note" and note.text == "VIP" and note.id == "n1"
    search = parse_frame('{"type": "search", "query": "退款"}')
    assert search.type == "search" and search.query == "退款"
    assert parse_frame('{"type": "profile", "conversation_id": "c"}').type == "profile"


def test_a_note_is_an_event_of_its_own_that_the_customer_never_gets() -> None:
    from connectors.agent_commands import note_command
    from connectors.uploads import shown_messages
    from projections.redis_state import changes
    from streams.lifecycle import Conversation, Rejected, decide, evolve, fold
    from tests.test_lifecycle import POLICY, receive

    state = fold(decide(Conversation(), receive(1), POLICY))
    note = note_command("t1", "conv-1", "gina", "VIP, refund approved", "n1")
    [event] = decide(state, note, POLICY)
    assert isinstance(event, NoteAdded) and (event.author, event.text) == ("gina", note.text)
    after = evolve(state, event)
    assert after.seq == state.seq + 1
    # No activity with the customer: the waiting, idle and SLA clocks are as they were.
    for name in ("waiting_for", "last_activity_at", "unanswered_since", "status", "assignee"):
        assert getattr(after, name) == getattr(state, name)
    assert decide(after, note, POLICY) == []  # a resend is dropped
    assert decide(after, note_command("t1", "conv-1", "gina", "again", "n1"), POLICY) == []
    with pytest.raises(Rejected):  # not on a conversation that does not exist
        decide(Conversation(), note, POLICY)
    with pytest.raises(Rejected):  # nor into another tenant's
        decide(after, note_command("t2", "conv-1", "eve", "x", "n9"), POLICY)
    # The read model lists it as a note, with no preview; customers' readers drop it.
    change = changes(event)
    assert change.message is not None and change.message["role"] == "note"
    assert change.message["author"] == "gina" and not change.set and not change.incr
    stored = [json.dumps({"role": "customer", "text": "hi"}), json.dumps(change.message)]
    raw = [s.encode() for s in stored]
    assert [m["role"] for m in shown_messages(raw, object())] == ["customer"]
    assert [m["role"] for m in shown_messages(raw, object(), notes=True)] == ["customer", "note"]


# ---------------------------------------------------------------------- helpers


def publish(settings: Settings, *records: Any) -> None:
    """Config records onto the config topic, as the admin API writes them (in a thread
    of its own: sync Playwright keeps an event loop running in the test's)."""

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.servers, acks="all")
        await producer.start()
        try:
            for record in records:
                await publish_config(producer, TopicNames(settings.topic_prefix).config, record)
        finally:
            await producer.stop()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, send()).result()


def write_account(
    settings: Settings, tenant: str, agent: str, email: str, password: str, name: str
) -> None:
    """An agent who signs in with email and password (sealed as the admin API does)."""
    data = SecretBox(config_key(settings)).seal_fields(
        {
            "name": name,
            "email": email,
            "role": "agent",
            "teams": ["default"],
            "capacity": 2,
            "password": accounts.hash_password(password),
        },
        secret_context(tenant, "agent", agent),
    )
    publish(settings, config_record(tenant, "agent", agent, data, "test"))


def sign_in(settings: Settings, tenant: str, email: str, password: str) -> tuple[str, str]:
    """The session cookie and CSRF token, once the account is live in the gateway."""

    def attempt() -> tuple[str, str] | None:
        with httpx.Client(base_url=http_base(settings), timeout=10) as http:
            answer = http.post(
                "/v1/auth/login", json={"tenant": tenant, "email": email, "password": password}
            )
            if answer.status_code != 200:
                return None
            return str(http.cookies[COOKIE]), str(answer.json()["csrf"])

    return wait_for(attempt, 20, "the account live in the gateway")


def colleague_notes(
    settings: Settings, tenant: str, conversation: str, author: str, text: str
) -> None:
    """A note by another agent of the tenant (as their console sends it)."""
    from connectors.publisher import CommandPublisher
    from schemas.records import AddNote
    from schemas.time import now_ms

    async def send() -> None:
        publisher = CommandPublisher(
            settings.kafka.servers, TopicNames(settings.topic_prefix).commands
        )
        await publisher.start()
        try:
            note = AddNote(
                command_id=str(uuid.uuid4()),
                conversation_id=conversation,
                tenant_id=tenant,
                issued_at=now_ms(),
                author=author,
                text=text,
            )
            await publisher.publish(note)
        finally:
            await publisher.stop()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, send()).result(timeout=60)


def customer_says(settings: Settings, tenant: str, customer: str, *texts: str) -> str:
    """A web chat customer writes; returns the conversation id once each is durable."""
    url = f"{ws_base(settings)}/v1/chat/ws?tenant={tenant}&customer={customer}"
    with websockets.sync.client.connect(url) as socket:
        json.loads(socket.recv())  # history
        for text in texts:
            sent = uuid.uuid4().hex
            socket.send(json.dumps({"type": "message", "id": sent, "text": text}))
            while True:
                frame = json.loads(socket.recv(timeout=30))
                if frame.get("type") == "ack" and frame.get("id") == sent:
                    break
    return conversation_id_for(tenant, "web", customer)


async def online(settings: Settings, tenant: str, agent: str) -> Socket:
    socket = Socket(await login(settings, tenant, agent, f"{agent}-token"))
    await socket.expect(is_type("welcome"), f"{agent}'s welcome")
    await socket.send(type="presence", presence="online")
    await socket.expect(
        lambda f: f["type"] == "snapshot" and f["presence"].get("presence") == "online",
        f"{agent} online",
    )
    return socket


def conversation_with(conversation: str, check: Any) -> Any:
    return lambda f: (
        f["type"] == "conversation" and f["conversation_id"] == conversation and check(f)
    )


# ------------------------------------------------------------------- the protocol


def test_notes_are_on_the_log_in_the_console_and_never_reach_the_customer(
    pipeline: Settings,
) -> None:
    who = f"note-{uuid.uuid4().hex[:8]}"
    conversation = conversation_id_for(TENANT, "web", who)
    chat_url = f"{ws_base(pipeline)}/v1/chat/ws?tenant={TENANT}&customer={who}"
    secret = f"VIP customer, refund approved {uuid.uuid4().hex[:6]}"

    async def run() -> None:
        gina = await online(pipeline, TENANT, "gina")
        customer = Socket(await websockets.connect(chat_url))
        await customer.expect(is_type("history"), "history")
        await customer.send(type="message", id="m1", text="Where is my refund?")
        await gina.expect(assigned(conversation), "assigned to gina")
        await gina.send(type="open", conversation_id=conversation)

        # A note, and its resend (same id): one note, the same command.
        await gina.send(type="note", conversation_id=conversation, text=secret, id="n1")
        first = await gina.expect(is_type("ack", command="note", id="n1"), "note ack")
        gina.forget()
        await gina.send(type="note", conversation_id=conversation, text=secret, id="n1")
        again = await gina.expect(is_type("ack", command="note", id="n1"), "resend ack")
        assert again["command_id"] == first["command_id"]
        shown = await gina.expect(
            conversation_with(
                conversation, lambda f: any(m["role"] == "note" for m in f["messages"])
            ),
            "the note in the console",
        )
        [note] = [m for m in shown["messages"] if m["role"] == "note"]
        assert note["text"] == secret and note["author"] == "gina"

        # Any agent of the tenant may add one, assigned or not (hal is in billing).
        hal = Socket(await login(pipeline, TENANT, "hal", "hal-token"))
        await hal.expect(is_type("welcome"), "hal's welcome")
        await hal.send(type="note", conversation_id=conversation, text="Called them back", id="h1")
        await hal.expect(is_type("ack", command="note", id="h1"), "hal's note ack")
        # ...but not reply to it, nor note a conversation that does not exist.
        await hal.send(type="reply", conversation_id=conversation, text="hi", id="hr")
        assert "not assigned" in (await hal.expect(is_type("error", id="hr"), "refused"))["reason"]
        await hal.send(type="note", conversation_id="web-nope", text="x", id="h2")
        assert "no such" in (await hal.expect(is_type("error", id="h2"), "unknown"))["reason"]
        await hal.socket.close()

        # The reply after the notes reaches the customer; the notes never do.
        await gina.send(type="reply", conversation_id=conversation, text="Refund sent.", id="r1")
        await customer.expect(is_type("reply", text="Refund sent."), "the reply")
        final = await gina.expect(
            conversation_with(
                conversation,
                lambda f: (
                    [m["role"] for m in f["messages"]] == ["customer", "note", "note", "agent"]
                ),
            ),
            "customer message, two notes, the reply",
        )
        assert final["state"]["last_message"] == "Refund sent."
        await customer.socket.close()
        # A new socket's history: no note either.
        async with websockets.connect(chat_url) as again_socket:
            history = json.loads(await again_socket.recv())
        assert history["type"] == "history"
        assert [m["role"] for m in history["messages"]] == ["customer", "agent"]
        frames = json.dumps(customer.frames, ensure_ascii=False) + json.dumps(history)
        assert secret not in frames and "Called them back" not in frames
        await gina.send(type="close", conversation_id=conversation)
        await gina.expect(not_assigned(conversation), "closed")
        await gina.socket.close()

    asyncio.run(run())

    # The tenant's REST view of the conversation: no note.
    with httpx.Client(base_url=http_base(pipeline), timeout=10) as http:
        view = http.get(
            f"/v1/conversations/{conversation}", headers={"X-API-Key": "desk3-test-key"}
        )
    assert view.status_code == 200, view.text
    assert [m["role"] for m in view.json()["messages"]] == ["customer", "agent"]
    assert secret not in view.text

    # On the log: NoteAdded events of their own, one per note (the resend dropped).
    events = asyncio.run(read_events(pipeline, TopicNames(pipeline.topic_prefix).events))
    notes = [e for e in events if isinstance(e, NoteAdded) and e.conversation_id == conversation]
    assert [(n.author, n.text) for n in notes] == [("gina", secret), ("hal", "Called them back")]


def test_canned_responses_follow_the_configuration_live(pipeline: Settings) -> None:
    key = f"refund-{uuid.uuid4().hex[:6]}"

    def has(frame: dict[str, Any], text: str) -> bool:
        return any(c["id"] == key and c["text"] == text for c in frame.get("canned", []))

    async def run() -> None:
        gina = Socket(await login(pipeline, TENANT, "gina", "gina-token"))
        welcome = await gina.expect(is_type("welcome"), "welcome")
        assert all(c["id"] != key for c in welcome["canned"])
        entity = {
            "title": "退款进度",
            "shortcut": "tk",
            "text": "您的退款已提交，3 个工作日内到账。",
        }
        await asyncio.to_thread(
            publish, pipeline, config_record(TENANT, "canned", key, entity, "admin")
        )
        added = await gina.expect(
            lambda f: f["type"] == "canned" and has(f, entity["text"]), "the new canned response"
        )
        [shown] = [c for c in added["canned"] if c["id"] == key]
        assert shown == {"id": key, **entity}
        changed = {**entity, "text": "Your refund is on its way."}
        record = config_record(TENANT, "canned", key, changed, "admin", previous_version=1)
        await asyncio.to_thread(publish, pipeline, record)
        await gina.expect(lambda f: f["type"] == "canned" and has(f, changed["text"]), "changed")
        gone = config_record(TENANT, "canned", key, None, "admin", previous_version=record.version)
        await asyncio.to_thread(publish, pipeline, gone)
        await gina.expect(
            lambda f: f["type"] == "canned" and all(c["id"] != key for c in f["canned"]), "deleted"
        )
        # Another login sees today's list in its welcome.
        await gina.socket.close()

    asyncio.run(run())


def test_search_and_profile_come_from_clickhouse_scoped_to_the_tenant(pipeline: Settings) -> None:
    who = f"prof-{uuid.uuid4().hex[:8]}"
    word = f"parcel{uuid.uuid4().hex[:6]}"

    async def run() -> None:
        gina = await online(pipeline, TENANT, "gina")
        conversation = await asyncio.to_thread(
            customer_says, pipeline, TENANT, who, f"My {word} arrived broken"
        )
        await gina.expect(assigned(conversation), "assigned")
        await gina.send(type="note", conversation_id=conversation, text="photo asked", id="p1")
        await gina.send(type="reply", conversation_id=conversation, text="Sorry!", id="p2")
        await gina.send(type="close", conversation_id=conversation, reason="resolved")
        await gina.expect(is_type("ack", command="close"), "closed")
        await gina.expect(not_assigned(conversation), "off the list")
        # Back again: the same conversation id reopens, a second session. The frames seen so far
        # include the first session's "assigned" snapshot, so wait for a new one.
        gina.forget()
        await asyncio.to_thread(customer_says, pipeline, TENANT, who, "It happened again")
        await gina.expect(assigned(conversation), "reopened and assigned")

        async def answer(kind: str, frame: dict[str, Any], done: Any) -> dict[str, Any]:
            """Ask again until ClickHouse has what the log holds (its batches lag)."""
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while True:
                gina.forget()
                await gina.send(**frame)
                got = await gina.expect(lambda f: f["type"] in (kind, "error"), kind)
                assert got["type"] == kind, got
                if done(got):
                    return got
                assert loop.time() < deadline, got

        found = await answer(
            "search",
            {"type": "search", "query": word.upper(), "id": "s1"},
            lambda f: any(r["conversation_id"] == conversation for r in f["results"]),
        )
        [hit] = [r for r in found["results"] if r["conversation_id"] == conversation]
        assert hit["customer_id"] == who and hit["channel"] == "web"
        assert word in hit["snippet"] and hit["status"] == "open"
        # By customer id, and by a note's words.
        by_id = await answer(
            "search", {"type": "search", "query": who}, lambda f: len(f["results"]) >= 1
        )
        assert [r["conversation_id"] for r in by_id["results"]] == [conversation]
        by_note = await answer(
            "search",
            {"type": "search", "query": "photo asked"},
            lambda f: any(r["conversation_id"] == conversation for r in f["results"]),
        )
        assert any(r["note"] for r in by_note["results"] if r["conversation_id"] == conversation)
        # Quotes are data, not SQL.
        odd = await answer("search", {"type": "search", "query": "x' OR 1=1 --"}, lambda f: True)
        assert odd["results"] == []

        profile = await answer(
            "profile",
            {"type": "profile", "conversation_id": conversation},
            lambda f: f["conversations"] == 2 and len(f["history"]) == 2,
        )
        assert profile["customer_id"] == who and profile["channel"] == "web"
        latest, past = profile["history"]
        assert latest["current"] and not latest["closed"]
        assert latest["first_message"] == "It happened again"
        assert past["closed"] and past["closed_reason"] == "resolved"
        assert past["first_message"] == f"My {word} arrived broken" and past["agents"] == "gina"
        assert profile["first_seen"] == past["started_at"] <= latest["started_at"]

        # Another tenant's agent finds nothing of it, and cannot see its profile.
        iris = Socket(await login(pipeline, "desk5", "iris", "iris-token"))
        await iris.expect(is_type("welcome"), "iris")
        await iris.send(type="search", query=word, id="x1")
        other = await iris.expect(lambda f: f.get("id") == "x1", "iris's search")
        assert other["type"] == "search" and other["results"] == []
        await iris.send(type="profile", conversation_id=conversation)
        refused = await iris.expect(is_type("error", conversation_id=conversation), "refused")
        assert "no such" in refused["reason"]
        await iris.socket.close()

        await gina.send(type="close", conversation_id=conversation)
        await gina.expect(not_assigned(conversation), "closed again")
        await gina.socket.close()

    asyncio.run(run())


def test_the_session_cookie_logs_the_console_in(pipeline: Settings) -> None:
    agent, email, password = "ivy", f"ivy-{uuid.uuid4().hex[:6]}@desk3.example", "ivy-pass-123"
    write_account(pipeline, TENANT, agent, email, password, "Ivy")
    cookie, csrf = sign_in(pipeline, TENANT, email, password)
    host = f"{pipeline.gateway.host}:{pipeline.gateway.port}"
    url = f"{ws_base(pipeline)}/v1/console/ws"

    async def closed_with(headers: dict[str, str]) -> int | None:
        async with websockets.connect(url, additional_headers=headers) as socket:
            await socket.send('{"type": "login"}')
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(socket.recv(), 30)
            return closed.value.rcvd.code if closed.value.rcvd else None

    async def run() -> None:
        same_origin = {"Cookie": f"{COOKIE}={cookie}", "Origin": f"http://{host}"}
        async with websockets.connect(url, additional_headers=same_origin) as raw:
            socket = Socket(raw)
            await socket.send(type="login")
            welcome = await socket.expect(is_type("welcome"), "welcome by session")
            assert welcome["agent"] == agent and welcome["tenant"] == TENANT
            assert welcome["via"] == "session" and welcome["csrf"] == csrf
            assert welcome["role"] == "agent" and welcome["name"] == "Ivy"
        # No cookie, a made-up one, or the session from another site's page: refused.
        assert await closed_with({}) == 4401
        assert await closed_with({"Cookie": f"{COOKIE}={TENANT}.{'x' * 43}"}) == 4401
        foreign = {"Cookie": f"{COOKIE}={cookie}", "Origin": "https://shop.desk3.example"}
        assert await closed_with(foreign) == 4403

    asyncio.run(run())

    # Uploads with the cookie need its CSRF token; with it, the usual checks follow.
    form = {"tenant": TENANT, "agent": agent, "conversation_id": "web-none"}
    files = {"file": ("a.txt", b"hello", "text/plain")}
    with httpx.Client(base_url=http_base(pipeline), timeout=10) as http:
        http.cookies.set(COOKIE, cookie)
        bare = http.post("/v1/console/uploads", data=form, files=files)
        assert bare.status_code == 403 and "CSRF" in bare.text
        checked = http.post(
            "/v1/console/uploads", data=form, files=files, headers={"X-CSRF-Token": csrf}
        )
        assert checked.status_code == 404  # signed in; that conversation does not exist


# ---------------------------------------------------------------- the browser


LANGUAGES = {
    "zh": {
        "locale": "zh-CN",
        "tenant": "desk4",
        "agent": "hank",
        "name": "韩梅",
        "first": "你好，我的订单 8812 还没有到",
        "again": "快递员说找不到地址",
        "other": "在吗？|我想改一下收货地址",
        "canned_title": "物流查询",
        "canned_text": "您好，我已为您查询物流，包裹预计明天送达。",
        "note": "客户第二次来问，已联系快递加急",
        "status_closed": "已结束",
        "heading": "历史会话",
        "send": "发送",
        "note_button": "添加备注",
        "colleague": "露西",
        "colleague_note": "我来跟进这位客户的退款",
        "assigned_to": "分配给 韩梅",
    },
    "en": {
        "locale": "en-US",
        "tenant": "desk5",
        "agent": "iris",
        "name": "Iris",
        "first": "Hello, my order 8812 has not arrived",
        "again": "The courier says he cannot find the address",
        "other": "Hello?|I want to change the delivery address",
        "canned_title": "Delivery status",
        "canned_text": "I have checked with the courier: your parcel arrives tomorrow.",
        "note": "Second time they ask; courier asked to hurry",
        "status_closed": "closed",
        "heading": "Past conversations",
        "send": "Send",
        "note_button": "Add note",
        "colleague": "Lucy Gray",
        "colleague_note": "I'll follow up on this customer's refund",
        "assigned_to": "assigned to Iris",
    },
}


@pytest.fixture
def browser() -> Any:
    import playwright.sync_api as sync_api

    with sync_api.sync_playwright() as p:
        chromium = launch(p)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.mark.parametrize("language", ["zh", "en"])
def test_console_features_in_chromium(pipeline: Settings, browser: Any, language: str) -> None:
    words = LANGUAGES[language]
    tenant, agent = words["tenant"], words["agent"]
    base = http_base(pipeline)
    errors: list[str] = []
    canned_key = f"ship-{uuid.uuid4().hex[:6]}"
    publish(
        pipeline,
        config_record(
            tenant,
            "canned",
            canned_key,
            {"title": words["canned_title"], "shortcut": "ship", "text": words["canned_text"]},
            "admin",
        ),
        # A colleague known to the configuration by a display name.
        config_record(
            tenant,
            "agent",
            "lucy",
            {"name": words["colleague"], "role": "agent", "teams": ["default"], "capacity": 2},
            "admin",
        ),
    )
    context = browser.new_context(locale=words["locale"], viewport={"width": 1440, "height": 860})
    context.grant_permissions(["notifications"], origin=base)
    try:
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        if language == "zh":
            # Signed in with email and password: the session cookie logs the console in.
            email, password = f"{agent}-{uuid.uuid4().hex[:6]}@{tenant}.example", "pass-word-8812"
            write_account(pipeline, tenant, agent, email, password, words["name"])
            wait_for(
                lambda: (
                    page.request.post(
                        f"{base}/v1/auth/login",
                        data={"tenant": tenant, "email": email, "password": password},
                    ).ok
                ),
                20,
                "signed in",
            )
            page.goto(f"{base}/console")
        else:
            page.goto(f"{base}/console?tenant={tenant}&agent={agent}")
            page.fill("#token", f"{agent}-token")
            page.click("#login-btn")
        page.wait_for_selector("body[data-state=ready]", timeout=30_000)
        assert page.get_attribute("html", "lang") == ("zh-CN" if language == "zh" else "en")
        assert page.get_attribute("body", "data-via") == (
            "session" if language == "zh" else "token"
        )
        page.click("#notify-btn")  # a gesture: notifications (granted here) and sound
        page.wait_for_selector("#notify-btn[aria-pressed=true]", timeout=10_000)
        page.click("button[data-presence=online]")
        page.wait_for_selector("body[data-presence=online]", timeout=45_000)

        # A new conversation: the list shows it, and the console alerts.
        who = f"{language}-{uuid.uuid4().hex[:6]}"
        conversation = customer_says(pipeline, tenant, who, words["first"])
        row = f'#assigned li[data-conversation-id="{conversation}"]'
        page.wait_for_selector(row, timeout=60_000)
        page.wait_for_function(
            f"document.body.dataset.lastAlert === {json.dumps(conversation)}", timeout=30_000
        )
        page.click(row)
        page.wait_for_selector("#messages .msg.customer", timeout=30_000)

        # "/" opens the canned responses; typing filters; Enter inserts the text.
        page.focus("#reply-text")
        page.keyboard.type("/shi")
        page.wait_for_selector("#canned:not([hidden]) li[role=option]", timeout=10_000)
        assert words["canned_title"] in (page.text_content("#canned") or "")
        page.keyboard.press("Enter")
        assert page.input_value("#reply-text") == words["canned_text"]
        assert page.is_hidden("#canned")
        page.keyboard.press("Control+Enter")
        page.wait_for_selector("#messages .msg.agent", timeout=30_000)

        # An internal note: Alt+N switches the composer; shown apart, as a note.
        page.keyboard.press("Alt+n")
        page.wait_for_selector("body[data-mode=note]", timeout=5_000)
        assert page.text_content("#reply-btn") == words["note_button"]
        page.fill("#reply-text", words["note"])
        page.keyboard.press("Enter")
        page.wait_for_selector("#messages .msg.note", timeout=30_000)
        assert words["note"] in (page.text_content("#messages .msg.note") or "")
        page.click("#mode-reply")
        assert page.text_content("#reply-btn") == words["send"]
        # Agents by display name: the assignee, a colleague's note, the transfer list;
        # a tenant without AI has no "hand back to AI".
        assert words["assigned_to"] in (page.text_content("#pane-meta") or "")
        colleague_notes(pipeline, tenant, conversation, "lucy", words["colleague_note"])
        page.wait_for_selector("#messages .msg.note >> nth=1", timeout=30_000)
        by = page.locator("#messages .msg.note .by").nth(1).text_content() or ""
        assert words["colleague"] in by and "lucy" not in by, by
        assert page.get_attribute("#agent-names option[value=lucy]", "label") == words["colleague"]
        assert page.get_attribute("body", "data-ai") == "false"
        assert page.is_hidden("#handback-btn")

        # Close it, the customer comes back: the profile lists both conversations.
        page.click("#close-btn")
        page.wait_for_selector(row, state="detached", timeout=60_000)
        page.wait_for_selector('#pane[data-status="closed"]', timeout=30_000)
        customer_says(pipeline, tenant, who, words["again"])
        page.wait_for_selector(row, timeout=60_000)
        page.wait_for_selector('#pane[data-status="open"]', timeout=30_000)
        page.wait_for_function(
            "document.querySelectorAll('#history li[data-conversation-id]').length === 2",
            timeout=60_000,
        )
        assert words["heading"] in (page.text_content("#side") or "")
        assert words["status_closed"] in (page.text_content("#history") or "")

        # Another customer writes twice, unopened: an unread count on its row.
        other = customer_says(pipeline, tenant, f"{who}-b", *words["other"].split("|"))
        other_row = f'#assigned li[data-conversation-id="{other}"]'
        page.wait_for_selector(f"{other_row} .badge.unread", timeout=60_000)
        assert page.text_content(f"{other_row} .badge.unread") == "2"

        # Search (ClickHouse): the first message's words find the conversation.
        page.fill("#search", "8812")
        page.keyboard.press("Enter")
        page.wait_for_selector(
            f'#results li[data-conversation-id="{conversation}"]', timeout=60_000
        )
        assert "8812" in (page.text_content("#results mark") or "")

        # Keyboard: Alt+↓ walks the list, "?" shows the shortcuts, Esc hides them.
        page.focus("#messages")
        page.keyboard.press("?")
        page.wait_for_selector("#help:not([hidden])", timeout=5_000)
        page.keyboard.press("Escape")
        page.wait_for_selector("#help", state="hidden", timeout=5_000)
        page.click(f'#assigned li[data-conversation-id="{conversation}"]')
        page.keyboard.press("Alt+ArrowDown")
        page.wait_for_selector(f"{other_row}.selected", timeout=5_000)
        page.wait_for_selector(f'#pane[data-conversation-id="{other}"]', timeout=30_000)
        assert page.locator(f"{other_row} .badge.unread").count() == 0  # read now
        page.keyboard.press("Alt+ArrowUp")
        page.wait_for_selector(f'#pane[data-conversation-id="{conversation}"]', timeout=30_000)
        page.wait_for_selector("#messages .msg.note", timeout=30_000)
        page.wait_for_selector("#history li.current", timeout=30_000)
        # The other customer writes again while another conversation is open: unread.
        customer_says(pipeline, tenant, f"{who}-b", words["other"].split("|")[0])
        page.wait_for_selector(f"{other_row} .badge.unread", timeout=60_000)
        assert page.text_content(f"{other_row} .badge.unread") == "1"
        page.wait_for_function("document.getElementById('toast').style.display === 'none'")

        # The picture: the canned menu open over a conversation with a note, the
        # profile, search results and an unread badge.
        page.focus("#reply-text")
        page.keyboard.type("/")
        page.wait_for_selector("#canned:not([hidden]) li[role=option]", timeout=10_000)
        DOCS.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS / f"console-features-{language}.png"))
        page.keyboard.press("Escape")
        assert page.is_hidden("#canned")

        # The switch changes the language on the spot.
        other_language = "en" if language == "zh" else "zh"
        page.select_option("#lang", other_language)
        expected = LANGUAGES[other_language]["heading"]
        page.wait_for_function(
            f"document.getElementById('side').textContent.includes({json.dumps(expected)})",
            timeout=5_000,
        )

        # Free the agent: close both.
        for conv in (conversation, other):
            page.click(f'#assigned li[data-conversation-id="{conv}"]')
            page.wait_for_selector(f'#pane[data-conversation-id="{conv}"]', timeout=30_000)
            page.click("#close-btn")
            page.wait_for_selector(
                f'#assigned li[data-conversation-id="{conv}"]', state="detached", timeout=60_000
            )
    finally:
        context.close()
    assert errors == []
