"""Attachments without the stack: what ``accept`` lets in, the blob stores (local files,
and S3 against moto's server: a local server that speaks S3), signed links."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from connectors.attachments import (
    AttachmentPolicy,
    AttachmentRejected,
    UrlSigner,
    accept,
    prepare,
    safe_name,
    with_urls,
)
from connectors.blobs import (
    BlobMissing,
    BlobStore,
    LocalBlobStore,
    S3BlobStore,
    blob_key,
    conversation_prefix,
    valid_key,
)
from connectors.sniffing import sniff
from kefu.processes import free_ports

POLICY = AttachmentPolicy(max_bytes={"*": 1024 * 1024, "web": 200_000})


def jpeg(width: int = 800, height: int = 600, exif: bool = False) -> bytes:
    image = Image.new("RGB", (width, height), (180, 30, 30))
    out = io.BytesIO()
    if exif:
        tags = Image.Exif()
        tags[0x010F] = "Camera maker"
        tags[0x8825] = {1: "N", 2: (39.0, 54.0, 0.0)}  # GPS: where the customer lives
        image.save(out, "JPEG", exif=tags)
    else:
        image.save(out, "JPEG")
    return out.getvalue()


def png_with_alpha() -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (64, 48), (0, 0, 255, 128)).save(out, "PNG")
    return out.getvalue()


def _prepare(data: bytes, name: str = "photo.jpg", channel: str = "api") -> object:
    return prepare(data, name=name, tenant="t1", conversation="c1", channel=channel, policy=POLICY)


# --- what gets in -----------------------------------------------------------------------


def test_an_image_is_reencoded_without_exif_and_gets_a_thumbnail() -> None:
    original = jpeg(exif=True)
    assert Image.open(io.BytesIO(original)).getexif()  # the upload has a location
    prepared = prepare(
        original, name="破损.jpg", tenant="t1", conversation="c1", channel="api", policy=POLICY
    )
    attachment = prepared.attachment
    assert (attachment.kind, attachment.mime_type) == ("image", "image/jpeg")
    assert (attachment.width, attachment.height) == (800, 600)
    assert attachment.name == "破损.jpg"
    (key, stored, content_type), (thumb_key, thumb, _) = prepared.blobs
    assert key == attachment.storage_key == blob_key("t1", "c1", attachment.sha256)
    assert thumb_key == attachment.thumbnail_key and thumb_key.endswith(".thumb")
    assert not Image.open(io.BytesIO(stored)).getexif()  # no EXIF, so no GPS
    assert max(Image.open(io.BytesIO(thumb)).size) == POLICY.thumbnail_px
    assert attachment.size == len(stored) and content_type == "image/jpeg"


def test_a_transparent_png_keeps_its_alpha_in_the_thumbnail() -> None:
    prepared = prepare(
        png_with_alpha(), name="a.png", tenant="t1", conversation="c1", channel="api", policy=POLICY
    )
    assert prepared.attachment.mime_type == "image/png"
    assert prepared.blobs[1][2] == "image/png"


def test_a_disguised_executable_is_refused_by_its_bytes() -> None:
    executable = b"MZ\x90\x00\x03\x00\x00\x00" + b"\x00" * 512
    with pytest.raises(AttachmentRejected) as refused:
        _prepare(executable, name="holiday.jpg")
    assert refused.value.status == 415
    assert "application/x-msdownload" in refused.value.reason
    elf = b"\x7fELF\x02\x01\x01" + b"\x00" * 512
    with pytest.raises(AttachmentRejected, match="not allowed"):
        _prepare(elf, name="invoice.pdf")


def test_a_truncated_image_is_refused() -> None:
    with pytest.raises(AttachmentRejected) as refused:
        _prepare(jpeg()[:400])
    assert refused.value.status == 422 and "decoded" in refused.value.reason


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    out = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(out, "PNG")  # 144 Mpx in a few KB
    bomb = out.getvalue()
    assert len(bomb) < 100_000
    with pytest.raises(AttachmentRejected) as refused:
        _prepare(bomb, name="bomb.png")
    assert refused.value.status == 422 and "too large" in refused.value.reason


def test_over_the_channel_limit_is_413_with_the_limit() -> None:
    data = jpeg(1600, 1200) + b"\x00" * 200_000
    with pytest.raises(AttachmentRejected) as refused:
        _prepare(data, channel="web")
    assert refused.value.status == 413 and "200000" in refused.value.reason


def test_svg_and_html_are_files_never_images() -> None:
    svg = b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'><script>x</script></svg>"
    assert sniff(svg) == "image/svg+xml"
    prepared = prepare(
        svg, name="logo.svg", tenant="t1", conversation="c1", channel="api", policy=POLICY
    )
    assert prepared.attachment.kind == "file" and not prepared.attachment.thumbnail_key
    assert sniff(b"<!DOCTYPE html><html><script>alert(1)</script>") == "text/html"
    with pytest.raises(AttachmentRejected, match="text/html"):
        _prepare(b"<html><body>hi</body></html>", name="page.txt")


def test_documents_and_text_are_sniffed() -> None:
    assert sniff(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj") == "application/pdf"
    assert sniff("订单号 12345\n".encode()) == "text/plain"
    assert sniff(b"\x00\x01\x02garbage") == "application/octet-stream"


def test_file_names_lose_paths_and_control_characters() -> None:
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("C:\\Users\\me\\发票.pdf") == "发票.pdf"
    assert safe_name("a\nb\rc\x00.txt") == "abc.txt"
    assert safe_name("", "application/pdf") == "attachment.pdf"
    assert len(safe_name("x" * 500 + ".png")) == 200


# --- links --------------------------------------------------------------------------------


def test_links_are_signed_per_tenant_and_expire() -> None:
    signer = UrlSigner(b"secret", ttl_s=60, base_url="http://127.0.0.1:1")
    key = blob_key("t1", "c1", "a" * 64)
    url = signer.url(key, now_s=1000)
    exp = int(url.split("exp=")[1].split("&")[0])
    sig = url.split("sig=")[1]
    assert exp == 1060 and signer.verify(key, exp, sig, now_s=1059)
    assert not signer.verify(key, exp, sig, now_s=1061)  # expired
    other = blob_key("t2", "c1", "a" * 64)  # the same path in another tenant
    assert not signer.verify(other, exp, sig, now_s=1000)
    assert not UrlSigner(b"other secret").verify(key, exp, sig, now_s=1000)
    shown = with_urls(
        [{"storage_key": key, "thumbnail_key": "", "name": "a", "sha256": "x"}], signer
    )
    assert set(shown[0]) == {"name", "url"}  # keys and digests are not shown


def test_keys_are_scoped_and_checked() -> None:
    assert valid_key(blob_key("t1", "conv-1", "b" * 64, "thumb"))
    for bad in ("../etc/passwd", "t1/c1/xyz", "/t1/c1/" + "b" * 64, "t1/../" + "b" * 64):
        assert not valid_key(bad)
    with pytest.raises(ValueError):
        blob_key("..", "c1", "b" * 64)


# --- stores -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's server mode: a local server speaking the S3 protocol."""
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _s3(endpoint: str, bucket: str) -> S3BlobStore:
    store = S3BlobStore(
        bucket, endpoint_url=endpoint, access_key="test", secret_key="test", region="us-east-1"
    )
    asyncio.run(store.ensure())
    return store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    endpoint: str = request.getfixturevalue("s3_endpoint")
    return _s3(endpoint, f"kefu-{tmp_path.name.lower().replace('_', '-')[:40]}")


