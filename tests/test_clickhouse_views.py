"""The analysts' views and reports, run by the embedded engine (chdb) on rows written
the way the projector writes them: today's events and routing's (handoffs, presence,
CSAT), read by name from the payload JSON. With none of routing's events the reports
are empty, not errors."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from projections.clickhouse_events import COLUMNS, ClickHouseStore, rows_of_record
from projections.clickhouse_views import (
    REPORTS,
    grafana_json,
    parse_since,
    render,
    template,
    view_statements,
)
from schemas.codec import CODEC
from schemas.records import (
    AgentPresenceChanged,
    CsatRequested,
    MessageModerated,
    MessageReceived,
    ReceiveMessage,
)

T0 = 1_790_000_000_000  # 2026-09-21, inside the window of every query below
MIN = 60_000


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseStore]:
    # chdb allows one data directory per process: the whole module shares it.
    path: Path = tmp_path_factory.mktemp("chdb")
    store = ClickHouseStore(f"chdb://{path}", "kefu")
    asyncio.run(store.start())
    try:
        yield store
    finally:
        store.close()


class Log:
    """Rows of one tenant's conversations, numbered per conversation like the agent."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.seqs: dict[str, int] = {}
        self.rows: list[list[Any]] = []

    def add(self, conversation: str, type_: str, at: int, channel: str = "", **fields: Any) -> None:
        seq = self.seqs.get(conversation, 0) + 1
        self.seqs[conversation] = seq
        payload = {"conversation_id": conversation, "tenant_id": self.tenant, **fields}
        if channel:
            payload["channel"] = channel
        self.rows.append(
            [
                str(uuid.uuid4()),
                type_,
                self.tenant,
                conversation,
                seq,
                at / 1000,  # occurred_at in seconds, as row_for gives it
                channel,
                1,
                0,
                len(self.rows),
                json.dumps(payload),
                "",
            ]
        )


def query(store: ClickHouseStore, name: str, tenant: str) -> list[dict[str, Any]]:
    sql = render(name, "kefu", tenant, T0 - 60 * MIN, T0 + 24 * 60 * MIN)
    columns, rows = asyncio.run(store.query(sql))
    return [dict(zip(columns, row, strict=True)) for row in rows]


def insert(store: ClickHouseStore, rows: list[list[Any]]) -> None:
    assert len(rows[0]) == len(COLUMNS)
    asyncio.run(store.insert(rows))


def ai_conversation(log: Log, conv: str, start: int, reply_after: int, close: bool) -> None:
    log.add(conv, "MessageReceived", start, "web", customer_id="c")
    log.add(conv, "MessageModerated", start, direction="in", verdict="pass", categories=[])
    log.add(conv, "ConversationRouted", start, assignee="ai", queue=f"{log.tenant}:sales")
    log.add(conv, "ReplyProduced", start + reply_after, "web", author="ai", responder="faq")
    if close:
        log.add(conv, "ConversationClosed", start + 10 * MIN, reason="idle", closed_by="system")


def test_reports_are_empty_not_errors_without_events(store: ClickHouseStore) -> None:
    for name in REPORTS:
        assert query(store, name, "nobody") == [], name


