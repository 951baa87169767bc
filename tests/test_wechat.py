"""WeChat: the protocol parts (signatures, safe-mode crypto, XML) as pure functions, the
sender against the local fake API, and the whole channel through the running pipeline:
passive replies, later replies through the customer-service API, redeliveries, safe
mode, the mini-program, and bad callbacks refused with nothing published."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
import redis

from connectors.identity import command_id_for, conversation_id_for
from connectors.wechat import (
    WeChatApp,
    WeChatCrypto,
    WeChatError,
    WeChatSender,
    encrypted_xml,
    parse_json,
    parse_xml,
    signature,
    text_reply_xml,
)
from kefu.settings import Settings
from schemas.keys import conversation_key
from schemas.records import ReplyProduced
from tests.conftest import wait_for
from tests.fake_wechat import FakeWeChat
from tests.test_pipeline import customer_messages_published

AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"

# ---------------------------------------------------------------- pure


def test_signature_is_sha1_of_the_sorted_parts() -> None:
    expected = hashlib.sha1(b"".join(sorted([b"tok", b"1409304348", b"xxxxxx"]))).hexdigest()
    assert signature("tok", "1409304348", "xxxxxx") == expected
    assert signature("xxxxxx", "tok", "1409304348") == expected


def test_crypto_round_trip_and_layout() -> None:
    crypto = WeChatCrypto(AES_KEY, "wx-app")
    message = "<xml><Content><![CDATA[你好]]></Content></xml>".encode()
    encrypted = crypto.encrypt(message, random=b"r" * 16)
    assert crypto.decrypt(encrypted) == message
    raw = base64.b64decode(encrypted)
    assert len(raw) % 32 == 0  # WeChat pads to 32-byte blocks
    # Independent of our decrypt: AES-256-CBC with IV = key[:16] opens it to the layout.
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = base64.b64decode(AES_KEY + "=")
    plain = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor().update(raw)
    assert plain[:16] == b"r" * 16
    assert int.from_bytes(plain[16:20], "big") == len(message)
    assert plain[20 : 20 + len(message)] == message
    assert plain[20 + len(message) :].rstrip(plain[-1:]) == b"wx-app"


def test_crypto_refuses_other_apps_bad_padding_and_garbage() -> None:
    encrypted = WeChatCrypto(AES_KEY, "other-app").encrypt(b"<xml/>")
    with pytest.raises(WeChatError) as wrong_app:
        WeChatCrypto(AES_KEY, "wx-app").decrypt(encrypted)
    assert wrong_app.value.status == 403
    for garbage in ("not base64!!", base64.b64encode(b"short").decode(), ""):
        with pytest.raises(WeChatError) as bad:
            WeChatCrypto(AES_KEY, "wx-app").decrypt(garbage)
        assert bad.value.status == 400
    other_key = "B" * 43
    with pytest.raises(WeChatError):
        WeChatCrypto(other_key, "wx-app").decrypt(encrypted)
    with pytest.raises(ValueError):
        WeChatCrypto("short", "wx-app")


def test_parse_xml_and_reply_xml() -> None:
    fields = parse_xml(
        b"<xml><ToUserName><![CDATA[gh_1]]></ToUserName><MsgType><![CDATA[text]]></MsgType>"
        b"<Content><![CDATA[a < b]]></Content><MsgId>42</MsgId></xml>"
    )
    assert fields == {"ToUserName": "gh_1", "MsgType": "text", "Content": "a < b", "MsgId": "42"}
    tricky = "ends with ]]> and <tags> & 中文"
    reply = parse_xml(text_reply_xml("openid", "gh_1", tricky, 1700000000).encode())
    assert reply["Content"] == tricky
    assert (reply["ToUserName"], reply["FromUserName"], reply["MsgType"]) == (
        "openid",
        "gh_1",
        "text",
    )


@pytest.mark.parametrize(
    "body",
    [
        b"<xml><unclosed></xml>",
        b"not xml at all",
        b"<notxml><a>1</a></notxml>",
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><xml><C>&a;</C></xml>',
    ],
)
def test_parse_xml_refuses_malformed_bodies_and_dtds(body: bytes) -> None:
    with pytest.raises(WeChatError) as error:
        parse_xml(body)
    assert error.value.status == 400


def test_parse_json() -> None:
    assert parse_json(b'{"MsgType": "text", "MsgId": 7}') == {"MsgType": "text", "MsgId": "7"}
    for bad in (b"{nope", b"[1, 2]"):
        with pytest.raises(WeChatError):
            parse_json(bad)


# ---------------------------------------------------------------- sender vs the fake API


def _reply(tenant: str, customer: str, text: str = "hello") -> ReplyProduced:
    return ReplyProduced(
        event_id=str(uuid.uuid4()),
        conversation_id=conversation_id_for(tenant, "wechat", customer),
        tenant_id=tenant,
        seq=2,
        occurred_at=0,
        in_reply_to="m",
        channel="wechat",
        text=text,
        author="ai",
        responder="offline",
        confidence=1.0,
        customer_id=customer,
    )


@pytest.fixture
def lone_fake() -> Iterator[FakeWeChat]:
    fake = FakeWeChat(apps={"app": "secret"}).start()
    try:
        yield fake
    finally:
        fake.stop()


def test_sender_caches_the_token_refetches_when_revoked_and_retries(
    lone_fake: FakeWeChat,
) -> None:
    async def run() -> list[str]:
        sender = WeChatSender({"t": WeChatApp("app", "secret")}, lone_fake.base_url, backoff=0.01)
        statuses = [(await sender.send(_reply("t", "u1"))).status]
        statuses.append((await sender.send(_reply("t", "u1", "again"))).status)
        assert lone_fake.token_calls == 1  # cached
        lone_fake.revoke_tokens()
        statuses.append((await sender.send(_reply("t", "u1", "third"))).status)
        assert lone_fake.token_calls == 2  # refetched after errcode 40001
        lone_fake.fail_next, lone_fake.fail_with = 2, 500
        outcome = await sender.send(_reply("t", "u1", "fourth"))
        assert (outcome.status, outcome.attempts) == ("delivered", 3)
        await sender.close()
        return statuses

    assert asyncio.run(run()) == ["delivered"] * 3
    assert [s.text for s in lone_fake.sent_to("u1")] == ["hello", "again", "third", "fourth"]
    assert lone_fake.sent[0].body == {
        "touser": "u1",
        "msgtype": "text",
        "text": {"content": "hello"},
    }


def test_sender_reports_failures_never_drops_silently(lone_fake: FakeWeChat) -> None:
    async def run() -> list[tuple[str, int, str]]:
        sender = WeChatSender(
            {"t": WeChatApp("app", "secret"), "bad": WeChatApp("unknown-app", "wrong")},
            lone_fake.base_url,
            attempts=3,
            backoff=0.01,
        )
        lone_fake.fail_next, lone_fake.fail_with = 10, -1  # busy, every time
        busy = await sender.send(_reply("t", "u2"))
        lone_fake.fail_next, lone_fake.fail_with = 1, 45015  # out of the 48 h window
        permanent = await sender.send(_reply("t", "u2"))
        lone_fake.fail_next = 0
        refused = await sender.send(_reply("bad", "u2"))
        unknown = await sender.send(_reply("nobody", "u2"))
        dead = WeChatSender({"t": WeChatApp("app", "secret")}, "http://127.0.0.1:9", attempts=2)
        unreachable = await dead.send(_reply("t", "u2"))
        await sender.close()
        await dead.close()
        return [
            (o.status, o.attempts, o.detail)
            for o in (busy, permanent, refused, unknown, unreachable)
        ]

    busy, permanent, refused, unknown, unreachable = asyncio.run(run())
    assert busy == ("failed", 3, "errcode -1")
    assert permanent == ("failed", 1, "errcode 45015")
    assert refused[0] == "failed" and "40013" in refused[2]
    assert unknown[0] == "failed"
    assert unreachable[:2] == ("failed", 2)
    assert lone_fake.sent_to("u2") == []


# ---------------------------------------------------------------- through the pipeline


def gateway(settings: Settings) -> httpx.Client:
    g = settings.gateway
    return httpx.Client(base_url=f"http://{g.host}:{g.port}", timeout=15)


def signed(token: str, **extra: str) -> dict[str, str]:
    timestamp, nonce = str(int(time.time())), uuid.uuid4().hex[:10]
    return {
        "signature": signature(token, timestamp, nonce),
        "timestamp": timestamp,
        "nonce": nonce,
        **extra,
    }


def text_xml(openid: str, msg_id: str, text: str, to: str = "gh_test") -> bytes:
    return (
        f"<xml><ToUserName><![CDATA[{to}]]></ToUserName>"
        f"<FromUserName><![CDATA[{openid}]]></FromUserName>"
        f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
        f"<Content><![CDATA[{text}]]></Content><MsgId>{msg_id}</MsgId></xml>"
    ).encode()


def openid() -> str:
    return f"o{uuid.uuid4().hex[:20]}"


def state(settings: Settings, tenant: str, channel: str, who: str) -> dict[str, Any]:
    client = redis.Redis.from_url(settings.redis.dsn, decode_responses=True)
    key = conversation_key(tenant, conversation_id_for(tenant, channel, who))
    return cast(dict[str, Any], client.hgetall(key))


def test_url_verification(pipeline: Settings) -> None:
    with gateway(pipeline) as http:
        ok = http.get("/v1/wechat/wx/callback", params=signed("wx-token", echostr="e123"))
        bad = http.get("/v1/wechat/wx/callback", params={**signed("wrong"), "echostr": "e123"})
        missing = http.get("/v1/wechat/wx/callback", params={"echostr": "e123"})
        old = http.get(
            "/v1/wechat/wx/callback",
            params={
                "signature": signature("wx-token", "1000", "n"),
                "timestamp": "1000",
                "nonce": "n",
                "echostr": "e",
            },
        )
        off = http.get("/v1/wechat/demo/callback", params=signed("x", echostr="e"))
        mp = http.get("/v1/wechat-mp/wx/callback", params=signed("wx-mp-token", echostr="m1"))
    assert (ok.status_code, ok.text) == (200, "e123")
    assert bad.status_code == 403
    assert missing.status_code == 401
    assert old.status_code == 403  # replayed signature from long ago
    assert off.status_code == 404
    assert (mp.status_code, mp.text) == (200, "m1")


def test_text_message_gets_a_passive_reply_and_no_api_call(
    pipeline: Settings, fake_wechat: FakeWeChat
) -> None:
    who = openid()
    with gateway(pipeline) as http:
        response = http.post(
            "/v1/wechat/wx/callback",
            params=signed("wx-token", openid=who),
            content=text_xml(who, "9001", "How do I get a refund?"),
        )
    assert response.status_code == 200, response.text
    reply = parse_xml(response.content)
    assert reply["ToUserName"] == who and reply["FromUserName"] == "gh_test"
    assert reply["MsgType"] == "text" and reply["Content"]
    wait_for(lambda: state(pipeline, "wx", "wechat", who).get("last_delivery"), what="delivery")
    assert fake_wechat.sent_to(who) == []


def test_redelivered_callback_is_not_a_second_message(
    pipeline: Settings, fake_wechat: FakeWeChat
) -> None:
    who = openid()
    with gateway(pipeline) as http:
        for _ in range(3):  # WeChat retries up to three times with the same MsgId
            response = http.post(
                "/v1/wechat/wx/callback",
                params=signed("wx-token"),
                content=text_xml(who, "777001", "where is my order"),
            )
            assert response.status_code == 200
        # A new message proves the conversation agent is past every copy.
        http.post(
            "/v1/wechat/wx/callback",
            params=signed("wx-token"),
            content=text_xml(who, "777002", "thanks"),
        )
    wait_for(
        lambda: state(pipeline, "wx", "wechat", who).get("messages") == "2",
        what="two customer messages",
    )
    # Same MsgId, same command id: that is what the conversation agent dedupes on.
    assert command_id_for("wx", "wechat", "777001") == command_id_for("wx", "wechat", "777001")
    assert state(pipeline, "wx", "wechat", who)["messages"] == "2"


def test_safe_mode_round_trip(pipeline: Settings) -> None:
    crypto = WeChatCrypto(AES_KEY, "wxs-app")
    who = openid()
    params = signed("wxs-token", encrypt_type="aes")
    encrypt = crypto.encrypt(text_xml(who, "5001", "hello in safe mode", to="gh_safe"))
    params["msg_signature"] = signature("wxs-token", params["timestamp"], params["nonce"], encrypt)
    body = (
        "<xml><ToUserName><![CDATA[gh_safe]]></ToUserName>"
        f"<Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    )
    with gateway(pipeline) as http:
        response = http.post("/v1/wechat/wxs/callback", params=params, content=body.encode())
        tampered = http.post(
            "/v1/wechat/wxs/callback",
            params={**params, "msg_signature": "0" * 40},
            content=body.encode(),
        )
        plain = http.post(
            "/v1/wechat/wxs/callback",
            params=signed("wxs-token"),
            content=text_xml(who, "5002", "plaintext is refused in safe mode"),
        )
    assert response.status_code == 200, response.text
    outer = parse_xml(response.content)
    assert outer["MsgSignature"] == signature(
        "wxs-token", outer["TimeStamp"], outer["Nonce"], outer["Encrypt"]
    )
    inner = parse_xml(crypto.decrypt(outer["Encrypt"]))
    assert inner["ToUserName"] == who and inner["FromUserName"] == "gh_safe" and inner["Content"]
    assert tampered.status_code == 403
    assert plain.status_code == 400


def test_encrypted_xml_helper_matches_the_protocol() -> None:
    crypto = WeChatCrypto(AES_KEY, "a")
    outer = parse_xml(encrypted_xml(crypto, "tok", "<xml/>", "1", "n").encode())
    assert outer["MsgSignature"] == signature("tok", "1", "n", outer["Encrypt"])
    assert crypto.decrypt(outer["Encrypt"]) == b"<xml/>"


def test_late_reply_goes_through_the_customer_service_api(
    pipeline: Settings, fake_wechat: FakeWeChat
) -> None:
    """A human-only tenant: nothing answers within the window, so the callback says
    "success"; the agent's reply later goes out through custom/send."""
    who = openid()
    with gateway(pipeline) as http:
        online = http.put(
            "/v1/agents/agent-w/presence",
            json={"presence": "online", "capacity": 50},
            headers={"Authorization": "Bearer wxh-test-key"},
        )
        assert online.status_code == 202, online.text
        response = http.post(
            "/v1/wechat/wxh/callback",
            params=signed("wxh-token"),
            content=text_xml(who, "3001", "I need a person"),
        )
        assert (response.status_code, response.text) == (200, "success")
        conversation = conversation_id_for("wxh", "wechat", who)
        wait_for(
            lambda: state(pipeline, "wxh", "wechat", who).get("assignee") == "agent-w",
            what="assignment",
        )
        fake_wechat.fail_next, fake_wechat.fail_with = 1, -1  # one busy answer: retried
        agent = http.post(
            f"/v1/conversations/{conversation}/replies",
            json={"agent_id": "agent-w", "text": "Hi, this is Wang from support"},
            headers={"Authorization": "Bearer wxh-test-key"},
        )
        assert agent.status_code == 202, agent.text
    sent = wait_for(lambda: fake_wechat.sent_to(who), what="custom/send")
    assert sent[0].app_id == "wxh-app"
    assert sent[0].text == "Hi, this is Wang from support"
    wait_for(lambda: state(pipeline, "wxh", "wechat", who).get("last_delivery"), what="receipt")


