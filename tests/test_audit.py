"""Audit: a conversation's history is exported with a hash chain over its exact bytes;
verify recomputes it from the log and names the first broken link when an exported
record, or an event stored in the ClickHouse archive, was altered. The log holds both
record formats: one event per record (written before commits) and ``Commit`` records
of several events; the chain is over each event's own bytes either way."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from kefu.settings import Settings
from projections.audit import (
    GENESIS,
    Entry,
    chain,
    describe,
    export_lines,
    log_entries,
    ordered,
    verify_entries,
    verify_export,
)
from projections.clickhouse_events import compact_rows, row_for
from schemas.codec import CODEC
from schemas.records import (
    CsatRequested,
    Event,
    MessageDelivered,
    MessageModerated,
    MessageReceived,
)
from schemas.time import now_ms
from schemas.topics import TopicNames
from tests.conftest import wait_for
from tests.test_pipeline import analytics
from tests.test_replay import cli, private_traffic, settled


def rechain(lines: list[dict[str, Any]]) -> None:
    """What a careful forger does: fix every hash, link and the head after an edit."""
    previous = GENESIS
    for line in lines[:-1]:
        raw = base64.b64decode(line["avro_base64"])
        line["sha256"] = hashlib.sha256(raw).hexdigest()
        previous = hashlib.sha256(previous + raw).digest()
        line["link"] = previous.hex()
        event = CODEC.decode(raw)
        assert isinstance(event, Event)
        line["event"] = describe(event)
    lines[-1]["head"] = previous.hex()


def write(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), "utf-8")


def test_chain_is_over_exact_bytes() -> None:
    assert chain([b"a", b"b"])[1] == hashlib.sha256(chain([b"a"])[0] + b"b").digest()
    gap = verify_entries([Entry(1, b"x"), Entry(3, b"y")])
    assert not gap.ok and gap.broken_at == 2


def test_export_verify_and_tampering(pipeline: Settings, tmp_path: Path) -> None:
    tenant = f"audit-{uuid.uuid4().hex[:8]}"
    (conversation,) = private_traffic(pipeline, tenant, conversations=1)
    wait_for(lambda: settled(pipeline, tenant, [conversation]), timeout=60, what="traffic")

    shown = cli(pipeline, "audit", "show", "--conversation", conversation)
    assert shown.exit_code == 0, shown.output
    assert "MessageReceived" in shown.output and "verified" in shown.output
    assert "customer cust-0" in shown.output and '"verdict": "mask"' in shown.output

    export = tmp_path / "history.jsonl"
    done = cli(pipeline, "audit", "export", "--conversation", conversation, "--out", str(export))
    assert done.exit_code == 0, done.output
    lines = [json.loads(x) for x in export.read_text("utf-8").splitlines()]
    events = len(lines) - 1
    assert lines[-1]["events"] == events >= 4 and lines[-1]["tenant_id"] == tenant

    ok = cli(pipeline, "audit", "verify", "--conversation", conversation, "--export", str(export))
    assert ok.exit_code == 0, ok.output
    assert f"{events} events, chain head {lines[-1]['head']}" in ok.output
    both = cli(pipeline, "audit", "verify", "--conversation", conversation)  # log vs archive
    assert both.exit_code == 0 and "the log against the archive" in both.output, both.output
    archived = cli(
        pipeline, "audit", "export", "--conversation", conversation, "--source", "archive"
    )
    assert archived.output.splitlines()[-1] == json.dumps(lines[-1], ensure_ascii=False)

    def verify(altered: list[dict[str, Any]]) -> str:
        path = tmp_path / f"altered-{uuid.uuid4().hex[:6]}.jsonl"
        write(path, altered)
        result = cli(
            pipeline, "audit", "verify", "--conversation", conversation, "--export", str(path)
        )
        assert result.exit_code == 1, result.output
        return result.output

    # 1. The words of one record edited: they no longer match its bytes.
    words = json.loads(json.dumps(lines))
    words[0]["event"]["text"] = "I never said that"
    assert "seq 1: the words differ from the event bytes" in verify(words)

    # 2. The bytes edited, hashes left: the hash no longer matches.
    raw = base64.b64decode(lines[0]["avro_base64"])
    # (The text is sealed on the log: the forger writes their own, in clear.)
    original = CODEC.decode(raw)
    assert getattr(original, "text", "") == "where is my order?"
    forged = CODEC.encode(dataclasses.replace(original, text="cancel my orders!!"))  # type: ignore[call-arg]
    assert forged != raw and CODEC.decode(forged)
    edited = json.loads(json.dumps(lines))
    edited[0]["avro_base64"] = base64.b64encode(forged).decode()
    assert "seq 1: bytes do not match their sha256" in verify(edited)

    # 3. A careful forger recomputes every hash and link: the log still disagrees.
    rechain(edited)
    assert "seq 1: differs from the source" in verify(edited)

    # 4. A record dropped: the chain breaks where it was.
    dropped = json.loads(json.dumps(lines))
    del dropped[1]
    assert "seq 2: out of sequence" in verify(dropped)

    # 5. One event altered in the ClickHouse archive: log and archive disagree there.
    event = CODEC.decode(forged)
    assert isinstance(event, Event)
    row = row_for(event, lines[0]["partition"], lines[0]["offset"], forged)
    url = f"http://127.0.0.1:{pipeline.clickhouse.query_port}/events"
    assert httpx.post(url, content=compact_rows([row])).status_code == 200
    broken = cli(pipeline, "audit", "verify", "--conversation", conversation)
    assert broken.exit_code == 1
    assert "seq 1: the log and the archive differ" in broken.output


@pytest.mark.parametrize("command", ["show", "export", "verify"])
def test_unknown_conversation(pipeline: Settings, command: str) -> None:
    result = cli(pipeline, "audit", command, "--conversation", "no-such-conversation")
    if command == "export":
        assert result.exit_code == 1 and "no events" in result.output
    else:
        assert result.exit_code == 0, result.output  # an empty history is a valid one


# --------------------------------------------------- a log of both record formats


def _events(tenant: str, a: str, b: str) -> dict[str, list[Event]]:
    """Conversation ``a``: 1 received, 2 moderated, 3 CSAT asked; ``b``: 1 received, 2
    a delivery receipt. Types no worker acts on beyond its read models, so hand-made
    histories stay as written while the pipeline runs."""
    at = now_ms()

    def env(conversation: str, seq: int) -> dict[str, Any]:
        return {
            "event_id": str(uuid.uuid4()),
            "conversation_id": conversation,
            "tenant_id": tenant,
            "seq": seq,
            "occurred_at": at + seq,
        }

    def received(conversation: str) -> MessageReceived:
        return MessageReceived(
            channel="api",
            customer_id=f"cust-{conversation}",
            text="where is my order?",
            channel_message_id="m1",
            command_id=f"{conversation}-c1",
            **env(conversation, 1),
        )

    first_a, first_b = received(a), received(b)
    moderated = MessageModerated(
        message_event_id=first_a.event_id,
        direction="in",
        verdict="pass",
        text="where is my order?",
        **env(a, 2),
    )
    receipt = MessageDelivered(
        reply_event_id=str(uuid.uuid4()), channel="api", status="delivered", attempts=1, **env(b, 2)
    )
    return {a: [first_a, moderated, CsatRequested(**env(a, 3))], b: [first_b, receipt]}


def _mixed_log(tenant: str, a: str, b: str) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """(key, value) records: each conversation's first event alone (the old format);
    then a's next two events as one commit; then a commit under a's key holding b's
    receipt (batched receipts: another conversation of the partition); then the first
    commit again (a redelivery)."""
    history = _events(tenant, a, b)
    (a1, a2, a3), (b1, b2) = history[a], history[b]
    commit = CODEC.encode(CODEC.commit([a2, a3], a))
    records = [
        (a, CODEC.encode(a1)),
        (b, CODEC.encode(b1)),
        (a, commit),
        (a, CODEC.encode(CODEC.commit([b2], a))),
        (a, commit),
    ]
    return records, history


def _entries(records: list[tuple[str, bytes]], conversation: str) -> list[Entry]:
    return [
        entry
        for offset, (_, value) in enumerate(records)
        for entry in log_entries(conversation, 0, offset, value)
    ]


def test_a_log_of_both_formats_gives_one_entry_per_event() -> None:
    a, b = "conv-a", "conv-b"
    records, history = _mixed_log("t-audit", a, b)
    entries = _entries(records, a)
    # Each event's own bytes at its record's position; the redelivered commit twice.
    assert [(e.seq, e.offset) for e in entries] == [(1, 0), (2, 2), (3, 2), (2, 4), (3, 4)]
    assert [e.raw for e in entries[:3]] == [CODEC.encode(x) for x in history[a]]
    held, problems = ordered(entries)
    assert problems == [] and [e.seq for e in held] == [1, 2, 3]  # the twins folded
    verdict = verify_entries(held)
    assert verdict.ok and verdict.head == chain(CODEC.encode(x) for x in history[a])[-1].hex()
    # b's receipt is found inside a commit keyed by a.
    assert [(e.seq, e.offset) for e in _entries(records, b)] == [(1, 1), (2, 3)]
    assert verify_entries(ordered(_entries(records, b))[0]).ok
    assert log_entries("conv-c", 0, 0, records[2][1]) == []


def test_tampering_one_event_inside_a_commit_is_detected() -> None:
    a, b = "conv-a", "conv-b"
    records, _ = _mixed_log("t-audit", a, b)
    history, _ = ordered(_entries(records, a))
    lines = export_lines(a, history)
    assert verify_export(lines, history).ok

    # The log altered: seq 3 inside the commit (a CSAT request turned into seq 3 of
    # another kind, bytes and all), its sibling and the record around it unchanged.
    (a2, a3) = CODEC.decode_all(records[2][1])
    assert isinstance(a3, Event)
    forged_event = MessageModerated(
        event_id=a3.event_id,
        conversation_id=a,
        tenant_id=a3.tenant_id,
        seq=3,
        occurred_at=a3.occurred_at,
        message_event_id="x",
        direction="out",
        verdict="block",
        text="forged",
    )
    forged = CODEC.encode(CODEC.commit([a2, forged_event], a))
    tampered = [*records[:2], (a, forged)]
    altered, _ = ordered(_entries(tampered, a))
    verdict = verify_export(lines, altered)
    assert not verdict.ok and verdict.broken_at == 3 and verdict.reason == "differs from the source"

    # The export altered: seq 2's bytes (from inside the commit) edited.
    edited = json.loads(json.dumps(lines))
    raw = base64.b64decode(edited[1]["avro_base64"])
    edited[1]["avro_base64"] = base64.b64encode(raw.replace(b"where", b"WHERE")).decode()
    verdict = verify_export(edited, history)
    assert not verdict.ok and (verdict.broken_at, verdict.reason) == (
        2,
        "bytes do not match their sha256",
    )
    rechain(edited)
    verdict = verify_export(edited, history)
    assert not verdict.ok and (verdict.broken_at, verdict.reason) == (2, "differs from the source")


async def _produce(
    settings: Settings, topic: str, records: list[tuple[str, bytes]]
) -> list[tuple[int, int]]:
    """Sends in order; the (partition, offset) of each."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.servers, acks="all")
    await producer.start()
    try:
        out = []
        for key, value in records:
            sent = await producer.send_and_wait(topic, value, key=key.encode())
            out.append((sent.partition, sent.offset))
        return out
    finally:
        await producer.stop()