def test_todays_events(store: ClickHouseStore) -> None:
    log = Log("t-today")
    ai_conversation(log, "c1", T0, 2000, close=True)
    ai_conversation(log, "c2", T0 + MIN, 4000, close=True)
    ai_conversation(log, "c3", T0 + 90 * MIN, 6000, close=False)
    log.add("c3", "MessageReceived", T0 + 91 * MIN, "web")
    log.add(
        "c3",
        "MessageModerated",
        T0 + 91 * MIN,
        direction="in",
        verdict="mask",
        categories=["abuse"],
    )
    insert(store, log.rows)
    insert(store, log.rows[:5])  # a redelivered batch changes no figure (FINAL)

    minutes = query(store, "volume-minute", "t-today")
    assert sum(r["messages_in"] for r in minutes) == 4
    assert sum(r["messages_out"] for r in minutes) == 3
    assert {r["channel"] for r in minutes} == {"web"}
    hours = query(store, "volume-hour", "t-today")
    assert [(r["messages_in"], r["messages_out"]) for r in hours] == [(2, 2), (2, 1)]
    assert len(query(store, "volume-day", "t-today")) == 1

    first = {(r["dimension"], r["key"]): r for r in query(store, "first-response", "t-today")}
    assert first["channel", "web"]["conversations"] == 3
    assert first["team", "sales"]["p50_s"] == 4.0
    assert first["agent", "ai"]["conversations"] == 3
    resolution = {(r["dimension"], r["key"]): r for r in query(store, "resolution", "t-today")}
    assert resolution["channel", "web"]["conversations"] == 2
    assert resolution["channel", "web"]["p90_s"] <= 600.0

    deflection = query(store, "deflection", "t-today")
    assert deflection == [
        {
            "channel": "web",
            "closed_conversations": 2,
            "closed_by_ai_alone": 2,
            "deflection_rate": 1.0,
        }
    ]
    moderation = query(store, "moderation", "t-today")
    assert [(r["category"], r["verdict"], r["hits"]) for r in moderation] == [("abuse", "mask", 1)]
    # Routing's reports: nothing yet for this tenant, and no error.
    for name in ("handoff-reasons", "utilisation", "csat"):
        assert query(store, name, "t-today") == []
    assert query(store, "handoff-rate", "t-today")[0]["handoff_rate"] == 0.0
    # Tenants are isolated; "" is every tenant.
    assert query(store, "moderation", "someone-else") == []


def test_routing_events_by_name(store: ClickHouseStore) -> None:
    log = Log("t-routing")
    # c1: AI first, handed to agent a1 (low confidence), rated 5, closed.
    ai_conversation(log, "c1", T0, 1000, close=False)
    log.add(
        "c1",
        "ConversationHandedOff",
        T0 + MIN,
        from_assignee="ai",
        to_assignee="a1",
        queue="t-routing:sales",
        reason="low_confidence",
    )
    log.add("c1", "ReplyProduced", T0 + 2 * MIN, "web", author="a1")
    log.add("c1", "ConversationClosed", T0 + 31 * MIN, reason="resolved", closed_by="a1")
    log.add("c1", "CsatRated", T0 + 32 * MIN, rating=5, assignee="a1")
    # c2: no AI: queued, then assigned to a2, rated 3.
    log.add("c2", "MessageReceived", T0, "email", customer_id="d")
    log.add("c2", "ConversationRouted", T0, assignee="", queue="t-routing:support")
    log.add("c2", "ConversationQueued", T0, queue="t-routing:support", priority="vip", position=1)
    log.add("c2", "ConversationAssigned", T0 + 5 * MIN, assignee="a2", queue="t-routing:support")
    log.add("c2", "ReplyProduced", T0 + 6 * MIN, "email", author="a2")
    log.add("c2", "CsatRated", T0 + 7 * MIN, rating=3)
    # Presence: a1 online (capacity 2) for an hour, then offline.
    log.add(
        "queue:t-routing:sales",
        "AgentPresenceChanged",
        T0,
        agent_id="a1",
        presence="online",
        capacity=2,
    )
    log.add(
        "queue:t-routing:sales",
        "AgentPresenceChanged",
        T0 + 60 * MIN,
        agent_id="a1",
        presence="offline",
        capacity=2,
    )
    insert(store, log.rows)

    reasons = query(store, "handoff-reasons", "t-routing")
    assert [(r["reason"], r["direction"], r["handoffs"]) for r in reasons] == [
        ("low_confidence", "ai -> human", 1)
    ]
    rates = {r["channel"]: r["handoff_rate"] for r in query(store, "handoff-rate", "t-routing")}
    assert rates == {"email": 0.0, "web": 1.0}
    deflection = query(store, "deflection", "t-routing")
    assert [(r["channel"], r["deflection_rate"]) for r in deflection] == [("web", 0.0)]
    first = {(r["dimension"], r["key"]): r for r in query(store, "first-response", "t-routing")}
    assert set(first) >= {("agent", "a1"), ("agent", "a2"), ("team", "support")}
    assert first["agent", "a2"]["p50_s"] == 360.0

    csat = query(store, "csat", "t-routing")
    assert [(r["rating"], r["responses"]) for r in csat] == [(3, 1), (5, 1)]
    assert sum(r["share"] for r in csat) == pytest.approx(1.0)

    utilisation = {r["agent"]: r for r in query(store, "utilisation", "t-routing")}
    # a1 held c1 for 30 of its 60 online minutes, at capacity 2: 25 %.
    assert utilisation["a1"]["online_hours"] == 1.0
    assert utilisation["a1"]["busy_hours"] == 0.5
    assert utilisation["a1"]["utilisation"] == 0.25


