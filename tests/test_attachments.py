"""Attachments without the stack: what ``accept`` lets in, the blob stores (local files,
and S3 against moto's server: a local server that speaks S3), signed links, thumbnails
made after the upload (``connectors/thumbnails.py``)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from connectors.attachments import (
    AttachmentPolicy,
    AttachmentRejected,
    Prepared,
    UrlSigner,
    accept,
    make_thumbnail,
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
from connectors.image_strip import strip_jpeg, strip_png
from connectors.sniffing import sniff
from connectors.thumbnails import Thumbnails, source_of
from kefu.processes import free_ports
from schemas.records import Attachment, MessageReceived

POLICY = AttachmentPolicy(max_bytes={"*": 1024 * 1024, "web": 200_000})
DECODE = dataclasses.replace(POLICY, decode_at_edge=True)  # pixels decoded at upload


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


def _prepare(data: bytes, name: str = "photo.jpg", channel: str = "api") -> Prepared:
    return prepare(data, name=name, tenant="t1", conversation="c1", channel=channel, policy=POLICY)


def thumbnail_of(prepared: Prepared) -> tuple[bytes, str]:
    """The image's thumbnail: stored with the upload (re-encoded images), or what the
    worker or the download route makes of the stored bytes later."""
    assert prepared.attachment.thumbnail_key
    made = [(b, t) for k, b, t in prepared.blobs if k == prepared.attachment.thumbnail_key]
    return made[0] if made else make_thumbnail(prepared.blobs[0][1], POLICY)


# --- what gets in -----------------------------------------------------------------------


def test_an_image_loses_its_exif_and_its_thumbnail_is_made_after_the_upload() -> None:
    original = jpeg(exif=True)
    assert Image.open(io.BytesIO(original)).getexif()  # the upload has a location
    prepared = prepare(
        original, name="破损.jpg", tenant="t1", conversation="c1", channel="api", policy=POLICY
    )
    attachment = prepared.attachment
    assert (attachment.kind, attachment.mime_type) == ("image", "image/jpeg")
    assert (attachment.width, attachment.height) == (800, 600)
    assert attachment.name == "破损.jpg"
    # No pixel decoded at the edge: the file only; its thumbnail's key named already.
    ((key, stored, content_type),) = prepared.blobs
    assert key == attachment.storage_key == blob_key("t1", "c1", attachment.sha256)
    assert attachment.thumbnail_key == blob_key("t1", "c1", attachment.sha256, "thumb")
    assert source_of(attachment.thumbnail_key) == key
    assert not Image.open(io.BytesIO(stored)).getexif()  # no EXIF, so no GPS
    assert attachment.size == len(stored) and content_type == "image/jpeg"
    thumb, thumb_type = make_thumbnail(stored, POLICY)
    assert max(Image.open(io.BytesIO(thumb)).size) == POLICY.thumbnail_px
    assert thumb_type == "image/jpeg"
    # Decoded at the edge instead: the same file, its thumbnail stored beside it.
    decoded = prepare(
        original, name="破损.jpg", tenant="t1", conversation="c1", channel="api", policy=DECODE
    )
    assert decoded.attachment == attachment and decoded.blobs[0] == prepared.blobs[0]
    assert decoded.blobs[1][0] == attachment.thumbnail_key
    assert Image.open(io.BytesIO(decoded.blobs[1][1])).size == (320, 240)


def test_a_transparent_png_keeps_its_alpha_in_the_thumbnail() -> None:
    prepared = prepare(
        png_with_alpha(), name="a.png", tenant="t1", conversation="c1", channel="api", policy=POLICY
    )
    assert prepared.attachment.mime_type == "image/png"
    assert thumbnail_of(prepared)[1] == "image/png"


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
        # The thumbnail, made after the upload (by the worker, or the download route).
        assert not await store.exists(attachment.thumbnail_key)
        thumb = await Thumbnails(store, POLICY).get(attachment.thumbnail_key)
        assert thumb.content_type == "image/jpeg" and thumb.data
        assert (await store.get(attachment.thumbnail_key)).data == thumb.data
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


def test_the_local_store_writes_once_whole_and_private(tmp_path: Path) -> None:
    """One exclusive temporary file linked into place: a second put of a key answers
    False and changes nothing, no temporary file stays, the file is the owner's only,
    and a conversation's directory purged meanwhile is made again."""
    store = LocalBlobStore(tmp_path / "blobs")
    key = blob_key("t1", "c1", "a" * 64)

    async def scenario() -> None:
        assert await store.put(key, b"first", "text/plain")
        assert not await store.put(key, b"other bytes", "text/plain")
        assert (await store.get(key)).data == b"first"
        path = store.root / key
        assert path.stat().st_mode & 0o777 == 0o600
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
        assert await store.delete_prefix(key) == 5  # one key: its conversation's dir only
        assert await store.delete_prefix(conversation_prefix("t1", "c1")) == 0
        path.parent.rmdir()
        assert await store.put(key, b"again", "text/plain")
        assert await store.usage("t1/") == 5

    asyncio.run(scenario())


