"""No tenant reaches another's data: tenant B (iso-b) tries to read and write tenant A's
(iso-a) conversation through every route of the gateway (taken from the app, so a new
route without a case here fails), both WebSockets and the dashboard queries; then the
log, Redis and ClickHouse are checked: nothing of A shown to B, nothing published by B
onto A's conversation, every key and row carries its tenant.

WeChat and Telegram callbacks carry the tenant in the path and authenticate by that
tenant's own secret: the same checks run with wx (A) and wxh (B), which have them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
import redis
import websockets
from starlette.routing import Mount

from connectors.gateway import GatewayConfig, create_app
from connectors.identity import conversation_id_for
from connectors.wechat import signature
from kefu.settings import Settings
from projections.clickhouse_query import AnalyticsClient
from schemas.codec import CODEC
from schemas.headers import tenant_of
from schemas.keys import agents_key, conversation_key, messages_key
from schemas.topics import TopicNames
from tests.conftest import wait_for
from tests.kafka_helpers import read_records
from tests.test_fuzz_endpoints import TopicWatch

A, B = "iso-a", "iso-b"
A_KEY, B_KEY = {"X-Api-Key": "iso-a-test-key"}, {"X-Api-Key": "iso-b-test-key"}
B_ADMIN = {"X-Admin-Key": "iso-b-admin-key"}
A_ADMIN = {"X-Admin-Key": "iso-a-admin-key"}
# Pages, documents and operations endpoints: no tenant data behind them.
PUBLIC = {
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/chat"),
    ("GET", "/widget.js"),
    ("GET", "/v1/chat/visitor"),  # a new random visitor id: nothing of any tenant's
    ("GET", "/console"),
    ("GET", "/dashboard"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("MOUNT", "/static-offline-docs"),  # Swagger UI's and ReDoc's own scripts
    ("GET", "/admin"),
    ("GET", "/login"),
}


def all_routes() -> set[tuple[str, str]]:
    """Every (method, path) the gateway serves, WebSockets as ("WS", path)."""
    app = create_app(GatewayConfig(bootstrap="", commands_topic="", redis_url="", api_keys={}))
    found: set[tuple[str, str]] = set()

    def walk(routes: list[Any]) -> None:
        for route in routes:
            inner = getattr(route, "original_router", None)
            if inner is not None:
                walk(list(inner.routes))
            elif isinstance(route, Mount):
                found.add(("MOUNT", route.path))
            elif getattr(route, "methods", None):
                found.update((m, route.path) for m in route.methods if m != "HEAD")
            elif hasattr(route, "path"):
                found.add(("WS", route.path))

    walk(list(app.routes))
    return found


@dataclass
class Setup:
    http: httpx.Client
    conversation: str  # A's REST conversation
    customer: str
    web_customer: str
    web_conversation: str
    messages: int  # A's REST conversation's messages in the read model before B acts


def gateway(settings: Settings) -> httpx.Client:
    g = settings.gateway
    return httpx.Client(base_url=f"http://{g.host}:{g.port}", timeout=30)


def ws_base(settings: Settings) -> str:
    g = settings.gateway
    return f"ws://{g.host}:{g.port}"


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis.dsn, decode_responses=True)


def queued_at(settings: Settings, conversation: str) -> str | None:
    value = redis_client(settings).hget(conversation_key(A, conversation), "queued_at")
    return str(value) if value else None


def message_count(settings: Settings, tenant: str, conversation: str) -> int:
    return len(redis_client(settings).lrange(messages_key(tenant, conversation), 0, -1))


@pytest.fixture(scope="module")
def setup(pipeline: Settings) -> Iterator[Setup]:
    customer = f"iso-{uuid.uuid4().hex[:8]}"
    with gateway(pipeline) as http:
        accepted = http.post(
            "/v1/messages",
            json={"customer_id": customer, "text": "A's private question", "message_id": "a1"},
            headers=A_KEY,
        )
        assert accepted.status_code == 202, accepted.text
        conversation = accepted.json()["conversation_id"]
        web_customer = f"{customer}-web"

        async def web() -> None:
            url = f"{ws_base(pipeline)}/v1/chat/ws?tenant={A}&customer={web_customer}"
            async with websockets.connect(url) as socket:
                await socket.recv()
                await socket.send(json.dumps({"type": "message", "id": "w1", "text": "A web"}))
                while json.loads(await asyncio.wait_for(socket.recv(), 30))["type"] != "ack":
                    pass

        asyncio.run(web())
        web_conversation = conversation_id_for(A, "web", web_customer)
        wait_for(lambda: message_count(pipeline, A, conversation) >= 1, 60, "A's conversation")
        wait_for(lambda: message_count(pipeline, A, web_conversation) >= 1, 60, "A's web chat")
        # And routed to the end (A is human-only: queued, no agent online), so A's own
        # router publishes nothing for them while B acts: what the watch then sees
        # touching A's conversations, B caused.
        for routed in (conversation, web_conversation):
            wait_for(partial(queued_at, pipeline, routed), 60, "A's conversation queued")
        yield Setup(
            http,
            conversation,
            customer,
            web_customer,
            web_conversation,
            message_count(pipeline, A, conversation),
        )


# ------------------------------------------------------------ one case per route


def case_messages(s: Setup, settings: Settings) -> None:
    # B cannot address A's conversation: the id derives from B's own tenant.
    got = s.http.post(
        "/v1/messages",
        json={"customer_id": s.customer, "text": "B writes", "message_id": "a1"},
        headers=B_KEY,
    )
    assert got.status_code == 202 and got.json()["conversation_id"] != s.conversation
    extra = {"customer_id": s.customer, "text": "x", "conversation_id": s.conversation}
    assert s.http.post("/v1/messages", json=extra, headers=B_KEY).status_code == 422


def case_get_conversation(s: Setup, settings: Settings) -> None:
    for conversation in (s.conversation, s.web_conversation):
        for headers in (B_KEY, {"X-Api-Key": "iso-b-second-key"}):
            got = s.http.get(f"/v1/conversations/{conversation}", headers=headers)
            assert got.status_code == 404 and "private" not in got.text, got.text
    # A sees it (the case is meaningful).
    assert s.http.get(f"/v1/conversations/{s.conversation}", headers=A_KEY).status_code == 200


def _action(path: str, body: dict[str, Any]) -> Any:
    def case(s: Setup, settings: Settings) -> None:
        for conversation in (s.conversation, s.web_conversation):
            url = path.replace("{conversation_id}", conversation)
            for headers in (B_KEY, B_ADMIN, {"Authorization": "Bearer bob-token"}):
                got = s.http.post(url, json=body, headers=headers)
                assert got.status_code in (401, 404), (url, got.status_code, got.text)

    return case


def case_presence(s: Setup, settings: Settings) -> None:
    # B may set presence only in B: "ann" of B is another agent than A's ann.
    before = redis_client(settings).hget(agents_key(A), "ann")
    got = s.http.put("/v1/agents/ann/presence", json={"presence": "online"}, headers=B_KEY)
    assert got.status_code == 202, got.text
    wait_for(lambda: redis_client(settings).hget(agents_key(B), "ann"), 60, "B's own ann")
    assert redis_client(settings).hget(agents_key(A), "ann") == before


def case_admin_presence(s: Setup, settings: Settings) -> None:
    before = redis_client(settings).hget(agents_key(A), "ann")
    got = s.http.put("/v1/admin/agents/ann/presence", json={"presence": "away"}, headers=B_ADMIN)
    assert got.status_code == 202, got.text
    wait_for(
        lambda: '"away"' in (redis_client(settings).hget(agents_key(B), "ann") or ""),
        60,
        "B's own ann away",
    )
    assert redis_client(settings).hget(agents_key(A), "ann") == before


def case_admin_agents(s: Setup, settings: Settings) -> None:
    got = s.http.get("/v1/admin/agents", headers=B_ADMIN)
    assert got.status_code == 200 and got.json()["tenant"] == B
    redis_client(settings).hset(agents_key(A), "a-only-agent", json.dumps({"presence": "away"}))
    assert "a-only-agent" not in s.http.get("/v1/admin/agents", headers=B_ADMIN).text


def case_admin_keys(s: Setup, settings: Settings) -> None:
    issued = s.http.post("/v1/admin/keys", json={"label": "a"}, headers=A_ADMIN).json()
    listed = s.http.get("/v1/admin/keys", headers=B_ADMIN)
    assert listed.status_code == 200 and issued["id"] not in listed.text
    # B's new key is B's: A's conversation stays out of reach.
    b_key = s.http.post("/v1/admin/keys", json={}, headers=B_ADMIN).json()["key"]
    got = s.http.get(f"/v1/conversations/{s.conversation}", headers={"X-Api-Key": b_key})
    assert got.status_code == 404
    # A's key cannot be revoked by B, and still works.
    gone = s.http.delete(f"/v1/admin/keys/{issued['id']}", headers=B_ADMIN)
    assert gone.status_code == 404
    a_key = {"X-Api-Key": issued["key"]}
    assert s.http.get(f"/v1/conversations/{s.conversation}", headers=a_key).status_code == 200


def case_privacy_erase(s: Setup, settings: Settings) -> None:
    # B's admin cannot erase A's customer: B has no such customer; A's words stay.
    got = s.http.post("/v1/admin/privacy/erase", json={"customer_id": s.customer}, headers=B_ADMIN)
    if got.status_code == 200:
        # Unless B stored a file for its own customer of that id (case_files): the
        # upload made B's data key for B's customer, and B erases that one only.
        assert got.json()["tenant"] == B and got.json()["conversations"] == [], got.text
    else:
        assert got.status_code == 404, got.text
    mine = s.http.get(f"/v1/conversations/{s.conversation}", headers=A_KEY)
    assert mine.status_code == 200 and "A's private question" in mine.text


def case_dashboard_catalogue(s: Setup, settings: Settings) -> None:
    got = s.http.get("/v1/dashboard/reports", headers=B_KEY)
    assert got.status_code == 200 and got.json()["tenant"] == B


def case_dashboard_report(s: Setup, settings: Settings) -> None:
    names = [
        r["name"] for r in s.http.get("/v1/dashboard/reports", headers=B_KEY).json()["reports"]
    ]
    assert names
    since = int(time.time() * 1000) - 3_600_000
    for name in names:
        url = f"/v1/dashboard/reports/{name}?since={since}"
        mine = s.http.get(url, headers=B_KEY)
        assert mine.status_code == 200, mine.text
        # A tenant parameter is ignored: the key decides.
        sneaky = s.http.get(f"{url}&tenant={A}", headers=B_KEY)
        assert sneaky.status_code == 200
        for response in (mine, sneaky):
            text = json.dumps(response.json()["rows"])
            assert s.conversation not in text and s.customer not in text and A not in text


def _wechat(mini: bool, method: str) -> Any:
    prefix = "/v1/wechat-mp" if mini else "/v1/wechat"

    def case(s: Setup, settings: Settings) -> None:
        # Signed with B's (wxh's) token, sent to A's (wx's) callback.
        timestamp, nonce = str(int(time.time())), "n1"
        params = {
            "signature": signature("wxh-token", timestamp, nonce),
            "timestamp": timestamp,
            "nonce": nonce,
            "echostr": "e",
        }
        body = "<xml><ToUserName>x</ToUserName><FromUserName>u</FromUserName>" + (
            "<CreateTime>1</CreateTime><MsgType>text</MsgType><Content>B</Content>"
            "<MsgId>1</MsgId></xml>"
        )
        got = s.http.request(
            method,
            f"{prefix}/wx/callback",
            params=params,
            content=body if method == "POST" else None,
        )
        assert got.status_code in (401, 403), got.text

    return case


def case_telegram(s: Setup, settings: Settings) -> None:
    update = {"update_id": 1, "message": {"message_id": 1, "chat": {"id": 1}, "text": "B"}}
    got = s.http.post(
        "/v1/telegram/wx/webhook",
        json=update,
        headers={"X-Telegram-Bot-Api-Secret-Token": "tg-secret-h"},  # wxh's secret
    )
    assert got.status_code == 403, got.text


def case_chat_socket(s: Setup, settings: Settings) -> None:
    async def run() -> None:
        # B's socket for A's customer id: B's own conversation, no history of A's.
        url = f"{ws_base(settings)}/v1/chat/ws?tenant={B}&customer={s.web_customer}"
        async with websockets.connect(url) as socket:
            history = json.loads(await socket.recv())
            assert history["conversation_id"] != s.web_conversation
            assert history["messages"] == []
            await socket.send(json.dumps({"type": "message", "id": "b1", "text": "B web"}))
            while json.loads(await asyncio.wait_for(socket.recv(), 30))["type"] != "ack":
                pass
            # A rating from B's socket can only be of B's own (open) conversation.
            await socket.send(json.dumps({"type": "rate", "id": "b-rate", "rating": 1}))
            while (frame := json.loads(await asyncio.wait_for(socket.recv(), 30)))["type"] != (
                "error"
            ):
                pass
            assert frame["id"] == "b-rate"

    asyncio.run(run())


def case_chat_settings(s: Setup, settings: Settings) -> None:
    """The chat page's public settings: B's list B's agents only, never A's."""
    got = s.http.get("/v1/chat/settings", params={"tenant": B})
    assert got.status_code == 200 and got.json()["tenant"] == B, got.text
    assert set(got.json()["agents"]) == {"bob"} and A not in got.text


def case_console_socket(s: Setup, settings: Settings) -> None:
    async def run() -> None:
        url = f"{ws_base(settings)}/v1/console/ws"
        # Bob's token does not log in to A.
        async with websockets.connect(url) as socket:
            await socket.send(
                json.dumps({"type": "login", "tenant": A, "agent": "bob", "token": "bob-token"})
            )
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(socket.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        async with websockets.connect(url) as socket:
            await socket.send(
                json.dumps({"type": "login", "tenant": B, "agent": "bob", "token": "bob-token"})
            )
            frames: list[dict[str, Any]] = []

            async def expect(kind: str) -> dict[str, Any]:
                while True:
                    frame: dict[str, Any] = json.loads(await asyncio.wait_for(socket.recv(), 15))
                    frames.append(frame)
                    if frame["type"] == kind:
                        return frame

            await expect("welcome")
            for conversation in (s.conversation, s.web_conversation):
                await socket.send(json.dumps({"type": "open", "conversation_id": conversation}))
                error = await expect("error")
                assert error["reason"] == "no such conversation"
                for frame in (
                    {"type": "reply", "conversation_id": conversation, "text": "B", "id": "r"},
                    {"type": "close", "conversation_id": conversation},
                    {"type": "handback", "conversation_id": conversation},
                    {"type": "transfer", "conversation_id": conversation, "team": "x"},
                    {"type": "typing", "conversation_id": conversation},
                ):
                    await socket.send(json.dumps(frame))
                    assert "not assigned" in (await expect("error"))["reason"]
                # A note or a profile needs the conversation in B's own tenant.
                for frame in (
                    {"type": "note", "conversation_id": conversation, "text": "B", "id": "n"},
                    {"type": "profile", "conversation_id": conversation},
                ):
                    await socket.send(json.dumps(frame))
                    assert (await expect("error"))["reason"] == "no such conversation"
                # Search reads B's rows only: none of A's conversations is found (B's
                # own conversations for the same customer ids may be: B made them).
                for query in (conversation, s.customer, s.web_customer):
                    await socket.send(json.dumps({"type": "search", "query": query}))
                    found = (await expect("search"))["results"]
                    mine = {s.conversation, s.web_conversation}
                    assert not [r for r in found if r["conversation_id"] in mine], found
            assert not any(f["type"] in ("conversation", "profile") for f in frames)
            assert s.conversation not in json.dumps([f for f in frames if f["type"] == "snapshot"])

    asyncio.run(run())


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 128, 0)).save(out, "PNG")
    return out.getvalue()


def case_files(s: Setup, settings: Settings) -> None:
    """Uploads and links: an upload id or a link of A's is worth nothing to B."""
    files = {"file": ("a.png", _png(), "image/png")}
    mine = s.http.post("/v1/uploads", data={"customer_id": s.customer}, files=files, headers=A_KEY)
    assert mine.status_code == 201, mine.text
    a_upload = mine.json()
    # B attaches A's upload to B's message for the same customer id: unknown to B.
    got = s.http.post(
        "/v1/messages",
        json={"customer_id": s.customer, "attachments": [a_upload["attachment_id"]]},
        headers=B_KEY,
    )
    assert got.status_code == 400 and "unknown" in got.text, got.text
    # B's own upload and web chat upload go to B's conversations, never A's.
    theirs = s.http.post(
        "/v1/uploads", data={"customer_id": s.customer}, files=files, headers=B_KEY
    ).json()
    chat = s.http.post(
        "/v1/chat/uploads", data={"tenant": B, "customer": s.web_customer}, files=files
    ).json()
    for upload in (theirs, chat):
        assert f"/v1/files/{B}/" in upload["url"] and s.conversation not in upload["url"]
    # B's signature does not open A's blob (the key is in the signature, per tenant).
    b_path, b_query = theirs["url"].split("?")
    a_key = a_upload["url"].split("?")[0].split("/v1/files/")[1]
    forged = s.http.get(f"/v1/files/{a_key}?{b_query}")
    assert forged.status_code == 403, forged.text
    assert s.http.get(f"{b_path}?{b_query}").status_code == 200  # B's own link works
    assert s.http.get(a_upload["url"]).status_code == 200  # and A's, for whoever has it


