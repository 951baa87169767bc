import io
import json
from importlib import resources
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas.codec import CODEC, MAGIC, DecodeError
from schemas.records import RECORD_TYPES, Commit, MessageModerated, MessageReceived, Record
from tests.samples import EVT, INVOICE, PHOTO
from tests.samples import SAMPLES as _SAMPLES

_ENV: dict[str, Any] = {
    "conversation_id": "conv-1",
    "tenant_id": "t1",
    "occurred_at": 1_700_000_000_123,
}
RECEIVED = MessageReceived(
    event_id="e-1",
    seq=1,
    channel="api",
    customer_id="u1",
    text="hi",
    channel_message_id="m1",
    command_id="c1",
    **_ENV,
)
MODERATED = MessageModerated(
    event_id="e-2", seq=2, message_event_id="e-1", direction="in", verdict="pass", text="hi", **_ENV
)
# tests/samples.py has no Commit (yet): one here, so every record type has a sample.
SAMPLES = [*(s for s in _SAMPLES if s.type != "Commit"), CODEC.commit([RECEIVED, MODERATED], "k")]

# Frozen bytes: never regenerate them. MODERATED alone, as written before commits (one
# event per Kafka record), and RECEIVED + MODERATED as one Commit keyed "conv-1".
OLD_SINGLE = bytes.fromhex(
    "c3011c57fde290af19dc06652d320c636f6e762d3104743104f6a1abfef962204d6573736167654d6f64"
    "6572617465640206652d3104696e08706173730004686900"
)
OLD_RECEIVED = bytes.fromhex(
    "c301d9ce5bd5cc328c2e06652d310c636f6e762d3104743102f6a1abfef9621e4d657373616765526563"
    "65697665640406617069047531046869046d3104633100"
)
COMMIT_V1 = bytes.fromhex(
    "c30158ecd28f4ed292590474310c636f6e762d31048201c301d9ce5bd5cc328c2e06652d310c636f6e76"
    "2d3104743102f6a1abfef9621e4d65737361676552656365697665640406617069047531046869046d31"
    "046331008401c3011c57fde290af19dc06652d320c636f6e762d3104743104f6a1abfef962204d657373"
    "6167654d6f646572617465640206652d3104696e08706173730004686900000c436f6d6d697402"
)


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
    assert decoded.schema_version == MessageReceived.SCHEMA_VERSION


def test_receive_message_v2_bytes_decode_with_no_team() -> None:
    """ReceiveMessage v3 added ``team`` (the web chat's routing); v2 bytes read as ""."""
    from schemas.records import ReceiveMessage

    old = json.loads(
        (resources.files("schemas") / "avro" / "history" / "ReceiveMessage.v2.avsc").read_text()
    )
    body = io.BytesIO()
    fields = {
        "command_id": "c1",
        "conversation_id": "conv-1",
        "tenant_id": "t1",
        "issued_at": 1,
        "type": "ReceiveMessage",
        "schema_version": 2,
        "channel": "web",
        "customer_id": "u1",
        "text": "hello",
        "channel_message_id": "m1",
        "language": None,
        "attachments": [],
    }
    schemaless_writer(body, parse_schema(old), fields)
    decoded = CODEC.decode(MAGIC + _fingerprint_le(old) + body.getvalue())
    assert isinstance(decoded, ReceiveMessage)
    assert decoded.text == "hello" and decoded.team == ""
    assert decoded.schema_version == ReceiveMessage.SCHEMA_VERSION == 3


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


def test_frozen_commit_of_two_events_reads_with_todays_schemas() -> None:
    commit = CODEC.decode(COMMIT_V1)
    assert isinstance(commit, Commit)
    assert (commit.tenant_id, commit.key) == ("t1", "conv-1")
    assert CODEC.is_commit(COMMIT_V1)
    # Each event keeps its own exact bytes (what the audit chain hashes), in order.
    assert CODEC.unpack(COMMIT_V1) == [OLD_RECEIVED, OLD_SINGLE]
    assert CODEC.decode_all(COMMIT_V1) == [RECEIVED, MODERATED]
    # Round trips: the decoded commit, and a commit of the decoded events.
    assert CODEC.decode(CODEC.encode(commit)) == commit
    again = CODEC.encode(CODEC.commit(CODEC.decode_all(COMMIT_V1), "conv-1"))
    assert CODEC.decode_all(again) == [RECEIVED, MODERATED]


def test_a_record_written_before_commits_is_one_event() -> None:
    assert not CODEC.is_commit(OLD_SINGLE)
    assert CODEC.unpack(OLD_SINGLE) == [OLD_SINGLE]
    assert CODEC.decode_all(OLD_SINGLE) == [MODERATED] == [CODEC.decode(OLD_SINGLE)]
    assert CODEC.decode_all(CODEC.encode(MODERATED)) == [MODERATED]  # round trip


def test_an_empty_commit_holds_no_event_and_a_cut_one_is_a_decode_error() -> None:
    empty = CODEC.encode(CODEC.commit([], "k"))
    assert CODEC.unpack(empty) == [] and CODEC.decode_all(empty) == []
    with pytest.raises(DecodeError, match="corrupt Commit"):
        CODEC.unpack(COMMIT_V1[:-20])


# Frozen bytes of MessageReceived version 3 (two attachments): never regenerate them.
RECEIVED_V3_WITH_ATTACHMENTS = bytes.fromhex(
    "c301cb62e12637c857d806652d310c636f6e762d3104743106f6a1abfef9621e4d657373616765526563"
    "656976656406067765620475310ce98080e6acbe046d3106632d3102047a68040a696d61676514696d61"
    "67652f6a70656780c00c14e7a0b4e68d9f2e6a7067800161626162616261626162616261626162616261"
    "626162616261626162616261626162616261626162616261626162616261626162616261626162616261"
    "6261628c0174312f61622f61626162616261626162616261626162616261626162616261626162616261"
    "626162616261626162616261626162616261626162616261626162616261626162c00cb009008c017431"
    "2f63642f6364636463646364636463646364636463646364636463646364636463646364636463646364"
    "63646364636463646364636463646364636463646364636463640866696c651e6170706c69636174696f"
    "6e2f706466802016696e766f6963652e7064668001656665666566656665666566656665666566656665"
    "666566656665666566656665666566656665666566656665666566656665666566656665666566656665"
    "668c0174312f65662f656665666566656665666566656665666566656665666566656665666566656665"
    "666566656665666566656665666566656665666566656665666566656665660000000000"
)


def test_frozen_message_with_attachments_reads_with_todays_schema() -> None:
    """Attachments are metadata records inside the event (never the bytes)."""
    decoded = CODEC.decode(RECEIVED_V3_WITH_ATTACHMENTS)
    assert isinstance(decoded, MessageReceived)
    assert [a.name for a in decoded.attachments] == ["破损.jpg", "invoice.pdf"]
    assert decoded.attachments == (PHOTO, INVOICE)
    assert len(RECEIVED_V3_WITH_ATTACHMENTS) < 1024  # a reference, not a file


def test_a_message_of_version_2_has_no_attachments() -> None:
    decoded = CODEC.decode(OLD_RECEIVED)
    assert isinstance(decoded, MessageReceived) and decoded.attachments == ()
