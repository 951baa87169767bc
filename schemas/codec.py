"""Avro single-object encoding of kefu records, with no registry server.

Wire format (Avro spec, "Single object encoding"): ``C3 01``, the 8-byte little-endian
CRC-64-AVRO fingerprint of the writer schema's canonical form, then the Avro binary
body. Every schema kefu ever wrote (``avro/*.avsc`` and ``avro/history/*.avsc``) is
known by fingerprint, so old bytes decode with today's reader schema.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas.records import RECORD_TYPES, Commit, Record

MAGIC = b"\xc3\x01"
HEADER_SIZE = len(MAGIC) + 8


class DecodeError(ValueError):
    """Bytes that are not a record this codec can read; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Schema:
    name: str
    version: int
    parsed: dict[str, Any]
    fingerprint: bytes


def _load(text: str) -> _Schema:
    raw = json.loads(text)
    parsed = parse_schema(raw)
    assert isinstance(parsed, dict), "kefu schemas are records"
    digest = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
    # The spec stores the 64-bit fingerprint little-endian; fastavro's hex is big-endian.
    return _Schema(raw["name"], int(raw.get("kefu_schema_version", 1)), parsed, digest[::-1])


def _packaged_schemas() -> tuple[dict[str, _Schema], dict[bytes, _Schema]]:
    root = resources.files("schemas") / "avro"
    current: dict[str, _Schema] = {}
    every: dict[bytes, _Schema] = {}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".avsc"):
            schema = _load(entry.read_text("utf-8"))
            current[schema.name] = schema
            every[schema.fingerprint] = schema
    for entry in (root / "history").iterdir():
        if entry.name.endswith(".avsc"):
            schema = _load(entry.read_text("utf-8"))
            every[schema.fingerprint] = schema
    return current, every


class AvroCodec:
    """Encodes records with their current schema; decodes any known writer schema."""

    def __init__(self) -> None:
        self._current, self._by_fingerprint = _packaged_schemas()
        missing = set(RECORD_TYPES) - set(self._current)
        if missing:
            raise RuntimeError(f"records without a schema: {sorted(missing)}")
        self._headers = {name: MAGIC + s.fingerprint for name, s in self._current.items()}
        self._commit_fingerprint = self._current[Commit.__name__].fingerprint
        self._commit_layout = self._reads_commits_directly()
        # Per record type, what opens its sealed fields in place after decoding
        # (``schemas.sealing.install``: crypto-shredding); empty: values as written.
        self.openers: dict[type[Record], Callable[[dict[str, Any]], None]] = {}

    def schema_of(self, name: str) -> dict[str, Any]:
        return self._current[name].parsed

    def encode(self, record: Record) -> bytes:
        name = record.type
        out = io.BytesIO()
        out.write(self._headers[name])
        schemaless_writer(out, self._current[name].parsed, record.to_avro())
        return out.getvalue()

    def commit(self, records: Sequence[Record], key: str) -> Commit:
        """The records of one decision as one ``Commit`` (each encoded on its own)."""
        tenant_id = str(getattr(records[0], "tenant_id", "")) if records else ""
        return Commit(tenant_id=tenant_id, key=key, events=[self.encode(r) for r in records])

    def is_commit(self, data: bytes) -> bool:
        return data[2:HEADER_SIZE] == self._commit_fingerprint and data[:2] == MAGIC

    def unpack(self, data: bytes) -> list[bytes]:
        """The bytes of each record a Kafka value holds: a ``Commit``'s events in order,
        or the value itself (records written before commits hold one event)."""
        if not self.is_commit(data):
            return [data]
        if self._commit_layout:
            return commit_events(data)
        commit = self.decode(data)
        assert isinstance(commit, Commit)
        return commit.events

    def _reads_commits_directly(self) -> bool:
        """Whether today's ``Commit`` starts as :func:`commit_events` reads it."""
        fields = [(f["name"], f["type"]) for f in self.schema_of(Commit.__name__)["fields"]]
        events = {"type": "array", "items": "bytes"}
        return fields[:3] == [("tenant_id", "string"), ("key", "string"), ("events", events)]

    def decode_all(self, data: bytes) -> list[Record]:
        """Every record a Kafka value holds (``unpack``), decoded."""
        return [self.decode(raw) for raw in self.unpack(data)]

    def peek(self, data: bytes) -> type[Record] | None:
        """The record type in ``data`` from its schema fingerprint alone, without
        decoding the body (None when unknown): lets a consumer skip what it ignores."""
        writer = self._by_fingerprint.get(data[2:HEADER_SIZE])
        return None if writer is None else RECORD_TYPES.get(writer.name)

    def decode(self, data: bytes) -> Record:
        cls, fields = self.decode_fields(data)
        return cls.from_avro(fields)

    def decode_fields(self, data: bytes) -> tuple[type[Record], dict[str, Any]]:
        """The record's class and its fields as read with today's schema (defaults
        filled in; ``type`` and ``schema_version`` as written), without building the
        record: for consumers that only pass the fields on (the ClickHouse rows)."""
        if len(data) < HEADER_SIZE or data[:2] != MAGIC:
            raise DecodeError("not Avro single-object encoding (bad magic or too short)")
        writer = self._by_fingerprint.get(data[2:HEADER_SIZE])
        if writer is None:
            raise DecodeError(f"unknown schema fingerprint {data[2:HEADER_SIZE].hex()}")
        reader = self._current.get(writer.name)
        cls = RECORD_TYPES.get(writer.name)
        if reader is None or cls is None:
            raise DecodeError(f"no reader for record type {writer.name}")
        try:
            # Bytes in today's schema need no resolution (fastavro reads them ~25 % faster).
            resolving = None if reader is writer else reader.parsed
            body = schemaless_reader(io.BytesIO(data[HEADER_SIZE:]), writer.parsed, resolving)
        except Exception as exc:  # fastavro raises several types for corrupt bodies
            raise DecodeError(f"corrupt {writer.name} body: {exc!r}") from exc
        opener = self.openers.get(cls)
        if opener is not None:
            opener(body)  # type: ignore[arg-type]
        return cls, body  # type: ignore[return-value]


def commit_events(data: bytes) -> list[bytes]:
    """A ``Commit``'s events read straight from its Avro body: two strings, then the
    array of bytes; the fields after it are not read. ~2 µs a commit, where fastavro's
    decode and the record's construction took ~5 (``tests/test_replay.py`` checks
    both agree)."""
    try:
        pos = HEADER_SIZE
        for _ in range(2):  # tenant_id, key
            size, pos = _long(data, pos)
            pos += size
        events: list[bytes] = []
        while True:
            count, pos = _long(data, pos)
            if count == 0:
                break
            if count < 0:  # a block with its size in bytes
                count = -count
                _, pos = _long(data, pos)
            for _ in range(count):
                size, pos = _long(data, pos)
                if size < 0 or pos + size > len(data):
                    raise IndexError("an event past the end")
                events.append(data[pos : pos + size])
                pos += size
        return events
    except IndexError as exc:
        raise DecodeError("corrupt Commit body (truncated)") from exc


def _long(data: bytes, pos: int) -> tuple[int, int]:
    """Avro's zig-zag varint at ``pos``, and the position after it."""
    byte = data[pos]
    pos += 1
    n = byte & 0x7F
    shift = 7
    while byte & 0x80:
        byte = data[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), pos


CODEC = AvroCodec()
