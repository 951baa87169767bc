"""A conversation's exact history, and a hash chain over it so tampering shows.

The chain is computed over the exact bytes each event had on the log (Avro
single-object encoding), in ``seq`` order::

    link_0 = 32 zero bytes
    link_n = sha256(link_{n-1} || event_n bytes)

Sources of the bytes: the Kafka log (``kefu.events``) and the ClickHouse archive
(column ``avro_base64``, so an audit still works once Kafka's retention dropped them).
A Kafka record holds one event (written before commits) or a ``Commit`` of several;
either way the chain links each event's own bytes, and an entry names the partition
and offset of the record that holds it (the events of one commit share them).
An export is JSON lines, one per event (its bytes, their sha256, the link, and what the
event says in words), then a ``head`` line. ``verify`` rechecks an export on its own
(bytes vs hash vs link vs the words) and against a source; it names the first broken
link. Keep a copy of an export's head somewhere else: it anchors the history as it
was when exported.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.codec import CODEC, DecodeError
from schemas.records import Event
from schemas.time import iso_ms

GENESIS = bytes(32)


@dataclass(frozen=True, slots=True)
class Entry:
    """One event of a conversation's history as a source holds it: ``raw`` is the
    event's own bytes, ``partition``/``offset`` the position of its Kafka record."""

    seq: int
    raw: bytes
    partition: int = -1
    offset: int = -1


def link(previous: bytes, raw: bytes) -> bytes:
    return hashlib.sha256(previous + raw).digest()


def chain(raws: Iterable[bytes]) -> list[bytes]:
    links, previous = [], GENESIS
    for raw in raws:
        previous = link(previous, raw)
        links.append(previous)
    return links


def ordered(entries: Iterable[Entry]) -> tuple[list[Entry], list[str]]:
    """Entries by seq, one per seq; a seq held with two different byte strings is a
    conflict (a redelivered event has the same bytes and is simply dropped)."""
    by_seq: dict[int, Entry] = {}
    problems = []
    for entry in entries:
        seen = by_seq.get(entry.seq)
        if seen is None:
            by_seq[entry.seq] = entry
        elif seen.raw != entry.raw:
            problems.append(f"seq {entry.seq}: two different events on the log")
    result = [by_seq[s] for s in sorted(by_seq)]
    for n, entry in enumerate(result, start=1):
        if entry.seq != n:
            problems.append(f"seq {n}: missing (next held is {entry.seq})")
            break
    return result, problems


def describe(event: Event) -> dict[str, Any]:
    """What an event says, in words: who, what, which model or agent, moderation."""
    fields = event.to_avro()
    out: dict[str, Any] = {
        "type": event.type,
        "at": iso_ms(event.occurred_at),
    }
    match event.type:
        case "MessageReceived":
            out.update(who=f"customer {fields['customer_id']}", channel=fields["channel"])
            out["text"] = fields["text"]
        case "ReplyProduced":
            author = fields["author"]
            out["who"] = "ai" if author == "ai" else f"agent {author}"
            out.update(text=fields["text"], responder=fields["responder"])
            out.update(confidence=fields["confidence"], intent=fields.get("intent"))
        case "MessageModerated":
            out.update(direction=fields["direction"], verdict=fields["verdict"])
            out.update(categories=fields.get("categories", []), text=fields["text"])
        case _:
            skip = {"event_id", "conversation_id", "tenant_id", "seq", "occurred_at", "type"}
            out.update({k: v for k, v in fields.items() if k not in skip and k != "schema_version"})
    return json.loads(json.dumps(out, default=str, ensure_ascii=False))  # type: ignore[no-any-return]


def export_lines(conversation: str, entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """The export of a (seq-ordered) history: one record per event, then the head."""
    lines: list[dict[str, Any]] = []
    previous = GENESIS
    tenant = ""
    for entry in entries:
        event = CODEC.decode(entry.raw)
        assert isinstance(event, Event)
        tenant = event.tenant_id
        previous = link(previous, entry.raw)
        lines.append(
            {
                "seq": entry.seq,
                "event_id": event.event_id,
                "partition": entry.partition,
                "offset": entry.offset,
                "event": describe(event),
                "sha256": hashlib.sha256(entry.raw).hexdigest(),
                "link": previous.hex(),
                "avro_base64": base64.b64encode(entry.raw).decode("ascii"),
            }
        )
    lines.append(
        {
            "head": previous.hex(),
            "conversation_id": conversation,
            "tenant_id": tenant,
            "events": len(entries),
        }
    )
    return lines


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    events: int
    head: str
    broken_at: int | None = None  # the seq of the first broken link
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "head": self.head,
            "broken_at": self.broken_at,
            "reason": self.reason,
        }


def verify_entries(entries: Sequence[Entry]) -> Verdict:
    """A source's own history: complete seqs, every event decodable."""
    ordered_entries, problems = ordered(entries)
    if problems:
        seq = int(problems[0].split()[1].rstrip(":"))
        return Verdict(False, len(ordered_entries), "", seq, problems[0])
    for entry in ordered_entries:
        try:
            CODEC.decode(entry.raw)
        except DecodeError as exc:
            return Verdict(False, len(ordered_entries), "", entry.seq, exc.reason)
    links = chain(e.raw for e in ordered_entries)
    return Verdict(True, len(ordered_entries), links[-1].hex() if links else GENESIS.hex())


