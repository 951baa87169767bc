"""Web chat identity (connectors/webchat.py, connectors/auth.py): with a widget secret
a customer id opens its conversation only with its signature; visitors get a signed
random id from the gateway; the chat page in Chromium copes with both.

Tenant "sig" of tests/conftest.py signs ids with "sig-widget-secret"; "demo" signs none.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any
from urllib.parse import urlencode

import httpx
import websockets

from connectors.auth import AuthConfig, customer_signature, customer_verified, new_visitor
from kefu.settings import Settings
from schemas.keys import messages_key
from tests.browser import launch
from tests.conftest import wait_for

SECRET = "sig-widget-secret"

# ----------------------------------------------------------------------- pure


def test_signature_is_the_hmac_sha256_a_site_backend_computes() -> None:
    # `echo -n user-42 | openssl dgst -sha256 -hmac s3cret`: what docs/security.md
    # tells a tenant's backend to compute.
    expected = "1136c48073bd2ba64f2a18895ff27ecfa11e24ccd2d86972ace148983668a992"
    assert customer_signature("s3cret", "user-42") == expected


def test_only_a_signed_id_passes_where_the_tenant_has_a_secret() -> None:
    config = AuthConfig(widget_secrets={"t": "s3cret"})
    good = customer_signature("s3cret", "user-42")
    assert customer_verified(config, "t", "user-42", good)
    assert customer_verified(config, "t", "user-42", good.upper())  # hex in either case
    assert not customer_verified(config, "t", "user-42", "")
    assert not customer_verified(config, "t", "user-43", good)  # another id's signature
    assert not customer_verified(config, "t", "user-42", customer_signature("other", "user-42"))
    assert customer_verified(config, "open", "user-42", "")  # no secret: the page is trusted


def test_visitor_ids_are_random_and_signed_when_the_tenant_signs() -> None:
    config = AuthConfig(widget_secrets={"t": "s3cret"})
    ids = {new_visitor(config, "t")[0] for _ in range(100)}
    assert len(ids) == 100 and all(re.fullmatch(r"web-[0-9a-f]{32}", i) for i in ids)
    customer, signature = new_visitor(config, "t")
    assert customer_verified(config, "t", customer, signature)
    assert new_visitor(config, "open")[1] == ""


# ------------------------------------------------------------- on the stack


def http_base(settings: Settings) -> str:
    return f"http://{settings.gateway.host}:{settings.gateway.port}"


def socket_url(settings: Settings, **query: str) -> str:
    return f"ws://{settings.gateway.host}:{settings.gateway.port}/v1/chat/ws?{urlencode(query)}"


async def first_frame(url: str) -> dict[str, Any] | int:
    """The socket's first frame, or the code it was closed with before any."""
    async with websockets.connect(url) as socket:
        try:
            frame: dict[str, Any] = json.loads(await asyncio.wait_for(socket.recv(), 15))
            return frame
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else -1


async def say(url: str, text: str) -> str:
    """Send one message; the conversation id from its ack."""
    async with websockets.connect(url) as socket:
        assert json.loads(await socket.recv())["type"] == "history"
        await socket.send(json.dumps({"type": "message", "id": "m1", "text": text}))
        while (frame := json.loads(await asyncio.wait_for(socket.recv(), 30)))["type"] != "ack":
            pass
        return str(frame["conversation_id"])


def test_a_signed_customer_id_is_needed_to_open_its_conversation(pipeline: Settings) -> None:
    customer = f"user-{uuid.uuid4().hex[:8]}"
    signature = customer_signature(SECRET, customer)
    signed = socket_url(pipeline, tenant="sig", customer=customer, signature=signature)
    conversation = asyncio.run(say(signed, "where is my parcel"))

    import redis

    client = redis.Redis.from_url(pipeline.redis.dsn)
    try:
        key = messages_key("sig", conversation)
        wait_for(lambda: client.llen(key) >= 1, 60, "the signed customer's message projected")
    finally:
        client.close()
    history = asyncio.run(first_frame(signed))
    assert isinstance(history, dict) and history["type"] == "history"
    assert [m["text"] for m in history["messages"]][:1] == ["where is my parcel"]

    # Knowing the id is not enough: no signature, a wrong one, another id's.
    for attempt in ("", "0" * 64, customer_signature(SECRET, customer + "x")):
        url = socket_url(pipeline, tenant="sig", customer=customer, signature=attempt)
        assert asyncio.run(first_frame(url)) == 4401, attempt
    # A tenant without a widget secret trusts the page, as before.
    opened = asyncio.run(first_frame(socket_url(pipeline, tenant="demo", customer=customer)))
    assert isinstance(opened, dict) and opened["type"] == "history"


def test_the_gateway_issues_signed_visitor_ids(pipeline: Settings) -> None:
    with httpx.Client(base_url=http_base(pipeline), timeout=10) as http:
        issued = http.get("/v1/chat/visitor", params={"tenant": "sig"})
        assert issued.status_code == 200, issued.text
        visitor = issued.json()
        assert visitor["signature"] == customer_signature(SECRET, visitor["customer"])
        unsigned = http.get("/v1/chat/visitor", params={"tenant": "demo"}).json()
        assert unsigned["signature"] == "" and unsigned["customer"] != visitor["customer"]
        assert http.get("/v1/chat/visitor", params={"tenant": "nope"}).status_code == 404
        assert http.get("/v1/chat/visitor").status_code == 422
    frame = asyncio.run(first_frame(socket_url(pipeline, tenant="sig", **visitor)))
    assert isinstance(frame, dict) and frame["type"] == "history" and frame["messages"] == []


def test_chat_page_gets_a_visitor_id_and_drops_one_the_tenant_refuses(
    pipeline: Settings,
) -> None:
    import playwright.sync_api as sync_api

    base = http_base(pipeline)
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # An id an older page kept (unsigned): refused by "sig" with 4401, forgotten,
            # and replaced by a signed visitor id from the gateway.
            page.add_init_script(
                "if (!localStorage.kefuVisitor) localStorage.kefuCustomer = 'web-old1';"
            )
            assert (response := page.goto(f"{base}/chat?tenant=sig"))
            assert response.ok
            page.wait_for_selector("body[data-connected=true]", timeout=30_000)
            kept = json.loads(page.evaluate("localStorage.kefuVisitor"))
            assert kept["tenant"] == "sig" and kept["customer"] != "web-old1"
            assert kept["signature"] == customer_signature(SECRET, kept["customer"])
            page.fill("#text", "hello from a visitor")
            page.click("#send button")
            page.wait_for_selector("p.customer:not(.pending)", timeout=30_000)

            # A signed-in user's page: the site put the id and its signature in the URL.
            customer = f"user-{uuid.uuid4().hex[:8]}"
            signed = urlencode(
                {
                    "tenant": "sig",
                    "customer": customer,
                    "signature": customer_signature(SECRET, customer),
                }
            )
            assert page.goto(f"{base}/chat?{signed}")
            page.wait_for_selector("body[data-connected=true]", timeout=30_000)
            # A forged one is told so and not retried.
            assert page.goto(f"{base}/chat?tenant=sig&customer={customer}&signature=00")
            page.wait_for_selector("p.error", timeout=30_000)
            assert "confirm who you are" in page.inner_text("p.error")
            assert page.get_attribute("body", "data-connected") == "false"
        finally:
            browser.close()
    assert errors == [], errors
