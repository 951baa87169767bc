"""Attachments through the gateway on the running stack: REST upload → message →
conversation → download; the web chat's upload and socket frame; uploads as multipart
or as the raw body; thumbnails made after the upload (by the worker, or when first
asked for); every refusal is a clear 4xx and publishes nothing; the customer's text is
never lost with a bad file."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets
from PIL import Image

from connectors.blobs import blob_key
from connectors.identity import conversation_id_for
from kefu.cli_files import purge_conversations
from kefu.files import blob_store, url_signer
from kefu.settings import Settings
from schemas.records import ReceiveMessage
from tests.conftest import wait_for
from tests.test_fuzz_endpoints import TopicWatch

KEY = {"X-Api-Key": "files-test-key"}


def photo(width: int = 640, height: int = 480) -> bytes:
    out = io.BytesIO()
    tags = Image.Exif()
    tags[0x010F] = "Phone"
    Image.new("RGB", (width, height), (20, 90, 200)).save(out, "JPEG", exif=tags)
    return out.getvalue()


@pytest.fixture(scope="module")
def http(pipeline: Settings) -> Iterator[httpx.Client]:
    g = pipeline.gateway
    with httpx.Client(base_url=f"http://{g.host}:{g.port}", timeout=30) as client:
        yield client


def _upload(http: httpx.Client, customer: str, name: str, data: bytes) -> httpx.Response:
    return http.post(
        "/v1/uploads",
        data={"customer_id": customer},
        files={"file": (name, data, "image/jpeg")},
        headers=KEY,
    )


def _messages(http: httpx.Client, conversation: str) -> list[dict[str, Any]]:
    got = http.get(f"/v1/conversations/{conversation}", headers=KEY)
    return list(got.json()["messages"]) if got.status_code == 200 else []


def test_a_photo_travels_from_upload_to_the_conversation(
    pipeline: Settings, http: httpx.Client
) -> None:
    customer = f"cust-{uuid.uuid4().hex[:8]}"
    uploaded = _upload(http, customer, "损坏的杯子.jpg", photo())
    assert uploaded.status_code == 201, uploaded.text
    body = uploaded.json()
    assert body["kind"] == "image" and body["mime_type"] == "image/jpeg"
    assert (body["width"], body["height"]) == (640, 480)
    assert "storage_key" not in body and body["thumbnail_url"]
    sent = http.post(
        "/v1/messages",
        json={"customer_id": customer, "text": "", "attachments": [body["attachment_id"]]},
        headers=KEY,
    )
    assert sent.status_code == 202, sent.text
    conversation = sent.json()["conversation_id"]
    listed = wait_for(
        lambda: [m for m in _messages(http, conversation) if m.get("attachments")] or None,
        60,
        "the message with its photo",
    )
    shown = listed[0]["attachments"][0]
    assert shown["name"] == "损坏的杯子.jpg" and shown["kind"] == "image"
    image = http.get(shown["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.headers["x-content-type-options"] == "nosniff"
    assert "inline" in image.headers["content-disposition"]
    decoded = Image.open(io.BytesIO(image.content))
    assert decoded.size == (640, 480) and not decoded.getexif()  # EXIF gone
    thumb = http.get(shown["thumbnail_url"])
    assert thumb.status_code == 200 and max(Image.open(io.BytesIO(thumb.content)).size) <= 320
    # A link with a wrong signature or past its expiry opens nothing.
    path, query = shown["url"].split("?")
    assert http.get(f"{path}?exp=99999999999&sig=AAAA").status_code == 403
    expired = query.replace("exp=", "exp=1").split("&")[0]
    assert http.get(f"{path}?{expired}&sig=x").status_code == 403


def test_bad_files_are_refused_and_nothing_is_published(
    pipeline: Settings, http: httpx.Client
) -> None:
    customer = f"bad-{uuid.uuid4().hex[:8]}"
    watch = TopicWatch(pipeline)
    try:
        start = watch.mark()
        too_big = _upload(http, customer, "big.jpg", photo() + b"\0" * (1024 * 1024))
        assert too_big.status_code == 413 and "1048576" in too_big.text
        exe = _upload(http, customer, "cute-cat.jpg", b"MZ\x90\x00" + b"\0" * 4096)
        assert exe.status_code == 415 and "application/x-msdownload" in exe.text
        cut = _upload(http, customer, "cut.jpg", photo()[:300])
        assert cut.status_code == 422 and "decoded" in cut.text
        unknown = http.post(
            "/v1/messages",
            json={"customer_id": customer, "text": "see photo", "attachments": ["x" * 24]},
            headers=KEY,
        )
        assert unknown.status_code == 400 and "unknown or expired" in unknown.text
        empty = http.post("/v1/messages", json={"customer_id": customer}, headers=KEY)
        assert empty.status_code == 422 and "text or attachments" in empty.text
        # A message cannot take another customer's upload (another conversation).
        other = _upload(http, f"{customer}-other", "p.jpg", photo()).json()["attachment_id"]
        stolen = http.post(
            "/v1/messages",
            json={"customer_id": customer, "text": "x", "attachments": [other]},
            headers=KEY,
        )
        assert stolen.status_code == 400
        published = watch.published_since(start)
    finally:
        watch.close()
    assert not [r for r in published if getattr(r, "customer_id", "").startswith(customer)]
    # The customer's text still goes through on its own.
    ok = http.post("/v1/messages", json={"customer_id": customer, "text": "see photo"}, headers=KEY)
    assert ok.status_code == 202


def test_the_web_chat_uploads_then_sends_the_id_on_its_socket(
    pipeline: Settings, http: httpx.Client
) -> None:
    customer = f"web-{uuid.uuid4().hex[:12]}"
    uploaded = http.post(
        "/v1/chat/uploads",
        data={"tenant": "files", "customer": customer},
        files={"file": ("screenshot.png", _png(), "image/png")},
    )
    assert uploaded.status_code == 201, uploaded.text
    upload_id = uploaded.json()["attachment_id"]
    g = pipeline.gateway

    async def chat() -> list[dict[str, Any]]:
        url = f"ws://{g.host}:{g.port}/v1/chat/ws?tenant=files&customer={customer}"
        async with websockets.connect(url) as socket:
            assert json.loads(await socket.recv())["type"] == "history"
            bad = {
                "type": "message",
                "id": "m0",
                "text": "",
                "attachments": ["nope-nope-nope-nope"],
            }
            await socket.send(json.dumps(bad))
            refused = json.loads(await asyncio.wait_for(socket.recv(), 30))
            assert refused["type"] == "error" and "unknown" in refused["reason"]
            frame = {"type": "message", "id": "m1", "text": "这个", "attachments": [upload_id]}
            await socket.send(json.dumps(frame))
            while (ack := json.loads(await asyncio.wait_for(socket.recv(), 30)))["type"] != "ack":
                pass
            assert ack["id"] == "m1"
        # A new socket's history shows the message with a signed link.
        async with websockets.connect(url) as socket:
            history: list[dict[str, Any]] = json.loads(await socket.recv())["messages"]
            return history

    def listed() -> list[dict[str, Any]] | None:
        messages = asyncio.run(chat_history(pipeline, customer))
        return [m for m in messages if m.get("attachments")] or None

    asyncio.run(chat())
    found = wait_for(listed, 60, "the chat message with its screenshot")
    assert found[0]["text"] == "这个"
    shown = found[0]["attachments"][0]
    assert shown["url"].startswith("http://") and shown["mime_type"] == "image/png"
    assert http.get(shown["url"]).status_code == 200
    # A forged signature for the widget's upload: refused like a socket without one.
    signed = http.post(
        "/v1/chat/uploads",
        data={"tenant": "sig", "customer": customer, "signature": "forged"},
        files={"file": ("s.png", _png(), "image/png")},
    )
    assert signed.status_code == 401


async def chat_history(settings: Settings, customer: str) -> list[dict[str, Any]]:
    g = settings.gateway
    url = f"ws://{g.host}:{g.port}/v1/chat/ws?tenant=files&customer={customer}"
    async with websockets.connect(url) as socket:
        messages: list[dict[str, Any]] = json.loads(await socket.recv())["messages"]
        return messages


def test_the_event_carries_metadata_never_the_bytes(pipeline: Settings, http: httpx.Client) -> None:
    customer = f"meta-{uuid.uuid4().hex[:8]}"
    data = photo(1200, 900)
    watch = TopicWatch(pipeline)
    try:
        start = watch.mark()
        upload = _upload(http, customer, "big-photo.jpg", data).json()["attachment_id"]
        http.post(
            "/v1/messages",
            json={"customer_id": customer, "text": "photo", "attachments": [upload]},
            headers=KEY,
        ).raise_for_status()

        def received() -> list[ReceiveMessage] | None:
            found = [
                r
                for r in watch.published_since(start)
                if isinstance(r, ReceiveMessage) and r.customer_id == customer
            ]
            return found or None

        event = wait_for(received, 60, "the ReceiveMessage")[0]
    finally:
        watch.close()
    assert event.attachments[0].size > 1000 and event.attachments[0].width == 1200
    assert len(data) > 10_000  # the bytes are on disk, not in the record


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (120, 80), (250, 200, 0, 255)).save(out, "PNG")
    return out.getvalue()


def test_purging_a_conversation_deletes_its_files_only(
    pipeline: Settings, http: httpx.Client
) -> None:
    """An erased customer's files go; another conversation's copy of the same photo
    stays; a link to a deleted file answers 410."""
    data = photo()
    erased, kept = (f"purge-{uuid.uuid4().hex[:8]}" for _ in range(2))
    gone_url = _upload(http, erased, "a.jpg", data).json()["url"]
    kept_url = _upload(http, kept, "a.jpg", data).json()["url"]
    conversation = conversation_id_for("files", "api", erased)
    freed = asyncio.run(
        purge_conversations(pipeline, blob_store(pipeline), "files", [conversation])
    )
    assert freed > 0
    assert http.get(gone_url).status_code == 410
    assert http.get(kept_url).status_code == 200


def _raw(
    http: httpx.Client, data: bytes, headers: dict[str, str] | None = None, **query: str
) -> httpx.Response:
    return http.post(
        "/v1/uploads",
        params=query,
        content=data,
        headers={**KEY, "Content-Type": "application/octet-stream", **(headers or {})},
    )


def test_an_upload_may_be_the_raw_body(pipeline: Settings, http: httpx.Client) -> None:
    """The file as the body (no multipart), the fields in the query string, the name in
    ``?name=`` or ``Content-Disposition``: the same checks and the same answer."""
    customer = f"raw-{uuid.uuid4().hex[:8]}"
    data = photo()
    named = _raw(http, data, customer_id=customer, name="收据.jpg")
    assert named.status_code == 201, named.text
    shown = named.json()
    assert (shown["name"], shown["kind"], shown["width"]) == ("收据.jpg", "image", 640)
    multipart = _upload(http, customer, "收据.jpg", data).json()
    assert multipart["url"].split("?")[0] == shown["url"].split("?")[0]  # the same blob
    disposed = _raw(
        http,
        b"order 1234\n",
        {"Content-Disposition": "attachment; filename*=UTF-8''%E8%AE%A2%E5%8D%95.txt"},
        customer_id=customer,
    )
    assert disposed.status_code == 201 and disposed.json()["name"] == "订单.txt"
    assert disposed.json()["mime_type"] == "text/plain"
    # Refusals as for multipart: no customer, a bad one, too large, not allowed.
    assert _raw(http, data).status_code == 422
    assert _raw(http, data, customer_id="a b").status_code == 422
    too_big = _raw(http, data + b"\0" * (1024 * 1024), customer_id=customer)
    assert too_big.status_code == 413 and "1048576" in too_big.text
    exe = _raw(http, b"MZ\x90\x00" + b"\0" * 4096, customer_id=customer, name="cat.jpg")
    assert exe.status_code == 415
    assert _raw(http, data, {"X-Api-Key": "wrong"}, customer_id=customer).status_code == 401
    sent = http.post(
        "/v1/messages",
        json={"customer_id": customer, "text": "", "attachments": [shown["attachment_id"]]},
        headers=KEY,
    )
    assert sent.status_code == 202, sent.text
    # The web chat's upload, raw: who in the query, as its socket's.
    web = f"web-{uuid.uuid4().hex[:8]}"
    chat = http.post(
        "/v1/chat/uploads",
        params={"tenant": "files", "customer": web, "name": "s.png"},
        content=_png(),
        headers={"Content-Type": "image/png"},
    )
    assert chat.status_code == 201 and chat.json()["name"] == "s.png", chat.text
    forged = http.post(
        "/v1/chat/uploads",
        params={"tenant": "sig", "customer": web, "signature": "forged"},
        content=_png(),
    )
    assert forged.status_code == 401


def test_thumbnails_are_made_after_the_upload(pipeline: Settings, http: httpx.Client) -> None:
    """The worker makes a message's thumbnail; one asked for first is made by the route;
    pixels that do not decode answer 422 there while the file stays a download."""
    store = blob_store(pipeline)
    customer = f"thumb-{uuid.uuid4().hex[:8]}"
    uploaded = _upload(http, customer, "p.jpg", photo(1200, 900)).json()
    conversation = conversation_id_for("files", "api", customer)
    thumb_key = blob_key("files", conversation, _sha_of(uploaded["url"]), "thumb")
    http.post(
        "/v1/messages",
        json={"customer_id": customer, "text": "x", "attachments": [uploaded["attachment_id"]]},
        headers=KEY,
    ).raise_for_status()
    wait_for(lambda: asyncio.run(store.exists(thumb_key)) or None, 60, "the worker's thumbnail")
    # No message (nothing on the log yet): the link makes it.
    early = _upload(http, f"{customer}-2", "q.jpg", photo(800, 600)).json()
    thumb = http.get(early["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (320, 240)
    # Sound structure, pixels that do not decode: 422 for the thumbnail, the file served.
    broken = _undecodable(photo())
    bad = _upload(http, f"{customer}-3", "bad.jpg", broken)
    assert bad.status_code == 201, bad.text
    refused = http.get(bad.json()["thumbnail_url"])
    assert refused.status_code == 422 and "decoded" in refused.json()["detail"]
    assert http.get(bad.json()["thumbnail_url"]).status_code == 422  # remembered
    assert http.get(bad.json()["url"]).status_code == 200
    # A thumbnail's link is signed like any other: another tenant's key, or none, is 403.
    signer = url_signer(pipeline)
    other = blob_key("demo", conversation, _sha_of(uploaded["url"]), "thumb")
    assert http.get(f"/v1/files/{other}?exp=99999999999&sig=x").status_code == 403
    assert http.get(signer.url(thumb_key).split("?")[0]).status_code == 403


def _sha_of(url: str) -> str:
    return url.split("?")[0].rsplit("/", 1)[1]


def _undecodable(jpeg: bytes) -> bytes:
    """A well-formed JPEG whose scan names a Huffman table no DHT defines."""
    sos = jpeg.index(b"\xff\xda")
    return jpeg[: sos + 6] + b"\x33" + jpeg[sos + 7 :]