def verify_export(lines: Sequence[dict[str, Any]], source: Sequence[Entry] | None) -> Verdict:
    """An export checked on its own (each record's bytes, hash, link and words agree),
    then against ``source`` (the log or the archive), link by link."""
    records = [line for line in lines if "head" not in line]
    heads = [line for line in lines if "head" in line]
    previous = GENESIS
    expected = chain(e.raw for e in source) if source is not None else None
    for n, record in enumerate(records):
        seq = int(record.get("seq", -1))
        try:
            raw = base64.b64decode(record["avro_base64"], validate=True)
            event = CODEC.decode(raw)
        except (KeyError, ValueError, DecodeError) as exc:
            return Verdict(False, len(records), "", seq, f"undecodable event bytes: {exc}")
        if seq != n + 1 or not isinstance(event, Event) or event.seq != seq:
            reason = f"out of sequence (record {n + 1} holds seq {seq})"
            return Verdict(False, len(records), "", n + 1, reason)
        if hashlib.sha256(raw).hexdigest() != record.get("sha256"):
            return Verdict(False, len(records), "", seq, "bytes do not match their sha256")
        previous = link(previous, raw)
        if previous.hex() != record.get("link"):
            return Verdict(False, len(records), "", seq, "link does not follow from the one before")
        if describe(event) != record.get("event"):
            return Verdict(False, len(records), "", seq, "the words differ from the event bytes")
        if expected is not None:
            if n >= len(expected):
                return Verdict(False, len(records), "", seq, "not in the source")
            if expected[n] != previous:
                return Verdict(False, len(records), "", seq, "differs from the source")
    head = previous.hex()
    if len(heads) != 1 or heads[0].get("head") != head or heads[0].get("events") != len(records):
        return Verdict(False, len(records), head, None, "the head line does not match the events")
    if expected is not None and len(expected) != len(records):
        return Verdict(
            False,
            len(records),
            head,
            len(records) + 1,
            f"the source holds {len(expected)} events, the export {len(records)}",
        )
    return Verdict(True, len(records), head)


def compare(a: Sequence[Entry], b: Sequence[Entry]) -> Verdict:
    """Two sources of the same history (the log and the archive), link by link."""
    links_a, links_b = chain(e.raw for e in a), chain(e.raw for e in b)
    for n, (x, y) in enumerate(zip(links_a, links_b, strict=False)):
        if x != y:
            return Verdict(False, len(links_a), "", n + 1, "the log and the archive differ")
    if len(links_a) != len(links_b):
        reason = f"the log holds {len(links_a)} events, the archive {len(links_b)}"
        return Verdict(False, len(links_a), "", min(len(links_a), len(links_b)) + 1, reason)
    return Verdict(True, len(links_a), links_a[-1].hex() if links_a else GENESIS.hex())


def archive_sql(database: str, conversation: str, tenant: str = "") -> str:
    from projections.clickhouse_views import quote

    where = f"conversation_id = {quote(conversation)}"
    if tenant:
        where += f" AND tenant_id = {quote(tenant)}"
    return (
        f"SELECT seq, avro_base64, kafka_partition, kafka_offset FROM {database}.events FINAL "
        f"WHERE {where} ORDER BY seq"
    )


def archive_entries(rows: Iterable[Sequence[Any]]) -> list[Entry]:
    return [
        Entry(int(seq), base64.b64decode(b64), int(partition), int(offset))
        for seq, b64, partition, offset in rows
        if b64
    ]


def log_entries(conversation: str, partition: int, offset: int, value: bytes) -> list[Entry]:
    """The events of ``conversation`` in one Kafka record of the log, in order.

    By each event's own ``conversation_id``, not the record's key: a commit of batched
    delivery receipts holds events of several conversations under one key. A record
    whose bytes do not contain the id holds none of its events (Avro writes strings
    as their UTF-8 bytes), so most records are skipped undecoded. Undecodable bytes
    are skipped: the live consumers dead-lettered them, and they name no conversation.
    """
    if conversation.encode() not in value:
        return []
    try:
        events = CODEC.unpack(value)
    except DecodeError:
        return []
    out = []
    for raw in events:
        try:
            _, fields = CODEC.decode_fields(raw)
        except DecodeError:
            continue
        if fields.get("conversation_id") == conversation and "seq" in fields:
            out.append(Entry(int(fields["seq"]), raw, partition, offset))
    return out


async def read_log(
    bootstrap: str,
    topic: str,
    conversation: str,
    kafka_options: Mapping[str, Any] | None = None,
) -> list[Entry]:
    """Every event of ``conversation`` on the log now (every partition, from the
    beginning to the end offsets at the start), with no consumer group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",  # aborted transactions are not the history
        **dict(kafka_options or {}),
    )
    await consumer.start()
    try:
        found = consumer.partitions_for_topic(topic)
        if not found:
            # A group-less consumer has no subscription: the full metadata names them.
            found = (await consumer._client.fetch_all_metadata()).partitions_for_topic(topic)
        parts = [TopicPartition(topic, p) for p in sorted(found or ())]
        if not parts:
            return []
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        out: list[Entry] = []
        pending = [tp for tp in parts if await consumer.position(tp) < ends[tp]]
        while pending:
            fetched = await consumer.getmany(*pending, timeout_ms=1000)
            for tp, records in fetched.items():
                for record in records:
                    if record.offset < ends[tp]:
                        value = record.value or b""
                        out += log_entries(conversation, tp.partition, record.offset, value)
            # Positions, not last offsets: transaction markers leave gaps at the end.
            pending = [tp for tp in pending if await consumer.position(tp) < ends[tp]]
        return out
    finally:
        await consumer.stop()