def case_console_upload(s: Setup, settings: Settings) -> None:
    """B's agent puts no file on A's conversations: A's tenant refuses B's token, and
    under B's own tenant A's conversation does not exist."""
    for conversation in (s.conversation, s.web_conversation):
        for tenant, refused in ((A, 401), (B, 404)):
            got = s.http.post(
                "/v1/console/uploads",
                data={"tenant": tenant, "agent": "bob", "conversation_id": conversation},
                files={"file": ("b.txt", b"B's file", "text/plain")},
                headers={"Authorization": "Bearer bob-token"},
            )
            assert got.status_code == refused, (tenant, got.status_code, got.text)


def case_admin_config(s: Setup, settings: Settings) -> None:
    """B's admin neither reads nor changes A's configuration: B's lists hold nothing of
    A's, A's ids under B are B's (none), and naming A (?tenant=) is refused."""
    http, tag = s.http, uuid.uuid4().hex[:6]
    a_team, a_agent, a_faq = f"a-team-{tag}", f"a-agent-{tag}", f"a-faq-{tag}"
    config = "/v1/admin/config"
    paths = (f"{config}/team/{a_team}", f"{config}/agent/{a_agent}", f"{config}/faq/{a_faq}")
    made = http.put(paths[0], json={"version": 0, "data": {"name": "A's"}}, headers=A_ADMIN)
    assert made.status_code == 200, made.text
    invited = http.post(
        f"{config}/agent/{a_agent}/invite",
        json={"name": "A", "email": f"{a_agent}@a.example", "teams": [a_team]},
        headers=A_ADMIN,
    )
    assert invited.status_code == 201, invited.text
    faq = {"question": "A's question", "answer": "A's private answer", "keywords": ["zebra"]}
    assert http.put(paths[2], json={"version": 0, "data": faq}, headers=A_ADMIN).status_code == 200
    a_key = http.post(f"{config}/keys", json={"label": "a"}, headers=A_ADMIN).json()
    before = [http.get(p, headers=A_ADMIN).json() for p in paths]
    for kind in ("team", "agent", "faq", "canned", "channel", "webhook", "hours", "widget"):
        got = http.get(f"{config}/{kind}", headers=B_ADMIN)
        assert got.status_code == 200 and got.json()["tenant"] == B, got.text
        assert tag not in got.text and A not in got.text
    tried = http.post(f"{config}/faq/try", json={"question": "zebra"}, headers=B_ADMIN)
    assert tried.status_code == 200 and "private" not in tried.text
    assert a_key["id"] not in http.get(f"{config}/keys", headers=B_ADMIN).text
    assert http.delete(f"{config}/keys/{a_key['id']}", headers=B_ADMIN).status_code == 404
    # A's ids, under B: B's own, which do not exist.
    for path in paths:
        assert http.get(path, headers=B_ADMIN).status_code == 404
        assert http.delete(f"{path}?version=1", headers=B_ADMIN).status_code == 404
    reset = http.post(f"{config}/agent/{a_agent}/password", json={}, headers=B_ADMIN)
    assert reset.status_code == 404
    # Naming A: refused on every route.
    at_a = f"tenant={A}"
    named: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", f"{config}/team?{at_a}", None),
        ("GET", f"{paths[0]}?{at_a}", None),
        ("PUT", f"{paths[0]}?{at_a}", {"version": 0, "data": {"name": "B"}}),
        ("DELETE", f"{paths[0]}?{at_a}&version=1", None),
        ("POST", f"{config}/agent/{a_agent}/password?{at_a}", {}),
        ("POST", f"{config}/agent/b-{tag}/invite?{at_a}", {"name": "B", "email": "b@b.example"}),
        ("POST", f"{config}/faq/try?{at_a}", {"question": "zebra"}),
        ("POST", f"{config}/webhook/test?{at_a}", {"url": "http://127.0.0.1:9/x"}),
        ("POST", f"{config}/channel/telegram/test?{at_a}", {}),
        ("GET", f"{config}/keys?{at_a}", None),
        ("POST", f"{config}/keys?{at_a}", {}),
        ("DELETE", f"{config}/keys/{a_key['id']}?{at_a}", None),
        ("GET", f"{config}/wordlists?{at_a}", None),
        ("PUT", f"{config}/wordlists/isotest?{at_a}", {"action": "flag", "words": ["zq"]}),
        ("GET", f"{config}/tenants", None),
        ("POST", f"{config}/tenants", {"id": f"iso-c-{tag}"}),
    ]
    for method, path, body in named:
        got = http.request(method, path, json=body, headers=B_ADMIN)
        assert got.status_code == 403, (method, path, got.status_code, got.text)
    # B's own word list and test delivery stay B's.
    own = {"action": "flag", "words": [f"zq{tag}"]}
    assert http.put(f"{config}/wordlists/isotest", json=own, headers=B_ADMIN).status_code == 200
    assert f"zq{tag}" not in http.get(f"{config}/wordlists", headers=A_ADMIN).text
    test = http.post(
        f"{config}/webhook/test", json={"url": "http://127.0.0.1:9/x"}, headers=B_ADMIN
    )
    assert test.status_code == 200
    # B's channel check tries B's credentials (none), never A's.
    check = http.post(f"{config}/channel/telegram/test", json={}, headers=B_ADMIN)
    assert check.status_code == 200 and check.json()["ok"] is False, check.text
    assert [http.get(p, headers=A_ADMIN).json() for p in paths] == before