def test_both_formats_on_the_log_audit_and_archive(pipeline: Settings, tmp_path: Path) -> None:
    """Old single-event records and commits on the real log: the projector stores one
    row per event (no twins after a redelivered commit), and the audit exports and
    verifies from the log and the archive, and sees one event altered in a commit."""
    tenant = f"audit-mix-{uuid.uuid4().hex[:8]}"
    a, b = (f"conv-{uuid.uuid4().hex[:10]}" for _ in range(2))
    records, history = _mixed_log(tenant, a, b)
    sent = asyncio.run(_produce(pipeline, TopicNames(pipeline.topic_prefix).events, records))
    where = f"FROM kefu.events WHERE tenant_id = '{tenant}'"
    again = f"kafka_partition = {sent[-1][0]} AND kafka_offset = {sent[-1][1]}"

    def redelivered() -> bool:  # the last record (the commit again) is stored too
        return bool(analytics(pipeline, f"SELECT count() {where} AND {again}")[0][0] == 2)

    wait_for(redelivered, timeout=60, what="the redelivered commit's rows")
    rows = analytics(
        pipeline,
        "SELECT conversation_id, seq, event_id, avro_base64, kafka_offset "
        f"FROM kefu.events FINAL WHERE tenant_id = '{tenant}' ORDER BY conversation_id, seq",
    )
    expected = sorted((c, e.seq, e.event_id, CODEC.encode(e)) for c in (a, b) for e in history[c])
    assert [(r[0], r[1], r[2], base64.b64decode(r[3])) for r in rows] == expected
    # The events of one commit share its position; the key is the event's, not it.
    offsets = {(r[0], r[1]): r[4] for r in rows}
    assert offsets[a, 2] == offsets[a, 3] != offsets[a, 1]
    # Twins share the event's key (stream, seq), so they fold; no other row is made.
    ((ids,),) = analytics(pipeline, f"SELECT uniqExact((conversation_id, seq, event_id)) {where}")
    assert ids == 5

    for conversation, events in ((a, 3), (b, 2)):
        export = tmp_path / f"{conversation}.jsonl"
        talk = ("--conversation", conversation)
        done = cli(pipeline, "audit", "export", *talk, "--out", str(export))
        assert done.exit_code == 0, done.output
        lines = [json.loads(x) for x in export.read_text("utf-8").splitlines()]
        assert lines[-1]["events"] == events, lines
        ok = cli(pipeline, "audit", "verify", *talk, "--export", str(export))
        assert ok.exit_code == 0, ok.output
        both = cli(pipeline, "audit", "verify", *talk)
        assert both.exit_code == 0 and "the log against the archive" in both.output, both.output

    # One event inside the commit altered in the archive: log and archive disagree there.
    a3 = history[a][2]
    forged = CODEC.encode(
        MessageModerated(
            event_id=a3.event_id,
            conversation_id=a,
            tenant_id=tenant,
            seq=3,
            occurred_at=a3.occurred_at,
            message_event_id="x",
            direction="out",
            verdict="block",
            text="forged",
        )
    )
    row = row_for(CODEC.decode(forged), sent[2][0], sent[2][1], forged)
    url = f"http://127.0.0.1:{pipeline.clickhouse.query_port}/events"
    assert httpx.post(url, content=compact_rows([row])).status_code == 200
    broken = cli(pipeline, "audit", "verify", "--conversation", a)
    assert broken.exit_code == 1
    assert "seq 3: the log and the archive differ" in broken.output