def _received(*attachments: Attachment) -> MessageReceived:
    return MessageReceived(
        event_id="e1",
        conversation_id="c1",
        tenant_id="t1",
        seq=1,
        occurred_at=0,
        channel="api",
        customer_id="u1",
        text="",
        channel_message_id="m1",
        command_id="k1",
        attachments=attachments,
    )


async def _accept_photo(store: LocalBlobStore) -> Attachment:
    """The sample photo accepted into conversation t1/c1."""
    return await accept(
        store, jpeg(), name="p.jpg", tenant="t1", conversation="c1", channel="api", policy=POLICY
    )


def test_the_worker_makes_the_thumbnails_of_new_images_once(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    thumbnails = Thumbnails(store, POLICY, concurrency=1)

    async def scenario() -> None:
        photo = await _accept_photo(store)
        text = await accept(
            store,
            b"hello\n",
            name="a.txt",
            tenant="t1",
            conversation="c1",
            channel="api",
            policy=POLICY,
        )
        assert not await store.exists(photo.thumbnail_key) and not text.thumbnail_key
        event = _received(photo, text)
        thumbnails.observe([(None, event), (None, event)])  # a redelivered batch too
        await thumbnails.idle()
        made = await store.get(photo.thumbnail_key)
        assert Image.open(io.BytesIO(made.data)).size == (320, 240)
        thumbnails.observe([(None, event)])  # there already: nothing made again
        await thumbnails.idle()
        assert (await store.get(photo.thumbnail_key)).data == made.data

    asyncio.run(scenario())


def test_pixels_that_do_not_decode_answer_422_once_decoded(tmp_path: Path) -> None:
    """Structure sound, pixels not: accepted at the edge; the thumbnail is refused (422)
    and remembered as an empty blob, so the file is not decoded again; the file itself
    stays what was uploaded (a download)."""
    store = LocalBlobStore(tmp_path / "blobs")
    thumbnails = Thumbnails(store, POLICY)
    data = _corruptions(photo_jpeg(96, 96))["undefined table"]

    async def scenario() -> None:
        broken = await accept(
            store, data, name="p.jpg", tenant="t1", conversation="c1", channel="api", policy=POLICY
        )
        for _ in range(2):
            with pytest.raises(AttachmentRejected) as refused:
                await thumbnails.get(broken.thumbnail_key)
            assert refused.value.status == 422 and "decoded" in refused.value.reason
        assert (await store.get(broken.thumbnail_key)).data == b""  # remembered
        assert len((await store.get(broken.storage_key)).data) == broken.size

    asyncio.run(scenario())


def test_a_thumbnail_does_not_outlive_a_purge_of_its_conversation(tmp_path: Path) -> None:
    class PurgedMeanwhile(LocalBlobStore):
        """The conversation's files are purged while its thumbnail is being made."""

        async def put(self, key: str, data: bytes, content_type: str, customer: str = "") -> bool:
            if key.endswith(".thumb"):
                await self.delete_prefix(conversation_prefix("t1", "c1"))
            return await super().put(key, data, content_type, customer)

    store = PurgedMeanwhile(tmp_path / "blobs")

    async def scenario() -> None:
        photo = await _accept_photo(store)
        with pytest.raises(BlobMissing):
            await Thumbnails(store, POLICY).get(photo.thumbnail_key)
        assert await store.usage(conversation_prefix("t1", "c1")) == 0
        with pytest.raises(BlobMissing):  # gone: nothing to make it from
            await Thumbnails(store, POLICY).get(photo.thumbnail_key)

    asyncio.run(scenario())


# --- metadata left out without re-encoding (connectors/image_strip.py) --------------------

REENCODE = dataclasses.replace(POLICY, lossless_strip=False)  # every image decoded and re-encoded
GPS = {1: "N", 2: (39.0, 54.0, 0.0), 3: "E", 4: (116.0, 23.0, 0.0)}


def photo_jpeg(
    width: int = 96,
    height: int = 64,
    *,
    orientation: int = 0,
    icc: bytes | None = None,
    progressive: bool = False,
    mode: str = "RGB",
) -> bytes:
    """A JPEG with pixels that differ (so turning or re-encoding shows), GPS EXIF, and
    optionally an orientation and an ICC profile."""
    image = Image.linear_gradient("L").resize((width, height))
    if mode == "RGB":
        image = Image.merge("RGB", (image, image.transpose(Image.Transpose.ROTATE_180), image))
    corner = (0, 0, width // 4, height // 4)
    image.paste(255 if mode == "L" else (255, 0, 0), corner)  # a marked top left corner
    tags = Image.Exif()
    tags[0x010F] = "Camera maker"
    tags[0x8825] = GPS
    if orientation:
        tags[0x0112] = orientation
    out = io.BytesIO()
    extra = {"icc_profile": icc} if icc else {}
    image.save(out, "JPEG", exif=tags, progressive=progressive, quality=92, **extra)
    return out.getvalue()


def _segments(data: bytes) -> list[int]:
    """The JPEG's marker codes up to its first scan."""
    codes, pos = [], 2
    while data[pos + 1] != 0xDA:
        codes.append(data[pos + 1])
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return codes


def _srgb_profile() -> bytes:
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert isinstance(profile, bytes)
    return profile


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_loses_its_exif_and_keeps_its_pixels(progressive: bool) -> None:
    original = photo_jpeg(progressive=progressive)
    comment = original[:2] + b"\xff\xfe\x00\x0bhome addr" + original[2:]  # a COM segment
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta>GPSLatitude 39,54N</x:xmpmeta>"
    upload = (
        comment[:2]
        + b"\xff\xe1"
        + (len(xmp) + 2).to_bytes(2, "big")
        + xmp
        + comment[2:]
        + b"PK\x03\x04 a polyglot's zip"
    )
    assert Image.open(io.BytesIO(upload)).getexif().get_ifd(0x8825)  # GPS in the upload
    prepared = _prepare(upload)
    stored = prepared.blobs[0][1]
    assert not Image.open(io.BytesIO(stored)).getexif()  # no EXIF, so no GPS
    for gone in (b"Exif\x00\x00", b"xmpmeta", b"GPS", b"home addr", b"Camera maker", b"PK\x03"):
        assert gone not in stored
    assert _segments(stored)[0] == 0xE0 and not {0xE1, 0xFE} & set(_segments(stored))
    assert stored.endswith(b"\xff\xd9")
    # Lossless: the same compressed pixels (a re-encode would change them).
    with Image.open(io.BytesIO(stored)) as kept, Image.open(io.BytesIO(original)) as sent:
        assert kept.tobytes() == sent.tobytes()
    assert stored[stored.index(b"\xff\xda") :] == original[original.index(b"\xff\xda") :]
    attachment = prepared.attachment
    assert (attachment.width, attachment.height, attachment.size) == (96, 64, len(stored))
    thumb = Image.open(io.BytesIO(thumbnail_of(prepared)[0]))
    assert thumb.size == (96, 64) and thumb.format == "JPEG"


def test_a_large_jpeg_gets_its_thumbnail_from_a_scaled_decode() -> None:
    prepared = _prepare(photo_jpeg(1600, 1000))
    thumb = Image.open(io.BytesIO(thumbnail_of(prepared)[0]))
    assert thumb.size == (POLICY.thumbnail_px, 200)
    red = thumb.getpixel((2, 2))
    assert isinstance(red, tuple) and red[0] > red[1]  # the marked corner, not turned
    grey = _prepare(photo_jpeg(640, 480, mode="L"))
    assert Image.open(io.BytesIO(grey.blobs[0][1])).mode == "L"
    assert Image.open(io.BytesIO(thumbnail_of(grey)[0])).size == (320, 240)


@pytest.mark.parametrize("policy", [POLICY, REENCODE], ids=["lossless", "reencode"])
def test_a_jpeg_with_orientation_6_is_turned_and_loses_its_exif(
    policy: AttachmentPolicy,
) -> None:
    upload = photo_jpeg(96, 64, orientation=6)
    prepared = prepare(
        upload, name="p.jpg", tenant="t1", conversation="c1", channel="api", policy=policy
    )
    stored = Image.open(io.BytesIO(prepared.blobs[0][1]))
    assert stored.size == (64, 96) and not stored.getexif()
    assert (prepared.attachment.width, prepared.attachment.height) == (64, 96)
    corner = stored.getpixel((61, 2))  # turned 90° clockwise: top left went top right
    assert isinstance(corner, tuple) and corner[0] > 200 and corner[1] < 80
    # Re-encoded at the edge: its thumbnail stored with it.
    assert prepared.blobs[1][0] == prepared.attachment.thumbnail_key
    assert Image.open(io.BytesIO(prepared.blobs[1][1])).size == (64, 96)


@pytest.mark.parametrize("orientation", [0, 1, 6])
@pytest.mark.parametrize("policy", [POLICY, REENCODE], ids=["lossless", "reencode"])
def test_an_icc_profile_is_kept_on_every_path(orientation: int, policy: AttachmentPolicy) -> None:
    profile = _srgb_profile()
    prepared = prepare(
        photo_jpeg(orientation=orientation, icc=profile),
        name="p.jpg",
        tenant="t1",
        conversation="c1",
        channel="api",
        policy=policy,
    )
    stored = Image.open(io.BytesIO(prepared.blobs[0][1]))
    assert stored.info.get("icc_profile") == profile and not stored.getexif()
    plain = prepare(
        photo_jpeg(orientation=orientation),
        name="p.jpg",
        tenant="t1",
        conversation="c1",
        channel="api",
        policy=policy,
    )
    assert "icc_profile" not in Image.open(io.BytesIO(plain.blobs[0][1])).info


TRUNCATIONS = ("header only", "half", "no EOI", "last byte")


def _corruptions(data: bytes) -> dict[str, bytes]:
    scan = data.index(b"\xff\xda") + 300
    table = data.index(b"\xff\xc4")
    sos = data.index(b"\xff\xda")
    return {
        "header only": data[:400],
        "half": data[: len(data) // 2],
        "no EOI": data[:-2],
        "last byte": data[:-1],
        "bogus Huffman table": data[: table + 5] + b"\xff" * 30 + data[table + 35 :],
        "frame of 0 columns": data.replace(b"\x00\x60\x03", b"\x00\x00\x03", 1),
        "half, then EOI": data[: len(data) // 2] + b"\xff\xd9",
        "flipped scan bytes": data[:scan]
        + bytes(b ^ 0x5A for b in data[scan : scan + 40])
        + data[scan + 40 :],
        # Well formed, but the first scan names a Huffman table no DHT defines.
        "undefined table": data[: sos + 6] + b"\x33" + data[sos + 7 :],
    }


def _verdict(data: bytes, policy: AttachmentPolicy) -> str:
    """What becomes of an upload: refused at the edge, refused when its thumbnail is
    made (its pixels decoded after the upload), or accepted."""
    try:
        prepared = prepare(
            data, name="p.jpg", tenant="t1", conversation="c1", channel="api", policy=policy
        )
    except AttachmentRejected as exc:
        assert exc.status == 422 and "decoded" in exc.reason
        return "refused at the edge"
    try:
        thumbnail_of(prepared)
    except AttachmentRejected as exc:
        assert exc.status == 422 and "decoded" in exc.reason
        return "refused for its thumbnail"
    return "accepted"


@pytest.mark.parametrize("progressive", [False, True])
def test_a_corrupt_jpeg_is_refused_at_the_edge_or_for_its_thumbnail(progressive: bool) -> None:
    """What each stage catches. The edge reads the header and walks the structure
    (``image_strip``): a truncated file (no EOI, a segment or a scan running past the
    end) or a broken table segment is not a shape it keeps, so it gets the full decode
    at upload and is refused (422), as when every image was decoded there. A file whose
    structure is sound but whose pixels do not decode (here a scan naming a Huffman
    table no DHT defines) is accepted by the edge and refused when its pixels are first
    decoded, for its thumbnail: the route answers 422, the file stays a download. The
    two stages together refuse exactly what decoding at the edge (``decode_at_edge``)
    and a full re-encode refuse, and let in only what they let in (libjpeg repairs a
    damaged scan with a warning on every path)."""
    verdicts = {}
    for label, data in _corruptions(photo_jpeg(96, 96, progressive=progressive)).items():
        deferred = _verdict(data, POLICY)
        at_edge = {_verdict(data, policy) for policy in (DECODE, REENCODE)}
        assert len(at_edge) == 1, label
        assert deferred.startswith("refused") == at_edge.pop().startswith("refused"), label
        verdicts[label] = deferred
    assert all(verdicts[label] == "refused at the edge" for label in TRUNCATIONS), verdicts
    assert verdicts["undefined table"] == "refused for its thumbnail"
    assert verdicts["flipped scan bytes"] == "accepted"
    assert sum(v.startswith("refused") for v in verdicts.values()) >= 6


def test_shapes_the_lossless_path_does_not_handle_are_reencoded() -> None:
    cmyk = io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(cmyk, "JPEG")  # Adobe APP14
    assert strip_jpeg(cmyk.getvalue()) is None
    stored = Image.open(io.BytesIO(_prepare(cmyk.getvalue()).blobs[0][1]))
    assert stored.mode == "RGB"
    assert strip_jpeg(photo_jpeg()[:-2]) is None  # no EOI
    assert strip_jpeg(b"\xff\xd8\xff\xd9") is None  # no scan


def png_with_metadata(alpha: bool = False, orientation: int = 0) -> bytes:
    from PIL import PngImagePlugin

    image = Image.linear_gradient("L").resize((80, 60)).convert("RGBA" if alpha else "RGB")
    image.putpixel((0, 0), (255, 0, 0, 255) if alpha else (255, 0, 0))
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "home: 39.9N 116.4E")
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>GPSLatitude</x:xmpmeta>", zip=True)
    tags = Image.Exif()
    tags[0x8825] = GPS
    if orientation:
        tags[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "PNG", pnginfo=info, exif=tags)
    return out.getvalue()


def test_a_png_loses_its_text_and_exif_chunks_and_keeps_its_pixels() -> None:
    for alpha in (False, True):
        upload = png_with_metadata(alpha) + b"trailing"
        prepared = _prepare(upload, name="s.png")
        stored = prepared.blobs[0][1]
        for gone in (b"tEXt", b"iTXt", b"eXIf", b"home", b"xmpmeta", b"trailing"):
            assert gone not in stored
        with Image.open(io.BytesIO(stored)) as kept, Image.open(io.BytesIO(upload)) as sent:
            assert kept.tobytes() == sent.tobytes() and not kept.getexif()
        assert thumbnail_of(prepared)[1] == ("image/png" if alpha else "image/jpeg")
    turned = _prepare(png_with_metadata(orientation=6), name="s.png")  # re-encoded
    stored_image = Image.open(io.BytesIO(turned.blobs[0][1]))
    assert stored_image.size == (60, 80) and not stored_image.getexif()
    for gone in (b"tEXt", b"iTXt", b"eXIf", b"home"):
        assert gone not in turned.blobs[0][1]


def test_an_mpo_keeps_only_its_first_picture() -> None:
    first = Image.new("RGB", (64, 48), (200, 20, 20))
    out = io.BytesIO()
    first.save(out, "MPO", save_all=True, append_images=[Image.new("RGB", (64, 48), "blue")])
    assert out.getvalue().count(b"\xff\xd8") >= 2  # two pictures
    stored = _prepare(out.getvalue()).blobs[0][1]
    assert stored.count(b"\xff\xd8") == 1 and b"MPF" not in stored
    pixel = Image.open(io.BytesIO(stored)).getpixel((32, 24))
    assert isinstance(pixel, tuple) and pixel[0] > 150


def test_a_corrupt_png_is_refused() -> None:
    data = png_with_metadata()
    idat = data.index(b"IDAT")
    for broken in (data[: len(data) // 2], data[: idat + 20] + b"\x00" * 40 + data[idat + 60 :]):
        with pytest.raises(AttachmentRejected) as refused:
            _prepare(broken, name="s.png")
        assert refused.value.status == 422
    assert strip_png(data[: idat + 20] + b"\x00" * 40 + data[idat + 60 :]) is None  # the CRC


def test_gif_comments_and_webp_exif_are_not_carried_over() -> None:
    still = Image.new("RGB", (64, 48), (200, 10, 10))
    for extra in ({}, {"save_all": True, "append_images": [Image.new("RGB", (64, 48), "blue")]}):
        out = io.BytesIO()
        still.save(out, "GIF", comment=b"home: 39.9N 116.4E", **extra)
        assert b"home:" in out.getvalue()
        assert b"home:" not in _prepare(out.getvalue(), name="a.gif").blobs[0][1]
    tags = Image.Exif()
    tags[0x8825] = GPS
    out = io.BytesIO()
    still.save(out, "WEBP", exif=tags, xmp=b"<x:xmpmeta>GPSLatitude</x:xmpmeta>")
    stored = _prepare(out.getvalue(), name="a.webp").blobs[0][1]
    assert b"xmpmeta" not in stored and not Image.open(io.BytesIO(stored)).getexif()
