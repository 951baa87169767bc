"""WeChat: the protocol parts (signatures, safe-mode crypto, XML) as pure functions, the
sender against the local fake API, and the whole channel through the running pipeline:
passive replies, later replies through the customer-service API, redeliveries, safe
mode, the mini-program, and bad callbacks refused with nothing published. Media both
ways: customers' images and voice downloaded into the conversation, media that cannot
be kept answered "success" and counted with nothing published; replies' files uploaded
as temporary media or sent as signed links."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from PIL import Image

from connectors.attachments import FILES_PATH, AttachmentPolicy, UrlSigner, accept
from connectors.blobs import LocalBlobStore, blob_key
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
from schemas.records import Attachment, ReplyProduced
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


# ---------------------------------------------------------------- media in


def png(size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


AMR = b"#!AMR\n" + bytes(range(256)) * 8
EXE = b"MZ\x90\x00\x03\x00\x00\x00" + bytes(2048)  # a Windows program


def media_xml(who: str, msg_id: str, msg_type: str, media_id: str, **extra: str) -> bytes:
    fields = "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in extra.items())
    return (
        f"<xml><ToUserName><![CDATA[gh_test]]></ToUserName>"
        f"<FromUserName><![CDATA[{who}]]></FromUserName>"
        f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[{msg_type}]]></MsgType>"
        f"<MediaId><![CDATA[{media_id}]]></MediaId>{fields}<MsgId>{msg_id}</MsgId></xml>"
    ).encode()


def msg_id() -> str:
    return str(uuid.uuid4().int % 10**18)


def shown_messages(http: httpx.Client, tenant: str, conversation: str) -> list[dict[str, Any]]:
    """The conversation's messages as its REST API shows them ([] until it exists)."""
    got = http.get(
        f"/v1/conversations/{conversation}", headers={"Authorization": f"Bearer {tenant}-test-key"}
    )
    return cast(list[dict[str, Any]], got.json()["messages"]) if got.status_code == 200 else []


def customer_message(http: httpx.Client, tenant: str, conversation: str) -> dict[str, Any]:
    def first() -> dict[str, Any] | None:
        listed = shown_messages(http, tenant, conversation)
        return next((m for m in listed if m.get("role") == "customer"), None)

    return wait_for(first, what="the customer's message in the conversation")


def refusals(http: httpx.Client, reason: str, tenant: str = "wx") -> float:
    """The gateway's ``kefu_wechat_media_refused_total`` for ``reason`` (all channels)."""
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("kefu_wechat_media_refused_total{") and (
            f'reason="{reason}"' in line and f'tenant="{tenant}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_image_message_lands_in_the_conversation_once(
    pipeline: Settings, fake_wechat: FakeWeChat
) -> None:
    who, image = openid(), png()
    media_id = fake_wechat.add_media(image, "image/png")
    body = media_xml(who, msg_id(), "image", media_id, PicUrl="http://mmbiz.qpic.cn/x")
    conversation = conversation_id_for("wx", "wechat", who)
    with gateway(pipeline) as http:
        for _ in range(2):  # WeChat redelivers with the same MsgId
            response = http.post("/v1/wechat/wx/callback", params=signed("wx-token"), content=body)
            assert response.status_code == 200, response.text
        http.post(
            "/v1/wechat/wx/callback",
            params=signed("wx-token"),
            content=text_xml(who, msg_id(), "thanks"),
        )
        wait_for(
            lambda: state(pipeline, "wx", "wechat", who).get("messages") == "2",
            what="the image and the text, the redelivery dropped",
        )
        message = customer_message(http, "wx", conversation)
        assert message["text"] == ""
        (attachment,) = message["attachments"]
        assert (attachment["kind"], attachment["mime_type"]) == ("image", "image/png")
        assert (attachment["width"], attachment["height"]) == (40, 30)
        stored = http.get(attachment["url"])
    assert stored.status_code == 200
    with Image.open(io.BytesIO(stored.content)) as decoded:
        assert decoded.size == (40, 30)


