"""Channel credentials, the webhook and new tenants live from the configuration
(connectors/live_channels.py, connectors/auth.py): the views as pure functions, then
through the running pipeline with no restart: a webhook URL set in the admin API gets
the next reply, a Telegram bot set there is accepted by the gateway and sent with by the
worker, an operator's new tenant has a widget, a disabled tenant is refused at every
edge, and the channels' "send a test message" check answers against the fakes.

Tenants "live" and "live-off" (tests/conftest.py): admin keys "<tenant>-admin-key",
API keys "<tenant>-test-key"; the operator is written onto the topic as test_accounts
does."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest
import websockets

from connectors.accounts import OPERATOR_TENANT, secret_context
from connectors.auth import AuthConfig, KeyRing
from connectors.config_log import SecretBox, config_record
from connectors.delivery import WebhookTarget
from connectors.live_channels import live_telegram, live_webhooks, live_wechat, telegram_tokens
from connectors.telegram import TelegramEdge
from connectors.wechat import WeChatAccount, WeChatEdge, signature
from kefu.settings import Settings
from schemas.config import SINGLE, ConfigState
from tests.conftest import wait_for
from tests.fake_http import LoopbackServer, port_of, serve, shutdown
from tests.fake_telegram import FakeTelegram
from tests.fake_wechat import FakeWeChat
from tests.test_accounts import base, login, sign_in, write_operator
from tests.test_admin_config import worker_entity

TENANT, OFF = "live", "live-off"
ADMIN = {"X-Admin-Key": "live-admin-key"}
BOX = SecretBox(b"unit-test-key")


def _apply(state: ConfigState, tenant: str, kind: str, entity_id: str, data: Any) -> None:
    sealed = BOX.seal_fields(data, secret_context(tenant, kind, entity_id))
    previous = state.version(tenant, kind, entity_id)
    state.apply(config_record(tenant, kind, entity_id, sealed, "test", previous))


# ------------------------------------------------------------------------- units


def test_webhook_view_takes_the_config_over_the_settings_field_by_field() -> None:
    state = ConfigState()
    env = {"t1": WebhookTarget("http://env.example/hook", b"env-secret")}
    view = live_webhooks(env, state, BOX)
    assert view["t1"] == env["t1"] and "t2" not in view
    _apply(state, "t1", "webhook", SINGLE, {"url": "http://cfg.example/hook"})
    assert view["t1"] == WebhookTarget("http://cfg.example/hook", b"env-secret")
    _apply(state, "t1", "webhook", SINGLE, {"url": "http://cfg.example/2", "secret": "cfg-s"})
    assert view["t1"] == WebhookTarget("http://cfg.example/2", b"cfg-s")
    # A tenant the settings do not know, configured only in /admin.
    _apply(state, "t2", "webhook", SINGLE, {"url": "http://t2.example/", "secret": "s2"})
    assert view.get("t2") == WebhookTarget("http://t2.example/", b"s2")
    assert sorted(view) == ["t1", "t2"]


def test_a_secret_that_does_not_open_leaves_the_setting() -> None:
    state = ConfigState()
    other = SecretBox(b"another-key")
    sealed = other.seal_fields({"bot_token": "1:cfg"}, secret_context("t1", "channel", "telegram"))
    state.apply(config_record("t1", "channel", "telegram", sealed, "test"))
    assert telegram_tokens({"t1": "1:env"}, state, BOX)["t1"] == "1:env"
    # Sealed for another entity: does not open here either.
    moved = BOX.seal_fields({"bot_token": "1:cfg"}, secret_context("t2", "channel", "telegram"))
    state.apply(config_record("t1", "channel", "telegram", moved, "test", 10**15))
    assert telegram_tokens({"t1": "1:env"}, state, BOX)["t1"] == "1:env"


def test_edges_read_credentials_live() -> None:
    state = ConfigState()
    env = TelegramEdge(secrets={"t1": "env-secret"}, bot_tokens={"t1": "1:env"})
    edge = live_telegram(env, state, BOX)
    assert edge.secrets.get("t1") == "env-secret" and edge.secrets.get("t2") is None
    # A secret token alone opens no webhook: a bot is needed too.
    _apply(state, "t2", "channel", "telegram", {"secret_token": "s2"})
    assert edge.secrets.get("t2") is None
    _apply(state, "t2", "channel", "telegram", {"secret_token": "s2", "bot_token": "2:bot"})
    assert edge.secrets.get("t2") == "s2" and edge.bot_tokens.get("t2") == "2:bot"
    assert sorted(edge.secrets) == ["t1", "t2"]

    wx = live_wechat(WeChatEdge(accounts={"t1": WeChatAccount("env-token")}), state, BOX)
    _apply(state, "t1", "channel", "wechat", {"app_id": "app1", "app_secret": "s1"})
    account = wx.accounts["t1"]
    assert (account.token, account.app_id, account.app_secret) == ("env-token", "app1", "s1")
    _apply(state, "t1", "channel", "wechat", {"token": "cfgtoken"})
    assert wx.accounts["t1"].token == "cfgtoken" and wx.mini_programs.get("t1") is None


def test_tenants_created_in_the_config_are_known_and_disabled_ones_said() -> None:
    state = ConfigState()
    ring = KeyRing(AuthConfig(tenants=frozenset({"env"})), live=state)
    assert "env" in ring.ids and "new" not in ring.ids
    state.apply(config_record("new", "tenant", SINGLE, {"name": "New"}, "test"))
    assert "new" in ring.ids and not ring.ids.disabled("new")
    state.apply(config_record("new", "tenant", SINGLE, {"disabled": True}, "test", 10**15))
    assert ring.ids.disabled("new") and not ring.ids.disabled("env")


# ------------------------------------------------------------------- the stack


@dataclass
class Hook:
    """A webhook receiver: what it was POSTed (body, headers)."""

    received: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: LoopbackServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{port_of(self.server)}/hook"

    def for_conversation(self, conversation: str) -> list[tuple[dict[str, Any], dict[str, str]]]:
        with self.lock:
            found = [(json.loads(b), h) for b, h in self.received]
        return [(p, h) for p, h in found if p.get("conversation_id") == conversation]


@pytest.fixture
def hook() -> Iterator[Hook]:
    state = Hook()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with state.lock:
                state.received.append((body, {k.lower(): v for k, v in self.headers.items()}))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    state.server = serve(Handler)
    try:
        yield state
    finally:
        shutdown(state.server)


@pytest.fixture
def http(pipeline: Settings) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base(pipeline), timeout=30) as client:
        yield client


def put_config(
    http: httpx.Client,
    kind: str,
    entity_id: str,
    data: dict[str, Any],
    headers: dict[str, str] | None = None,
    tenant: str = "",
) -> dict[str, Any]:
    """Create or replace an entity at the version it has now; its answer."""
    query = f"?tenant={tenant}" if tenant else ""
    url = f"/v1/admin/config/{kind}/{entity_id}{query}"
    now = http.get(url, headers=headers or ADMIN)
    version = now.json()["version"] if now.status_code == 200 else 0
    put = http.put(url, json={"version": version, "data": data}, headers=headers or ADMIN)
    assert put.status_code == 200, put.text
    answer: dict[str, Any] = put.json()
    return answer


def in_worker(settings: Settings, tenant: str, kind: str, entity_id: str, version: int) -> None:
    wait_for(
        lambda: (worker_entity(settings, tenant, kind, entity_id) or {}).get("version") == version,
        10,
        f"{tenant}/{kind}/{entity_id} v{version} in the worker",
    )


def test_a_webhook_set_in_admin_gets_the_next_reply(
    pipeline: Settings, http: httpx.Client, hook: Hook
) -> None:
    secret = f"hook-{uuid.uuid4().hex}"
    written = put_config(http, "webhook", SINGLE, {"url": hook.url, "secret": secret})
    assert written["data"]["secret"] == {"set": True}  # never shown back
    in_worker(pipeline, TENANT, "webhook", SINGLE, written["version"])
    sent = http.post(
        "/v1/messages",
        json={"customer_id": f"c-{uuid.uuid4().hex[:8]}", "text": "How do I get a refund?"},
        headers={"X-Api-Key": f"{TENANT}-test-key"},
    )
    assert sent.status_code == 202, sent.text
    conversation = sent.json()["conversation_id"]
    payload, headers = wait_for(
        lambda: hook.for_conversation(conversation), what="the reply at the new webhook"
    )[0]
    assert payload["type"] == "reply" and headers["x-kefu-tenant"] == TENANT
    with hook.lock:
        body = next(b for b, h in hook.received if json.loads(b) == payload)
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert headers["x-kefu-signature"] == expected  # signed with the secret set in /admin


def telegram_update(chat: int, text: str) -> dict[str, Any]:
    message = {
        "message_id": random.randint(1, 10**6),
        "date": 1700000000,
        "chat": {"id": chat, "type": "private"},
        "from": {"id": chat, "is_bot": False, "first_name": "Li"},
        "text": text,
    }
    return {"update_id": random.randint(10**6, 10**12), "message": message}


def test_a_telegram_bot_set_in_admin_is_accepted_and_sent_with(
    pipeline: Settings, http: httpx.Client, fake_telegram: FakeTelegram
) -> None:
    chat = random.randint(10**9, 10**10)
    url = f"/v1/telegram/{TENANT}/webhook"
    secret = f"tg{uuid.uuid4().hex}"
    header = {"X-Telegram-Bot-Api-Secret-Token": secret}
    before = http.post(url, json=telegram_update(chat, "hello"), headers=header)
    assert before.status_code == 404, before.text  # no bot in the settings
    token = f"{random.randint(10**6, 10**9)}:live-{uuid.uuid4().hex}"
    fake_telegram.tokens.add(token)
    written = put_config(http, "channel", "telegram", {"bot_token": token, "secret_token": secret})
    in_worker(pipeline, TENANT, "channel", "telegram", written["version"])
    wrong = {"X-Telegram-Bot-Api-Secret-Token": "not-it"}
    assert http.post(url, json=telegram_update(chat, "x"), headers=wrong).status_code == 403
    accepted = http.post(url, json=telegram_update(chat, "How do I get a refund?"), headers=header)
    assert accepted.status_code == 200 and accepted.json()["published"] is True, accepted.text
    replies = wait_for(lambda: fake_telegram.sent_to(chat), what="the reply via sendMessage")
    assert replies[0].token == token and replies[0].text


def test_wechat_callback_token_set_in_admin_is_checked(
    pipeline: Settings, http: httpx.Client
) -> None:
    url = f"/v1/wechat/{TENANT}/callback"
    query = {"timestamp": str(int(time.time())), "nonce": "n1", "echostr": "hi"}
    token = f"wx{uuid.uuid4().hex[:20]}"
    signed = {**query, "signature": signature(token, query["timestamp"], query["nonce"])}
    assert http.get(url, params=signed).status_code == 404  # no account in the settings
    put_config(http, "channel", "wechat", {"token": token, "app_id": "live-app"})
    verified = http.get(url, params=signed)
    assert verified.status_code == 200 and verified.text == "hi"
    bad = {**query, "signature": signature("other", query["timestamp"], query["nonce"])}
    assert http.get(url, params=bad).status_code == 403


def test_channel_test_message_answers_ok_or_the_error(
    pipeline: Settings, http: httpx.Client, fake_telegram: FakeTelegram, fake_wechat: FakeWeChat
) -> None:
    def check(channel: str, **body: Any) -> dict[str, Any]:
        got = http.post(f"/v1/admin/config/channel/{channel}/test", json=body, headers=ADMIN)
        assert got.status_code == 200, got.text
        answer: dict[str, Any] = got.json()
        return answer

    token = f"{random.randint(10**6, 10**9)}:check-{uuid.uuid4().hex}"
    put_config(http, "channel", "telegram", {"bot_token": token, "secret_token": "s3cret"})
    unknown = check("telegram")
    assert unknown["ok"] is False and "Unauthorized" in unknown["error"]
    assert token not in json.dumps(unknown)
    fake_telegram.tokens.add(token)
    assert check("telegram") == {
        "channel": "telegram",
        "ok": True,
        "bot": "kefu_test_bot",
        "webhook_secret_set": True,
    }
    chat = random.randint(10**9, 10**10)
    assert check("telegram", to=str(chat))["sent"] is True
    assert [s.token for s in fake_telegram.sent_to(chat)] == [token]

    app_id, app_secret = f"live-{uuid.uuid4().hex[:8]}", "live-app-secret"
    openid = f"o-{uuid.uuid4().hex[:10]}"
    put_config(http, "channel", "wechat_mp", {"app_id": app_id, "app_secret": "wrong"})
    fake_wechat.apps[app_id] = app_secret
    refused = check("wechat_mp")
    assert refused["ok"] is False and "40013" in refused["error"]
    put_config(http, "channel", "wechat_mp", {"app_id": app_id, "app_secret": app_secret})
    assert check("wechat_mp")["ok"] is True
    assert check("wechat_mp", to=openid)["sent"] is True
    assert [s.app_id for s in fake_wechat.sent_to(openid)] == [app_id]
    # Email has no platform to ask; a channel not in the list is a 422.
    email = http.post("/v1/admin/config/channel/email/test", json={}, headers=ADMIN)
    assert email.status_code == 422
    assert http.post("/v1/admin/config/channel/telegram/test", json={}).status_code == 401


@pytest.fixture(scope="module")
def operator(pipeline: Settings) -> Iterator[tuple[httpx.Client, dict[str, str]]]:
    """A signed-in operator and its CSRF header."""
    agent = f"olive-{uuid.uuid4().hex[:6]}"
    email, password = f"{agent}@ops.example", "operator-pass-live"
    write_operator(pipeline, agent, email, password)
    with httpx.Client(base_url=base(pipeline), timeout=30) as http:
        wait_for(
            lambda: login(http, OPERATOR_TENANT, email, password).status_code == 200,
            10,
            "the operator live in the gateway",
        )
    client, csrf = sign_in(pipeline, OPERATOR_TENANT, email, password)
    with closing(client):
        yield client, {"X-CSRF-Token": csrf}


def test_a_tenant_created_in_admin_has_a_widget(
    pipeline: Settings, http: httpx.Client, operator: tuple[httpx.Client, dict[str, str]]
) -> None:
    client, csrf = operator
    new = f"newlive-{uuid.uuid4().hex[:6]}"
    assert http.get("/v1/chat/settings", params={"tenant": new}).status_code == 404
    made = client.post("/v1/admin/config/tenants", json={"id": new, "name": "新公司"}, headers=csrf)
    assert made.status_code == 201, made.text
    settings = http.get("/v1/chat/settings", params={"tenant": new})
    assert settings.status_code == 200 and settings.json()["name"] == "新公司", settings.text
    visitor = http.get("/v1/chat/visitor", params={"tenant": new})
    assert visitor.status_code == 200 and visitor.json()["customer"]


def _socket_status(settings: Settings, tenant: str) -> int:
    async def connect() -> int:
        g = settings.gateway
        url = f"ws://{g.host}:{g.port}/v1/chat/ws?tenant={tenant}&customer=c1"
        try:
            async with websockets.connect(url) as socket:
                await socket.recv()
        except websockets.InvalidStatus as exc:
            return exc.response.status_code
        return 101

    return asyncio.run(connect())


def test_a_disabled_tenant_is_refused_at_the_edges(
    pipeline: Settings, http: httpx.Client, operator: tuple[httpx.Client, dict[str, str]]
) -> None:
    client, csrf = operator
    key = {"X-Api-Key": f"{OFF}-test-key"}
    message = {"customer_id": "c1", "text": "hello"}
    assert http.post("/v1/messages", json=message, headers=key).status_code == 202
    # Its own admin may not disable it; an operator does.
    own = {"X-Admin-Key": f"{OFF}-admin-key"}
    now = http.get("/v1/admin/config/tenant/-", headers=own).json()
    refused = http.put(
        "/v1/admin/config/tenant/-",
        json={"version": now["version"], "data": {"disabled": True}},
        headers=own,
    )
    assert refused.status_code == 403
    put_config(client, "tenant", SINGLE, {"name": OFF, "disabled": True}, csrf, tenant=OFF)
    for got in (
        http.post("/v1/messages", json=message, headers=key),
        http.get("/v1/chat/settings", params={"tenant": OFF}),
        http.get("/v1/chat/visitor", params={"tenant": OFF}),
        http.post("/v1/chat/uploads", data={"tenant": OFF, "customer": "c1"}, files={"file": b"x"}),
        http.post(f"/v1/telegram/{OFF}/webhook", json=telegram_update(1, "x")),
        http.get(f"/v1/wechat/{OFF}/callback"),
    ):
        assert got.status_code == 403 and got.json()["detail"] == "this tenant is disabled", (
            got.request.url,
            got.text,
        )
    assert _socket_status(pipeline, OFF) == 403
    # Enabled again: live again.
    put_config(client, "tenant", SINGLE, {"name": OFF, "disabled": False}, csrf, tenant=OFF)
    assert http.post("/v1/messages", json=message, headers=key).status_code == 202
    assert http.get("/v1/chat/settings", params={"tenant": OFF}).status_code == 200