def attachment(kind: str, mime_type: str, size: int) -> dict[str, Any]:
    """An attachment as the payload JSON holds it (``Attachment.to_avro``)."""
    return {
        "kind": kind,
        "mime_type": mime_type,
        "size": size,
        "name": f"f.{mime_type.rsplit('/', 1)[-1]}",
        "sha256": "0" * 64,
        "storage_key": f"t/c/{uuid.uuid4().hex}",
        "width": 0,
        "height": 0,
        "duration_ms": 0,
        "thumbnail_key": "",
    }


def test_attachments_per_channel_and_type(store: ClickHouseStore) -> None:
    log = Log("t-files")
    image, pdf = (
        attachment("image", "image/jpeg", 100_000),
        attachment("file", "application/pdf", 5),
    )
    # In: two images in one API message, a PDF on the web, a message with none.
    log.add("c1", "MessageReceived", T0, "api", attachments=[image, image])
    log.add("c2", "MessageReceived", T0 + MIN, "web", attachments=[pdf])
    log.add("c2", "MessageReceived", T0 + 2 * MIN, "web", attachments=[])
    # Out: an agent's image; the AI's reply without any. Moderation results carry the
    # message's attachments again: not counted twice.
    log.add("c1", "ReplyProduced", T0 + 3 * MIN, "api", author="a1", attachments=[image])
    log.add("c1", "ReplyProduced", T0 + 4 * MIN, "api", author="ai")
    log.add("c1", "MessageModerated", T0, direction="in", verdict="pass", attachments=[image])
    # The next day (T0 is 14:13 UTC): one more image in.
    log.add("c1", "MessageReceived", T0 + 10 * 60 * MIN, "api", attachments=[image])
    insert(store, log.rows)
    insert(store, log.rows[:2])  # redelivered: no figure moves (FINAL)

    window = query(store, "attachments", "t-files")
    assert [
        (r["direction"], r["channel"], r["kind"], r["attachments"], r["bytes"], r["messages"])
        for r in window
    ] == [
        ("in", "api", "image", 3, 300_000, 2),
        ("in", "web", "file", 1, 5, 1),
        ("out", "api", "image", 1, 100_000, 1),
    ]
    days = query(store, "attachments-day", "t-files")
    assert [
        (str(r["day"])[:10], r["tenant"], r["direction"], r["kind"], r["attachments"]) for r in days
    ] == [
        ("2026-09-21", "t-files", "in", "image", 2),
        ("2026-09-21", "t-files", "in", "file", 1),
        ("2026-09-21", "t-files", "out", "image", 1),
        ("2026-09-22", "t-files", "in", "image", 1),
    ]
    # Per tenant: another tenant's are apart, and "" (every tenant) has both.
    other = Log("t-files-2")
    other.add("c9", "MessageReceived", T0, "api", attachments=[pdf])
    insert(store, other.rows)
    assert [r["attachments"] for r in query(store, "attachments", "t-files-2")] == [1]
    tenants = {r["tenant"] for r in query(store, "attachments-day", "")}
    assert {"t-files", "t-files-2"} <= tenants


def test_sql_is_checked_in_and_grafana_uses_it() -> None:
    assert len(view_statements("kefu")) == 8
    for name in REPORTS:
        sql = template(name)
        assert "{database}" in sql and "{tenant}" in sql and "{since}" in sql
    dashboard = Path(__file__).parent.parent / "deploy/grafana/dashboards/kefu-overview.json"
    assert dashboard.read_text("utf-8") == grafana_json(), (
        "regenerate: python -m projections.clickhouse_views grafana > " + str(dashboard)
    )


def test_parse_since() -> None:
    assert parse_since("7d", now_ms=10 * 86_400_000) == 3 * 86_400_000
    assert parse_since("30m", now_ms=MIN * 60) == MIN * 30
    assert parse_since("2026-01-01T00:00:00Z") == 1_767_225_600_000
    with pytest.raises(ValueError):
        parse_since("yesterday")