def test_voice_message_keeps_its_transcript(pipeline: Settings, fake_wechat: FakeWeChat) -> None:
    who = openid()
    media_id = fake_wechat.add_media(AMR, "audio/amr")
    body = media_xml(who, msg_id(), "voice", media_id, Format="amr", Recognition="我的订单在哪里")
    with gateway(pipeline) as http:
        response = http.post("/v1/wechat/wx/callback", params=signed("wx-token"), content=body)
        assert response.status_code == 200, response.text
        message = customer_message(http, "wx", conversation_id_for("wx", "wechat", who))
        (attachment,) = message["attachments"]
        stored = http.get(attachment["url"])
    assert message["text"] == "我的订单在哪里"
    assert (attachment["kind"], attachment["mime_type"], attachment["name"]) == (
        "audio",
        "audio/amr",
        "voice.amr",
    )
    assert stored.content == AMR


def test_mini_program_image_lands_in_the_conversation(
    pipeline: Settings, fake_wechat: FakeWeChat
) -> None:
    who = openid()
    media_id = fake_wechat.add_media(png((64, 64)), "image/png")
    message = {
        "ToUserName": "gh_mp",
        "FromUserName": who,
        "CreateTime": int(time.time()),
        "MsgType": "image",
        "PicUrl": "http://mmbiz.qpic.cn/y",
        "MediaId": media_id,
        "MsgId": int(msg_id()),
    }
    with gateway(pipeline) as http:
        response = http.post(
            "/v1/wechat-mp/wx/callback",
            params=signed("wx-mp-token"),
            content=json.dumps(message).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert (response.status_code, response.text) == (200, "success")
        shown = customer_message(http, "wx", conversation_id_for("wx", "wechat-mp", who))
    (attachment,) = shown["attachments"]
    assert (attachment["kind"], attachment["width"]) == ("image", 64)


@pytest.mark.parametrize(
    ("media", "reason"),
    [
        (None, "refused_by_wechat"),  # a MediaId WeChat does not know: errcode 40007
        ((EXE, "image/jpeg"), "type_not_allowed"),  # a program calling itself a photo
        ((b"\xff\xd8\xff" + bytes(2 * 1024 * 1024), "image/jpeg"), "too_large"),
    ],
)
def test_media_that_cannot_be_kept_is_acknowledged_counted_and_not_published(
    pipeline: Settings,
    fake_wechat: FakeWeChat,
    media: tuple[bytes, str] | None,
    reason: str,
) -> None:
    media_id = "no-such-media" if media is None else fake_wechat.add_media(*media)
    before = asyncio.run(customer_messages_published(pipeline))
    with gateway(pipeline) as http:
        counted = refusals(http, reason)
        response = http.post(
            "/v1/wechat/wx/callback",
            params=signed("wx-token"),
            content=media_xml(openid(), msg_id(), "image", media_id),
        )
        # "success": WeChat must not redeliver what will never be accepted.
        assert (response.status_code, response.text) == (200, "success")
        assert refusals(http, reason) == counted + 1
    assert asyncio.run(customer_messages_published(pipeline)) == before


def test_refused_voice_still_delivers_its_transcript(
    pipeline: Settings, fake_wechat: FakeWeChat
) -> None:
    who = openid()
    media_id = fake_wechat.add_media(EXE, "audio/amr")
    body = media_xml(who, msg_id(), "voice", media_id, Format="amr", Recognition="退款进度")
    with gateway(pipeline) as http:
        counted = refusals(http, "type_not_allowed")
        response = http.post("/v1/wechat/wx/callback", params=signed("wx-token"), content=body)
        assert response.status_code == 200, response.text
        message = customer_message(http, "wx", conversation_id_for("wx", "wechat", who))
        assert refusals(http, "type_not_allowed") == counted + 1
    assert message["text"] == "退款进度"
    assert not message.get("attachments")


def test_busy_download_asks_wechat_to_redeliver(
    pipeline: Settings, fake_wechat: FakeWeChat
) -> None:
    """A failure that may pass is not "success": WeChat redelivers, the MsgId dedupes."""
    who = openid()
    media_id = fake_wechat.add_media(png(), "image/png")
    body = media_xml(who, msg_id(), "image", media_id)
    before = asyncio.run(customer_messages_published(pipeline))
    fake_wechat.media_busy_next = 1
    with gateway(pipeline) as http:
        busy = http.post("/v1/wechat/wx/callback", params=signed("wx-token"), content=body)
        assert busy.status_code == 503
        assert asyncio.run(customer_messages_published(pipeline)) == before
        again = http.post("/v1/wechat/wx/callback", params=signed("wx-token"), content=body)
        assert again.status_code == 200, again.text
        message = customer_message(http, "wx", conversation_id_for("wx", "wechat", who))
    assert message["attachments"][0]["kind"] == "image"


def test_media_message_without_media_id_is_refused(pipeline: Settings) -> None:
    before = asyncio.run(customer_messages_published(pipeline))
    with gateway(pipeline) as http:
        response = http.post(
            "/v1/wechat/wx/callback",
            params=signed("wx-token"),
            content=media_xml(openid(), msg_id(), "image", ""),
        )
    assert response.status_code == 400 and "MediaId" in response.json()["detail"]
    assert asyncio.run(customer_messages_published(pipeline)) == before


# ---------------------------------------------------------------- media out (the sender)


def _signed_link_opens(signer: UrlSigner, url: str, key: str) -> bool:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    return parts.path == FILES_PATH + key and signer.verify(key, int(query["exp"]), query["sig"])


def test_sender_uploads_images_and_links_what_wechat_cannot_show(
    lone_fake: FakeWeChat, tmp_path: Path
) -> None:
    store = LocalBlobStore(tmp_path)
    signer = UrlSigner(b"s" * 32, base_url="https://kefu.example")
    conversation = conversation_id_for("t", "wechat", "u5")
    pdf_bytes = b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"

    async def run() -> tuple[Any, ...]:
        async def stored_as(data: bytes, name: str) -> Attachment:
            return await accept(
                store,
                data,
                name=name,
                tenant="t",
                conversation=conversation,
                channel="wechat",
                policy=AttachmentPolicy(),
            )

        image = await stored_as(png(), "photo.png")
        pdf = await stored_as(pdf_bytes, "invoice.pdf")
        apps = {"t": WeChatApp("app", "secret")}
        oa = WeChatSender(apps, lone_fake.base_url, backoff=0.01, store=store, signer=signer)
        mp = WeChatSender(
            apps, lone_fake.base_url, backoff=0.01, store=store, signer=signer, mini_program=True
        )
        reply = dataclasses.replace(_reply("t", "u5", "here you go"), attachments=(image, pdf))
        sent_oa = await oa.send(reply)
        sent_mp = await mp.send(dataclasses.replace(reply, channel="wechat-mp", customer_id="u6"))
        gone = dataclasses.replace(image, storage_key=blob_key("t", conversation, "0" * 64))
        missing = await oa.send(
            dataclasses.replace(reply, customer_id="u7", attachments=(image, gone))
        )
        stored = (await store.get(image.storage_key)).data
        await oa.close()
        await mp.close()
        return sent_oa, sent_mp, missing, pdf, stored

    sent_oa, sent_mp, missing, pdf, stored = asyncio.run(run())
    assert sent_oa.status == "delivered", sent_oa.detail
    oa = lone_fake.sent_to("u5")
    assert [m.msgtype for m in oa] == ["text", "image", "text"]  # text first, then each
    upload = lone_fake.uploaded(oa[1].body["image"]["media_id"])
    assert upload is not None
    assert (upload.type, upload.content_type, upload.data) == ("image", "image/png", stored)
    # The Official Account API has no file message: the PDF is a signed link in a text.
    name, url = oa[2].text.split("\n")
    assert name == "invoice.pdf" and _signed_link_opens(signer, url, pdf.storage_key)

    assert sent_mp.status == "delivered", sent_mp.detail
    mini = lone_fake.sent_to("u6")
    assert [m.msgtype for m in mini] == ["text", "image", "link"]
    link = mini[2].body["link"]
    assert link["title"] == "invoice.pdf"
    assert _signed_link_opens(signer, link["url"], pdf.storage_key)

    # Bytes gone from the store: reported, saying what went out before.
    assert missing.status == "failed"
    assert "attachment 2" in missing.detail and "text, image 1" in missing.detail
    assert [m.msgtype for m in lone_fake.sent_to("u7")] == ["text", "image"]
