import io
import json
from importlib import resources

import pytest
from fastavro import parse_schema, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas.codec import CODEC, MAGIC, DecodeError
from schemas.records import RECORD_TYPES, MessageReceived, Record
from tests.samples import EVT, SAMPLES


def test_every_record_type_has_a_sample() -> None:
    assert {s.type for s in SAMPLES} == set(RECORD_TYPES)


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: r.type)
def test_round_trip(record: Record) -> None:
    data = CODEC.encode(record)
    assert data[:2] == MAGIC
    assert CODEC.decode(data) == record


@pytest.mark.parametrize("name", sorted(RECORD_TYPES))
def test_classes_mirror_their_schemas(name: str) -> None:
    schema = json.loads((resources.files("schemas") / "avro" / f"{name}.avsc").read_text())
    in_schema = [f["name"] for f in schema["fields"]]
    in_class = list(SAMPLES[[s.type for s in SAMPLES].index(name)].to_avro())
    assert sorted(in_schema) == sorted(in_class)


def _fingerprint_le(schema: dict[str, object]) -> bytes:
    parsed = parse_schema(schema)
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))[::-1]


def test_old_writer_schema_is_read_by_the_new_reader() -> None:
    """Bytes written with MessageReceived v1 (no ``language``) decode with v2."""
    old = json.loads(
        (resources.files("schemas") / "avro" / "history" / "MessageReceived.v1.avsc").read_text()
    )
    body = io.BytesIO()
    fields = {k: v for k, v in EVT.items()}
    fields.update(
        type="MessageReceived",
        schema_version=1,
        channel="api",
        customer_id="u1",
        text="hello",
        channel_message_id="m1",
        command_id="c1",
    )
    schemaless_writer(body, parse_schema(old), fields)
    data = MAGIC + _fingerprint_le(old) + body.getvalue()

    decoded = CODEC.decode(data)

    assert isinstance(decoded, MessageReceived)
    assert decoded.text == "hello" and decoded.language is None
    assert decoded.schema_version == 2


def test_unknown_fingerprint_is_a_decode_error_with_a_reason() -> None:
    data = CODEC.encode(SAMPLES[0])
    forged = data[:2] + b"\xde\xad\xbe\xef\x00\x00\x00\x00" + data[10:]
    with pytest.raises(DecodeError, match="unknown schema fingerprint deadbeef"):
        CODEC.decode(forged)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "bad magic"),
        (b'{"json": true}', "bad magic"),
        (MAGIC + b"\x00" * 3, "too short"),
    ],
)
def test_garbage_is_a_decode_error(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        CODEC.decode(data)


def test_truncated_body_is_a_decode_error() -> None:
    data = CODEC.encode(SAMPLES[4])
    with pytest.raises(DecodeError, match="corrupt MessageReceived"):
        CODEC.decode(data[:-5])