def test_mini_program_json_message_answered_through_the_api(
    pipeline: Settings, fake_wechat: FakeWeChat
) -> None:
    who = openid()
    message = {
        "ToUserName": "gh_mp",
        "FromUserName": who,
        "CreateTime": int(time.time()),
        "MsgType": "text",
        "Content": "How do I get a refund?",
        "MsgId": 880001,
    }
    enter = {**message, "MsgType": "event", "Event": "user_enter_tempsession"}
    with gateway(pipeline) as http:
        for body in (enter, message, message):
            response = http.post(
                "/v1/wechat-mp/wx/callback",
                params=signed("wx-mp-token"),
                content=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            assert (response.status_code, response.text) == (200, "success")
    sent = wait_for(lambda: fake_wechat.sent_to(who), what="mini-program reply")
    assert sent[0].app_id == "wx-mp-app" and sent[0].text
    # The read model trails the reply; once it has the delivery, it has every earlier
    # event of the conversation (applied in seq order), and the repeat added nothing.
    model = wait_for(
        lambda: (s := state(pipeline, "wx", "wechat-mp", who)).get("last_delivery") and s,
        what="the delivery in the read model",
    )
    assert model["messages"] == "1"


@pytest.mark.parametrize(
    ("path", "params", "body", "status"),
    [
        ("/v1/wechat/wx/callback", {}, b"<xml/>", 401),
        ("/v1/wechat/wx/callback", "wrong-token", b"<xml/>", 403),
        ("/v1/wechat/wx/callback", "wx-token", b"<xml><broken></xml>", 400),
        ("/v1/wechat/wx/callback", "wx-token", b"<!DOCTYPE x><xml/>", 400),
        ("/v1/wechat/wx/callback", "wx-token", b"<xml>" + b"a" * 20000 + b"</xml>", 413),
        (
            "/v1/wechat/wx/callback",
            "wx-token",
            b"<xml><MsgType>text</MsgType><Content>no sender</Content></xml>",
            400,
        ),
        ("/v1/wechat/nosuch/callback", "wx-token", b"<xml/>", 404),
        ("/v1/wechat-mp/wx/callback", "wx-mp-token", b"{not json", 400),
        ("/v1/wechat-mp/wx/callback", "wx-token", b"{}", 403),
        ("/v1/wechat-mp/wx/callback", "wx-mp-token", b"[" * 20000, 413),
    ],
)
def test_bad_callbacks_are_refused_and_publish_nothing(
    pipeline: Settings, path: str, params: Any, body: bytes, status: int
) -> None:
    before = asyncio.run(customer_messages_published(pipeline))
    query = signed(params) if isinstance(params, str) else params
    with gateway(pipeline) as http:
        response = http.post(path, params=query, content=body)
        health = http.get("/healthz")
    assert response.status_code == status, response.text
    assert response.json()["detail"]
    assert health.status_code == 200
    assert asyncio.run(customer_messages_published(pipeline)) == before


def test_non_text_messages_are_acknowledged_not_published(pipeline: Settings) -> None:
    before = asyncio.run(customer_messages_published(pipeline))
    assert before > 0  # it counts: this module's text messages came first
    body = (
        b"<xml><ToUserName>gh</ToUserName><FromUserName>o1</FromUserName>"
        b"<MsgType>event</MsgType><Event>subscribe</Event></xml>"
    )
    with gateway(pipeline) as http:
        response = http.post("/v1/wechat/wx/callback", params=signed("wx-token"), content=body)
    assert (response.status_code, response.text) == (200, "success")
    assert asyncio.run(customer_messages_published(pipeline)) == before