def test_projector_rows_from_both_record_formats(store: ClickHouseStore) -> None:
    """The projector's rows of a log of old single-event records and commits: one per
    event, each event's own bytes, its record's position; a redelivered commit (the
    same record again, or the same events at a new offset) adds no row under FINAL."""
    tenant = "t-commits"
    env: dict[str, Any] = {"conversation_id": "c1", "tenant_id": tenant}

    def at(seq: int) -> dict[str, Any]:
        return {"event_id": f"e-{seq}", "seq": seq, "occurred_at": T0 + seq, **env}

    received = MessageReceived(
        channel="web",
        customer_id="u",
        text="hi",
        channel_message_id="m",
        command_id="k",
        **at(1),
    )
    moderated = MessageModerated(
        message_event_id="e-1", direction="in", verdict="pass", text="hi", **at(2)
    )
    asked = CsatRequested(**at(3))
    presence = AgentPresenceChanged(
        event_id="q-1",
        tenant_id=tenant,
        queue=f"{tenant}:default",
        seq=1,
        occurred_at=T0,
        agent_id="a1",
        presence="online",
        capacity=2,
    )
    single = CODEC.encode(received)
    commit = CODEC.encode(CODEC.commit([moderated, asked], "c1"))
    queue_commit = CODEC.encode(CODEC.commit([presence], f"{tenant}:default"))

    rows, poison = [], []
    for offset, value in enumerate([single, commit, queue_commit, commit]):
        made, bad = rows_of_record(0, offset, value, 512 * 1024)
        rows += made
        poison += bad
    assert poison == []
    assert [(r[3], r[4], r[9]) for r in rows] == [
        ("c1", 1, 0),
        ("c1", 2, 1),
        ("c1", 3, 1),  # the events of a commit share its position
        (f"queue:{tenant}:default", 1, 2),
        ("c1", 2, 3),
        ("c1", 3, 3),
    ]
    raws = [base64.b64decode(r[11]) for r in rows]
    assert raws[:4] == [single, *CODEC.unpack(commit), *CODEC.unpack(queue_commit)]
    insert(store, rows)
    insert(store, rows[1:3])  # a redelivered batch too

    sql = (
        "SELECT conversation_id, seq, event_id, type FROM kefu.events FINAL "
        f"WHERE tenant_id = '{tenant}' ORDER BY conversation_id, seq"
    )
    _, stored = asyncio.run(store.query(sql))
    assert [tuple(r) for r in stored] == [
        ("c1", 1, "e-1", "MessageReceived"),
        ("c1", 2, "e-2", "MessageModerated"),
        ("c1", 3, "e-3", "CsatRequested"),
        (f"queue:{tenant}:default", 1, "q-1", "AgentPresenceChanged"),
    ]


def test_projector_dead_letters_only_the_bad_event_of_a_commit() -> None:
    good = MessageModerated(
        event_id="e-1",
        conversation_id="c1",
        tenant_id="t",
        seq=1,
        occurred_at=T0,
        message_event_id="m",
        direction="in",
        verdict="pass",
        text="hi",
    )
    command = ReceiveMessage(
        command_id="k",
        conversation_id="c1",
        tenant_id="t",
        issued_at=T0,
        channel="web",
        customer_id="u",
        text="hi",
        channel_message_id="m",
    )
    commit = CODEC.encode(CODEC.commit([good, command], "c1"))
    rows, poison = rows_of_record(4, 9, commit, 512 * 1024)
    assert [(r[2], r[4], r[8], r[9]) for r in rows] == [("t", 1, 4, 9)]
    (bad,) = poison
    assert bad.payload == CODEC.encode(command)  # its own bytes, the sibling stored
    assert bad.reason == "event 2 of 2 in a commit: expected an event, got ReceiveMessage"
    # A commit cut short is poison whole; so is a record over the size limit.
    (cut,) = rows_of_record(4, 9, commit[:-30], 512 * 1024)[1]
    assert cut.payload == commit[:-30] and "corrupt Commit" in cut.reason
    (big,) = rows_of_record(4, 9, commit, 64)[1]
    assert big.payload == commit[:64] and "over the 64-byte limit" in big.reason