def case_accounts(s: Setup, settings: Settings) -> None:
    """B's account signs in to B only, and its session is worth nothing in A."""
    http, agent = s.http, f"b-acc-{uuid.uuid4().hex[:6]}"
    email = f"{agent}@b.example"
    invited = http.post(
        f"/v1/admin/config/agent/{agent}/invite",
        json={"name": "B", "email": email, "role": "admin"},
        headers=B_ADMIN,
    )
    assert invited.status_code == 201, invited.text
    password = invited.json()["password"]
    wrong = {"tenant": A, "email": email, "password": password}
    assert http.post("/v1/auth/login", json=wrong).status_code == 401
    with httpx.Client(base_url=str(http.base_url), timeout=30) as browser:
        signed = browser.post("/v1/auth/login", json={**wrong, "tenant": B})
        assert signed.status_code == 200, signed.text
        csrf = {"X-CSRF-Token": signed.json()["csrf"]}
        assert browser.get("/v1/auth/session").json()["tenant"] == B
        assert browser.get(f"/v1/admin/config/team?tenant={A}").status_code == 403
        body = {"version": 0, "data": {"name": "B"}}
        put = browser.put(f"/v1/admin/config/team/x?tenant={A}", json=body, headers=csrf)
        assert put.status_code == 403
        # The cookie's session id under A's name is no session.
        session_id = browser.cookies["kefu_session"].rsplit(".", 1)[1]
        forged = {"kefu_session": f"{A}.{session_id}"}
        with httpx.Client(base_url=str(http.base_url), cookies=forged, timeout=30) as other:
            assert other.get("/v1/auth/session").status_code == 401
            assert other.get("/v1/admin/config/team").status_code == 401
        assert browser.post("/v1/auth/logout", headers=csrf).status_code == 200
    # Gone again, so B's agents are what the other cases expect.
    version = invited.json()["version"]
    gone = http.delete(f"/v1/admin/config/agent/{agent}?version={version}", headers=B_ADMIN)
    assert gone.status_code == 200, gone.text