def test_a_store_keeps_blobs_by_key_and_deletes_a_conversation(store: BlobStore) -> None:
    async def scenario() -> None:
        data = jpeg()
        attachment = await accept(
            store, data, name="p.jpg", tenant="t1", conversation="c1", channel="api", policy=POLICY
        )
        again = await accept(
            store, data, name="p.jpg", tenant="t1", conversation="c1", channel="api", policy=POLICY
        )
        assert again == attachment  # content-addressed: stored once
        other = await accept(
            store, data, name="p.jpg", tenant="t1", conversation="c2", channel="api", policy=POLICY
        )
        blob = await store.get(attachment.storage_key)
        assert blob.content_type == "image/jpeg" and len(blob.data) == attachment.size
        assert await store.exists(attachment.thumbnail_key)
        used = await store.usage("t1/")
        assert used > 2 * attachment.size
        freed = await store.delete_prefix(conversation_prefix("t1", "c1"))
        assert freed > attachment.size
        assert not await store.exists(attachment.storage_key)
        with pytest.raises(BlobMissing):
            await store.get(attachment.storage_key)
        # The same photo in another conversation is untouched by the erasure.
        assert (await store.get(other.storage_key)).data == blob.data
        assert await store.usage("t1/") == used - freed

    asyncio.run(scenario())


def test_the_local_store_refuses_keys_outside_its_root(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    with pytest.raises(ValueError):
        asyncio.run(store.put("../outside", b"x", "text/plain"))
    with pytest.raises(ValueError):
        asyncio.run(store.delete_prefix("../"))
