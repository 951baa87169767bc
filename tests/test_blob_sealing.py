"""Attachment blobs sealed with their customer's data key (``connectors/sealed_blobs.py``).

Pure and store-level tests first (a key source in memory; local files and S3 against
moto's server), then the running stack: the bytes at rest are not the file, the signed
link gives it back unchanged, two processes making a customer's key at once are both
shredded by an erasure, a copy kept aside does not open after it (410), an old blob in
clear still serves, and a blob moved to another conversation or tenant does not open.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from PIL import Image

from connectors.attachments import AttachmentPolicy, UrlSigner, accept
from connectors.blobs import BlobMissing, BlobStore, LocalBlobStore, S3BlobStore, blob_key
from connectors.identity import conversation_id_for
from connectors.keystore import DataKeyStore
from connectors.sealed_blobs import (
    MAGIC,
    OVERHEAD,
    BlobErased,
    BlobUnreadable,
    SealedBlobStore,
    open_blob,
    seal_blob,
    sealed_key_id,
)
from connectors.thumbnails import Thumbnails
from kefu.data_keys import data_key
from kefu.files import blob_store, url_signer
from kefu.processes import free_ports
from kefu.settings import Settings
from schemas.keys import messages_key
from schemas.sealing import SealingKey
from schemas.topics import TopicNames
from tests.conftest import wait_for

KEY = {"X-Api-Key": "demo-test-key"}
PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\n% my bank statement, account 6222 0000 1111\n%%EOF\n"
TEXT = "my home address: 北京市朝阳区幸福路 8 号\n".encode()
SHA = "ab" * 32


class MemoryKeys:
    """A key source in memory (what ``DataKeyStore`` does, without Kafka)."""

    def __init__(self) -> None:
        self.keys: dict[str, SealingKey] = {}
        self.current: dict[tuple[str, str], SealingKey] = {}
        self.made = 0

    async def ensure(self, tenant_id: str, customer_id: str) -> SealingKey:
        found = self.current.get((tenant_id, customer_id))
        if found is None:
            self.made += 1
            found = SealingKey(tenant_id, customer_id, os.urandom(8).hex(), os.urandom(32))
            self.keys[found.key_id] = self.current[(tenant_id, customer_id)] = found
        return found

    async def flushed(self) -> None:
        return None

    def cached(self, key_id: str) -> SealingKey | None:
        return self.keys.get(key_id)

    def lookup(self, key_id: str) -> SealingKey | None:
        return self.keys.get(key_id)

    async def start_async(self) -> None:
        return None

    def erase(self, tenant_id: str, customer_id: str) -> None:
        key = self.current.pop((tenant_id, customer_id))
        del self.keys[key.key_id]


def _photo(width: int = 400, height: int = 300) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(out, "JPEG")
    return out.getvalue()


# --- the format --------------------------------------------------------------------------


def test_a_sealed_blob_names_its_key_and_opens_only_where_it_was_sealed() -> None:
    key = SealingKey("t1", "alice", "0123456789abcdef", os.urandom(32))
    where = blob_key("t1", "c1", SHA)
    sealed = seal_blob(PDF, key, where, os.urandom(12))
    assert sealed.startswith(MAGIC) and PDF not in sealed
    assert len(sealed) == len(PDF) + OVERHEAD
    assert sealed_key_id(sealed) == "0123456789abcdef"
    assert open_blob(sealed, key, where) == PDF
    # Moved: another conversation, another tenant, another name (a thumbnail's).
    for moved in (
        blob_key("t1", "c2", SHA),
        blob_key("t2", "c1", SHA),
        blob_key("t1", "c1", "cd" * 32),
        blob_key("t1", "c1", SHA, "thumb"),
    ):
        with pytest.raises(BlobUnreadable):
            open_blob(sealed, key, moved)
    # Another customer's key of the same id, a flipped byte: no.
    other = SealingKey("t1", "bob", "0123456789abcdef", os.urandom(32))
    with pytest.raises(BlobUnreadable):
        open_blob(sealed, other, where)
    tampered = bytearray(sealed)
    tampered[-20] ^= 1
    with pytest.raises(BlobUnreadable):
        open_blob(bytes(tampered), key, where)
    assert sealed_key_id(PDF) is None and sealed_key_id(MAGIC + b"\x09" + b"x" * 64) is None


# --- over a store (local files and S3) ---------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def inner(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    endpoint: str = request.getfixturevalue("s3_endpoint")
    store = S3BlobStore(
        f"sealed-{uuid.uuid4().hex[:12]}",
        endpoint_url=endpoint,
        access_key="test",
        secret_key="test",
        region="us-east-1",
    )
    asyncio.run(store.ensure())
    return store


def _at_rest(store: BlobStore, key: str) -> bytes:
    """The stored bytes, read past the store (the file, or the S3 object)."""
    if isinstance(store, LocalBlobStore):
        return (store.root / key).read_bytes()
    assert isinstance(store, S3BlobStore)
    body: bytes = store._client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    return body


def _put_at_rest(store: BlobStore, key: str, data: bytes) -> None:
    """Bytes put straight into the store (a restored backup, an old blob)."""
    if isinstance(store, LocalBlobStore):
        path = store.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    assert isinstance(store, S3BlobStore)
    store._client.put_object(Bucket=store.bucket, Key=key, Body=data)


def test_blobs_and_thumbnails_are_sealed_at_rest_and_open_on_read(inner: BlobStore) -> None:
    keys = MemoryKeys()
    store = SealedBlobStore(inner, keys)
    policy = AttachmentPolicy()
    photo = _photo()

    async def scenario() -> None:
        await store.ensure()
        image = await accept(
            store,
            photo,
            name="passport.jpg",
            tenant="t1",
            conversation="c1",
            channel="api",
            policy=policy,
            customer="alice",
        )
        again = await accept(
            store,
            photo,
            name="again.jpg",
            tenant="t1",
            conversation="c1",
            channel="api",
            policy=policy,
            customer="alice",
        )
        assert again.storage_key == image.storage_key  # content-addressed, as before
        assert image.thumbnail_key
        # The thumbnail, made after the upload (connectors/thumbnails.py), is sealed
        # under the very key that sealed the photo: no other key is made for it.
        await Thumbnails(store, policy).get(image.thumbnail_key)
        for key, kind in ((image.storage_key, "image/jpeg"), (image.thumbnail_key, "image/")):
            stored = _at_rest(inner, key)
            assert stored.startswith(MAGIC)
            assert sealed_key_id(stored) == sealed_key_id(_at_rest(inner, image.storage_key))
            clear = await store.get(key)
            assert clear.content_type.startswith(kind)
            assert clear.data not in stored and clear.data[:64] not in stored
        # The clear bytes are what the plain store would have kept (sha256 of them).
        served = (await store.get(image.storage_key)).data
        assert hashlib.sha256(served).hexdigest() == image.sha256
        document = await accept(
            store,
            PDF,
            name="statement.pdf",
            tenant="t1",
            conversation="c1",
            channel="api",
            policy=policy,
            customer="alice",
        )
        assert PDF not in _at_rest(inner, document.storage_key)
        assert (await store.get(document.storage_key)).data == PDF
        assert (await store.get(document.storage_key)).content_type == "application/pdf"
        assert keys.made == 1  # one key for the customer, every blob under it
        assert await store.exists(document.storage_key)
        assert await store.usage("t1/c1/") > 0

        # Moved under another conversation or tenant: does not open.
        for moved in (blob_key("t1", "c2", document.sha256), blob_key("t2", "c1", document.sha256)):
            _put_at_rest(inner, moved, _at_rest(inner, document.storage_key))
            with pytest.raises(BlobUnreadable):
                await store.get(moved)

        # An old blob, stored in clear before sealing: read as it is.
        old = blob_key("t1", "c0", SHA)
        _put_at_rest(inner, old, TEXT)
        assert (await store.get(old)).data == TEXT

        # Erased: a copy that outlived the purge does not open.
        kept = _at_rest(inner, document.storage_key)
        photo_kept = _at_rest(inner, image.storage_key)
        assert await store.delete_prefix("t1/c1/") > 0
        with pytest.raises(BlobMissing):
            await store.get(document.storage_key)
        keys.erase("t1", "alice")
        _put_at_rest(inner, document.storage_key, kept)
        with pytest.raises(BlobErased):
            await store.get(document.storage_key)
        # Nor is a thumbnail made of an erased customer's photo (410), nor a key for it.
        _put_at_rest(inner, image.storage_key, photo_kept)
        made = keys.made
        with pytest.raises(BlobErased):
            await Thumbnails(store, policy).get(image.thumbnail_key)
        assert keys.made == made and not await store.exists(image.thumbnail_key)

    asyncio.run(scenario())


def test_sealing_off_writes_in_clear_and_still_opens_sealed_blobs(tmp_path: Path) -> None:
    keys = MemoryKeys()
    inner = LocalBlobStore(tmp_path / "blobs")
    on, off = SealedBlobStore(inner, keys), SealedBlobStore(inner, keys, seal=False)
    sealed_key, clear_key = blob_key("t1", "c1", SHA), blob_key("t1", "c1", "cd" * 32)

    async def scenario() -> None:
        assert await on.put(sealed_key, PDF, "application/pdf", customer="alice")
        assert not await on.put(sealed_key, PDF, "application/pdf", customer="alice")
        assert await off.put(clear_key, PDF, "application/pdf")
        assert _at_rest(inner, clear_key) == PDF
        assert (await off.get(sealed_key)).data == PDF  # sealed earlier: still opens
        with pytest.raises(ValueError, match="customer"):
            await on.put(blob_key("t1", "c1", "ef" * 32), PDF, "application/pdf")

    asyncio.run(scenario())


def test_delivery_sends_the_clear_file_and_refuses_an_erased_one(tmp_path: Path) -> None:
    """A channel sender (the worker's delivery) reads through the sealed store: the
    channel gets the file itself; once the customer is erased, a copy does not go."""
    import dataclasses

    from connectors.telegram import TelegramSender
    from tests.fake_telegram import FakeTelegram
    from tests.test_telegram import _reply

    keys = MemoryKeys()
    store = SealedBlobStore(LocalBlobStore(tmp_path / "blobs"), keys)
    conversation = conversation_id_for("t", "telegram", "300")
    fake = FakeTelegram(tokens={"1:abc"}).start()
    try:

        async def run() -> list[tuple[str, str]]:
            document = await accept(
                store,
                PDF,
                name="invoice.pdf",
                tenant="t",
                conversation=conversation,
                channel="telegram",
                policy=AttachmentPolicy(),
                customer="300",
            )
            sender = TelegramSender({"t": "1:abc"}, fake.base_url, backoff=0.01, store=store)
            reply = dataclasses.replace(_reply("300", ""), attachments=(document,))
            sent = await sender.send(reply)
            keys.erase("t", "300")
            refused = await sender.send(dataclasses.replace(reply, event_id="e2"))
            await sender.close()
            return [(o.status, o.detail) for o in (sent, refused)]

        outcomes = asyncio.run(run())
        assert outcomes == [
            ("delivered", "sendDocument"),
            ("failed", "attachment missing: invoice.pdf"),
        ]
        (file,) = fake.files_sent_to(300)
        assert file.data == PDF and file.content_type == "application/pdf"
    finally:
        fake.stop()


# --- the running stack -------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(pipeline: Settings) -> Iterator[httpx.Client]:
    g = pipeline.gateway
    with httpx.Client(base_url=f"http://{g.host}:{g.port}", timeout=30) as client:
        yield client


def _blob_root(settings: Settings) -> Path:
    return settings.attachments.local_dir or settings.state_dir / "blobs"


def _key_of(url: str) -> str:
    return urlsplit(url).path.removeprefix("/v1/files/")


def _store(settings: Settings, tag: str) -> DataKeyStore:
    """A key store of its own (its own follower and producer): another process."""
    return DataKeyStore(
        settings.kafka.servers,
        TopicNames(settings.topic_prefix).keys,
        data_key(settings),
        settings.kafka.client_options(),
        wait_s=5.0,
        created_by=tag,
    )


def _upload_pdf(http: httpx.Client, customer: str) -> dict[str, Any]:
    """Upload the statement for ``customer``; the upload's JSON."""
    upload = http.post(
        "/v1/uploads",
        data={"customer_id": customer},
        files={"file": ("statement.pdf", PDF, "application/pdf")},
        headers=KEY,
    )
    assert upload.status_code == 201, upload.text
    shown: dict[str, Any] = upload.json()
    return shown


def test_uploads_are_sealed_at_rest_and_served_unchanged(
    pipeline: Settings, http: httpx.Client
) -> None:
    customer = f"blob-{uuid.uuid4().hex[:8]}"
    upload = _upload_pdf(http, customer)
    url = upload["url"]
    key = _key_of(url)
    at_rest = (_blob_root(pipeline) / key).read_bytes()
    assert at_rest.startswith(MAGIC) and PDF not in at_rest
    got = http.get(url)
    assert got.status_code == 200 and got.content == PDF
    assert got.headers["content-type"] == "application/pdf"
    # An image and its thumbnail, through the web chat's upload.
    photo = http.post(
        "/v1/chat/uploads",
        data={"tenant": "demo", "customer": customer},
        files={"file": ("me.jpg", _photo(), "image/jpeg")},
    )
    assert photo.status_code == 201, photo.text
    shown = photo.json()
    for link in (shown["url"], shown["thumbnail_url"]):  # the thumbnail made when asked
        served = http.get(link)
        assert served.status_code == 200 and served.headers["content-type"] == "image/jpeg"
        Image.open(io.BytesIO(served.content)).verify()
        assert (_blob_root(pipeline) / _key_of(link)).read_bytes().startswith(MAGIC)

    # An old blob, stored in clear before sealing existed, still serves.
    conversation = conversation_id_for("demo", "api", customer)
    old = blob_key("demo", conversation, "0f" * 32)
    (_blob_root(pipeline) / old).write_bytes(TEXT)
    signer: UrlSigner = url_signer(pipeline)
    got = http.get(signer.url(old))
    assert got.status_code == 200 and got.content == TEXT

    # The sealed file moved under another conversation, or another tenant: refused.
    for moved in (
        blob_key("demo", conversation_id_for("demo", "api", "someone-else"), "1f" * 32),
        blob_key("files", conversation, "2f" * 32),
    ):
        path = _blob_root(pipeline) / moved
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(at_rest)
        refused = http.get(signer.url(moved))
        assert refused.status_code == 500 and "cannot be opened" in refused.json()["detail"]
        with pytest.raises(BlobUnreadable):
            asyncio.run(blob_store(pipeline).get(moved))


def test_keys_made_at_once_by_two_processes_are_all_shredded(pipeline: Settings) -> None:
    """The gateway and a worker (here: two key stores, each with its own follower and
    producer) may make a key for one customer at the same instant: the customer then
    has two, both open their blobs, and an erasure shreds both."""
    customer = f"race-{uuid.uuid4().hex[:8]}"
    one, two, eraser, later = (_store(pipeline, f"test-{n}") for n in range(4))
    root = LocalBlobStore(_blob_root(pipeline))
    conversation = conversation_id_for("demo", "api", customer)
    keys = [blob_key("demo", conversation, c * 32) for c in ("3a", "3b")]
    try:

        async def scenario() -> list[str]:
            await asyncio.gather(one.start_async(), two.start_async())
            stores = [SealedBlobStore(root, one), SealedBlobStore(root, two)]
            await asyncio.gather(
                *(
                    s.put(k, PDF, "application/pdf", customer=customer)
                    for s, k in zip(stores, keys, strict=True)
                )
            )
            # Each opens the other's (a key it had not seen is waited for).
            for s, k in zip(reversed(stores), keys, strict=True):
                assert (await s.get(k)).data == PDF
            return await eraser.erase("demo", customer)

        shredded = asyncio.run(scenario())
        ids = {sealed_key_id((root.root / k).read_bytes()) for k in keys}
        # Two keys when both made one before seeing the other's; one if not: all go.
        assert 1 <= len(ids) <= 2 and ids <= set(shredded)
        fresh = SealedBlobStore(root, later)  # a process started after the erasure
        for k in keys:
            with pytest.raises(BlobErased):
                asyncio.run(fresh.get(k))
        for store in (one, two):  # and the ones that made them, once they read it

            def erased(s: DataKeyStore = store) -> bool:
                s.refresh()
                return all(s.is_erased(i) for i in ids if i)

            wait_for(erased, 30, "the shredded keys read")
    finally:
        for store in (one, two, eraser, later):
            store.stop()


def test_an_erased_customers_file_kept_aside_does_not_open(
    pipeline: Settings, http: httpx.Client, tmp_path: Path
) -> None:
    from tests.test_privacy_erase import cli

    customer = f"aside-{uuid.uuid4().hex[:8]}"
    upload = _upload_pdf(http, customer)
    url = upload["url"]
    sent = http.post(
        "/v1/messages",
        json={
            "customer_id": customer,
            "text": "my statement",
            "message_id": f"{customer}-1",
            "attachments": [upload["attachment_id"]],
        },
        headers=KEY,
    )
    assert sent.status_code == 202, sent.text
    conversation = conversation_id_for("demo", "api", customer)
    path = _blob_root(pipeline) / _key_of(url)
    aside = tmp_path / "backup"
    shutil.copyfile(path, aside)  # a backup, taken before the erasure

    client = redis.Redis.from_url(pipeline.redis.dsn)

    def listed() -> bool:  # the message is on the log: the erasure finds it there
        return bool(client.lrange(messages_key("demo", conversation), 0, -1))

    wait_for(listed, 60, "the message in Redis")
    erased = cli(pipeline, "privacy", "erase", "--tenant", "demo", "--customer", customer)
    assert erased.exit_code == 0, erased.output
    assert json.loads(erased.output)["blob_bytes"] > 0
    assert not path.exists()
    assert http.get(url).status_code == 410  # purged
    shutil.copyfile(aside, path)  # the backup restored: the bytes are back, not the file
    aside.unlink()

    def refused() -> httpx.Response | None:
        got = http.get(url)
        return got if got.status_code == 410 else None

    gone = wait_for(refused, 30, "the restored copy refused")
    assert "erased" in gone.json()["detail"]
    with pytest.raises(BlobErased):
        asyncio.run(blob_store(pipeline).get(_key_of(url)))


def test_the_smtp_listener_seals_mailed_files(pipeline: Settings) -> None:
    """The SMTP listener (a process of its own) makes the sender's key and seals."""
    from tests.test_email import attachments_in, mail, send, with_files

    who = f"sealed-{uuid.uuid4().hex[:8]}@example.com"
    send(
        pipeline,
        with_files(
            mail("my statement", sender=who, message_id=f"{uuid.uuid4().hex}@example.com"),
            ("statement.pdf", PDF, "application/pdf"),
        ),
    )
    conversation = conversation_id_for("demo", "email", who)
    (document,) = wait_for(lambda: attachments_in(pipeline, conversation), 60, "the file")
    at_rest = (_blob_root(pipeline) / document["storage_key"]).read_bytes()
    assert at_rest.startswith(MAGIC) and PDF not in at_rest
    assert asyncio.run(blob_store(pipeline).get(document["storage_key"])).data == PDF