CASES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/uploads"): case_files,
    ("POST", "/v1/chat/uploads"): case_files,
    ("GET", "/v1/files/{key:path}"): case_files,
    ("POST", "/v1/messages"): case_messages,
    ("GET", "/v1/conversations/{conversation_id}"): case_get_conversation,
    ("PUT", "/v1/agents/{agent_id}/presence"): case_presence,
    ("POST", "/v1/conversations/{conversation_id}/handoff"): _action(
        "/v1/conversations/{conversation_id}/handoff", {"to": "human", "requested_by": "b"}
    ),
    ("POST", "/v1/conversations/{conversation_id}/close"): _action(
        "/v1/conversations/{conversation_id}/close", {"closed_by": "b"}
    ),
    ("POST", "/v1/conversations/{conversation_id}/replies"): _action(
        "/v1/conversations/{conversation_id}/replies", {"agent_id": "bob", "text": "B"}
    ),
    ("POST", "/v1/conversations/{conversation_id}/rating"): _action(
        "/v1/conversations/{conversation_id}/rating", {"rating": 1}
    ),
    ("GET", "/v1/admin/keys"): case_admin_keys,
    ("POST", "/v1/admin/keys"): case_admin_keys,
    ("DELETE", "/v1/admin/keys/{key_id}"): case_admin_keys,
    ("GET", "/v1/admin/agents"): case_admin_agents,
    ("PUT", "/v1/admin/agents/{agent_id}/presence"): case_admin_presence,
    ("POST", "/v1/admin/privacy/erase"): case_privacy_erase,
    ("GET", "/v1/dashboard/reports"): case_dashboard_catalogue,
    ("GET", "/v1/dashboard/reports/{name}"): case_dashboard_report,
    ("GET", "/v1/wechat/{tenant}/callback"): _wechat(False, "GET"),
    ("POST", "/v1/wechat/{tenant}/callback"): _wechat(False, "POST"),
    ("GET", "/v1/wechat-mp/{tenant}/callback"): _wechat(True, "GET"),
    ("POST", "/v1/wechat-mp/{tenant}/callback"): _wechat(True, "POST"),
    ("POST", "/v1/telegram/{tenant}/webhook"): case_telegram,
    ("WS", "/v1/chat/ws"): case_chat_socket,
    ("GET", "/v1/chat/settings"): case_chat_settings,
    ("WS", "/v1/console/ws"): case_console_socket,
    ("POST", "/v1/console/uploads"): case_console_upload,
    ("POST", "/v1/auth/login"): case_accounts,
    ("POST", "/v1/auth/logout"): case_accounts,
    ("GET", "/v1/auth/session"): case_accounts,
    **{
        (method, f"/v1/admin/config{path}"): case_admin_config
        for method, path in (
            ("GET", "/tenants"),
            ("POST", "/tenants"),
            ("GET", "/{kind}"),
            ("GET", "/{kind}/{entity_id}"),
            ("PUT", "/{kind}/{entity_id}"),
            ("DELETE", "/{kind}/{entity_id}"),
            ("POST", "/agent/{agent_id}/invite"),
            ("POST", "/agent/{agent_id}/password"),
            ("GET", "/keys"),
            ("POST", "/keys"),
            ("DELETE", "/keys/{key_id}"),
            ("POST", "/webhook/test"),
            ("POST", "/channel/{channel}/test"),
            ("POST", "/faq/try"),
            ("GET", "/wordlists"),
            ("PUT", "/wordlists/{category}"),
        )
    },
}


def test_every_route_has_an_isolation_case() -> None:
    missing = sorted(all_routes() - set(CASES) - PUBLIC)
    assert missing == [], f"add a tenant-isolation case for {missing}"


def test_tenant_b_cannot_read_or_write_tenant_a(pipeline: Settings, setup: Setup) -> None:
    watch = TopicWatch(pipeline)
    try:
        start = watch.mark()
        done = set()
        for route in sorted(all_routes() - PUBLIC):
            case = CASES[route]
            if case in done:
                continue
            case(setup, pipeline)
            done.add(case)
        published = watch.published_since(start)
    finally:
        watch.close()
    # Nothing anyone published in the meantime touches A's conversations but A.
    mine = {setup.conversation, setup.web_conversation}
    onto_a = [r for r in published if getattr(r, "conversation_id", None) in mine]
    assert onto_a == [], [type(r).__name__ for r in onto_a]
    # A's read model did not move.
    assert message_count(pipeline, A, setup.conversation) == setup.messages
    state = redis_client(pipeline).hgetall(conversation_key(A, setup.conversation))
    assert state.get("status") != "closed"


def test_redis_keys_and_clickhouse_rows_carry_their_tenant(
    pipeline: Settings, setup: Setup
) -> None:
    client = redis_client(pipeline)
    for tenant in (A, B):
        keys = [k for k in client.scan_iter(match=f"*{tenant}*", count=1000)]
        assert keys
        for key in keys:
            namespace, owner, *_ = key.split(":")
            assert namespace.startswith("kefu") and owner == tenant, key
    b_keys = [k for k in client.scan_iter(match=f"*:{B}:*", count=1000)]
    for conversation in (setup.conversation, setup.web_conversation):
        assert not [k for k in b_keys if conversation in k]
    analytics = AnalyticsClient(pipeline.clickhouse_url, pipeline.clickhouse.query_port)

    def rows() -> list[list[Any]] | None:
        found = analytics.query(
            "SELECT DISTINCT tenant_id FROM kefu.events "
            f"WHERE conversation_id IN ('{setup.conversation}', '{setup.web_conversation}')"
        ).rows
        return found or None

    assert wait_for(rows, 60, "A's events in ClickHouse") == [[A]]
    _records_name_their_tenant(pipeline, {setup.conversation, setup.web_conversation})
    # Kafka: A's conversation's records are keyed by its conversation id.
    assert conversation_id_for(A, "api", setup.customer) == setup.conversation


def _records_name_their_tenant(settings: Settings, conversations: set[str]) -> None:
    """Every record of A's conversations names its tenant in a header
    (schemas/headers.py): what the gateway publishes and what the workers send."""
    names = TopicNames(settings.topic_prefix)
    seen: dict[str, int] = {}
    for topic in (names.commands, names.events, names.routing, names.queue_events):
        for record in asyncio.run(read_records(settings, topic)):
            if record.value is None:
                continue
            try:
                decoded = CODEC.decode_all(record.value)  # one record, or a commit's events
            except Exception:  # poison other tests put on the log
                continue
            # Only what kefu produced for these conversations: other tests put records
            # of their own (poison, hand-made commands) on the shared log.
            mine = [d for d in decoded if getattr(d, "conversation_id", None) in conversations]
            if not mine:
                continue
            for one in mine:  # every event of a commit names the record's tenant
                tenant = getattr(one, "tenant_id", None)
                assert tenant_of(record.headers) == tenant, (topic, record.offset)
            seen[topic] = seen.get(topic, 0) + 1
    # A's two conversations: commands in, events out (the worker's sends).
    assert seen.get(names.commands, 0) >= 2 and seen.get(names.events, 0) >= 2, seen
