"""Replay rebuilds the read models from the log: after traffic, drop a tenant's Redis
keys and ClickHouse rows, replay, and the rebuilt state equals the live one.

The replay folds each conversation's events and writes the result
(``projections.redis_fold``), so Redis is compared by contents (HGETALL, LRANGE,
ZRANGE WITH SCORES of every key), not DUMP bytes: a hash written in one HSET may be laid
out differently inside Redis from one written field by field, which no reader sees."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import uuid
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from click.testing import CliRunner, Result

import kefu.cli_analytics
from connectors.publisher import CommandPublisher
from kefu.cli import main
from kefu.settings import Settings
from kefu.topics import _wait_for_leaders
from projections.clickhouse_query import AnalyticsClient
from projections.redis_fold import FoldingWriter
from projections.redis_rebuild import EPOCH_KEY, LOCK_KEY, holding_the_model
from projections.redis_state import RedisConversations
from projections.replay import (
    ClickHouseTarget,
    LogReader,
    LogRecord,
    RedisTarget,
    ReplayFilter,
    ReplayStats,
    replay,
    replay_topics,
)
from schemas.codec import CODEC, DecodeError, commit_events
from schemas.keys import conversation_key, queue_seq_key, tenant_prefix
from schemas.records import (
    AgentAssigned,
    AgentPresenceChanged,
    CloseConversation,
    Command,
    ConversationAssigned,
    ConversationClosed,
    ConversationEnqueued,
    ConversationHandedOff,
    ConversationQueued,
    ConversationRouted,
    CsatRated,
    CsatRequested,
    Event,
    MessageDelivered,
    MessageModerated,
    MessageReceived,
    QueueEvent,
    ReceiveMessage,
    ReplyProduced,
    ReplyRequested,
    SlaBreached,
)
from schemas.time import now_ms
from schemas.topics import TopicNames
from tests.conftest import wait_for


def private_traffic(
    settings: Settings, tenant: str, conversations: int = 3, ids: list[str] | None = None
) -> list[str]:
    """Conversations of a tenant nobody else writes (new ones, or another round in
    ``ids``): customer messages (one masked by moderation), a close. Published straight
    to the commands topic."""
    ids = ids or [f"conv-{uuid.uuid4().hex[:10]}" for _ in range(conversations)]
    round_ = uuid.uuid4().hex[:6]
    commands: list[Command] = []
    for n, cid in enumerate(ids):
        env: dict[str, Any] = {"conversation_id": cid, "tenant_id": tenant}
        for m in range(2):
            commands.append(
                ReceiveMessage(
                    command_id=f"{cid}-{round_}-in-{m}",
                    issued_at=now_ms(),
                    channel="api",
                    customer_id=f"cust-{n}",
                    text="you stupid bot" if m else "where is my order?",
                    channel_message_id=f"{round_}-m{m}",
                    **env,
                )
            )
        # Closed, so no timer of routing's (SLA, idle) adds events mid-test.
        commands.append(
            CloseConversation(
                command_id=f"{cid}-{round_}-close",
                issued_at=now_ms(),
                reason="resolved",
                closed_by="agent-7",
                **env,
            )
        )

    async def publish() -> None:
        publisher = CommandPublisher(
            settings.kafka.servers, TopicNames(settings.topic_prefix).commands
        )
        await publisher.start()
        try:
            for command in commands:
                await publisher.publish(command)
        finally:
            await publisher.stop()

    asyncio.run(publish())
    return ids


class _Conv:
    """Events of one conversation with consecutive seqs (one writer per conversation)."""

    def __init__(self, tenant: str, cid: str) -> None:
        self.tenant, self.cid, self.seq = tenant, cid, 0

    def __call__(self, cls: type[Any], at: int, **fields: Any) -> Any:
        self.seq += 1
        envelope: dict[str, Any] = {"event_id": f"{self.cid}-{self.seq}"}
        envelope |= {"tenant_id": self.tenant, "conversation_id": self.cid}
        return cls(**envelope, seq=self.seq, occurred_at=at, **fields)

    def received(self, at: int, text: str = "hi", verdict: str = "pass") -> list[Event]:
        first = self(
            MessageReceived,
            at,
            channel="web",
            customer_id=f"cust-{self.cid}",
            text=text,
            channel_message_id=f"m{self.seq}",
            command_id=f"c{self.seq}",
        )
        moderated = self(
            MessageModerated,
            at,
            message_event_id=first.event_id,
            direction="in",
            verdict=verdict,
            text=text,
        )
        return [first, moderated]

    def reply(self, at: int, author: str, text: str = "answer") -> Any:
        return self(
            ReplyProduced,
            at,
            in_reply_to="x",
            channel="web",
            text=text,
            author=author,
            responder="test",
            confidence=0.5,
            customer_id=f"cust-{self.cid}",
        )


def varied_log(tenant: str) -> list[Event | QueueEvent]:
    """Every event type the Redis model handles, interleaved over conversations as a
    partition interleaves them, with redeliveries (a repeated event, an older seq after
    a newer one) and a queue's own events: the ground for "the replay leaves what the
    live projection leaves"."""
    queue = f"{tenant}:support"
    logs: list[list[Event | QueueEvent]] = []
    for k in range(12):
        c = _Conv(tenant, f"conv-{k}")
        text = "我的订单在哪里？" * (1 + k % 5) + f" #{k}"  # long ones: hashtable hashes
        events: list[Event | QueueEvent] = [*c.received(1000 + k, text)]
        if k % 3 == 0:  # the AI answers
            events.append(c(ConversationRouted, 1000 + k, assignee="ai", queue=queue, reason="ai"))
            events.append(
                c(ReplyRequested, 1001 + k, message_event_id="x", channel="web", text=text)
            )
            events.append(c.reply(1500 + k, "ai", "答复" * 70))
            events.append(
                c(
                    MessageDelivered,
                    1600 + k,
                    reply_event_id="r",
                    channel="web",
                    status="sent",
                    attempts=1,
                )
            )
        else:  # waits for a human, VIP or not
            priority = "vip" if k % 3 == 1 else "normal"
            events.append(
                c(
                    ConversationRouted,
                    1000 + k,
                    assignee="",
                    queue=queue,
                    reason="h",
                    priority=priority,
                )
            )
            events.append(
                c(ConversationQueued, 1002 + k, queue=queue, priority=priority, position=k)
            )
            events += c.received(1100 + k, "还在吗", verdict="mask")
            events.append(
                c(SlaBreached, 1200 + k, kind="first", due_at=1150, assignee="", priority=priority)
            )
            events.append(
                c(
                    ConversationAssigned,
                    1300 + k,
                    assignee=f"agent-{k % 2}",
                    queue=queue,
                    priority=priority,
                )
            )
            events.append(c.reply(1300 + k, f"agent-{k % 2}"))  # same time: no new activity
        if k % 4 == 0:
            events.append(
                c(
                    ConversationHandedOff,
                    2000 + k,
                    from_assignee="ai",
                    to_assignee="",
                    queue=queue,
                    reason="asked_for_human",
                    requested_by="customer",
                )
            )
            events.append(
                c(
                    ConversationHandedOff,
                    2100 + k,
                    from_assignee="",
                    to_assignee="agent-1",
                    queue=queue,
                    reason="picked",
                    requested_by="agent-1",
                )
            )
        if k % 2 == 0:
            events.append(c(ConversationClosed, 3000 + k, reason="resolved", closed_by="agent-1"))
            events.append(c(CsatRequested, 3001 + k))
            events.append(c(CsatRated, 3100 + k, rating=1 + k % 5))
        if k == 4:  # reopened, and more messages than the list keeps
            for n in range(30):
                events += c.received(4000 + 10 * n, f"again {n}")
                events.append(c.reply(4005 + 10 * n, "ai", f"reply {n}"))
        if k % 5 == 1:  # redelivered: a repeat and an older seq after a newer one
            events += [events[2], events[-1], events[0]]
        logs.append(events)
    q = _QueueLog(tenant, queue)
    logs.append(
        [
            q(AgentPresenceChanged, 900, agent_id="agent-0", presence="online", capacity=2),
            q(AgentPresenceChanged, 901, agent_id="agent-1", presence="online", capacity=3),
            q(ConversationEnqueued, 1010, conversation_id="conv-1", priority="vip", order=1),
            q(
                AgentAssigned,
                1301,
                conversation_id="conv-1",
                agent_id="agent-1",
                priority="vip",
                order=1,
            ),
            q(AgentPresenceChanged, 5000, agent_id="agent-0", presence="away", capacity=2),
        ]
    )
    return [e for batch in itertools.zip_longest(*logs) for e in batch if e is not None]


class _QueueLog:
    def __init__(self, tenant: str, queue: str) -> None:
        self.tenant, self.queue, self.seq = tenant, queue, 0

    def __call__(self, cls: type[Any], at: int, **fields: Any) -> Any:
        self.seq += 1
        envelope = {"event_id": f"{self.queue}-{self.seq}", "tenant_id": self.tenant}
        return cls(**envelope, queue=self.queue, seq=self.seq, occurred_at=at, **fields)


def cli(settings: Settings, *args: str) -> Result:
    """``kefu …`` in this process, with the test stack's settings."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kefu.cli_analytics, "_settings", lambda: settings)
        return CliRunner().invoke(main, list(args))


def archive(settings: Settings, tenant: str) -> list[list[Any]]:
    client = AnalyticsClient(settings.clickhouse_url, settings.clickhouse.query_port)
    sql = (
        "SELECT conversation_id, seq, event_id, type, payload, avro_base64, kafka_offset, "
        "kafka_partition, toUnixTimestamp64Milli(occurred_at), channel, schema_version "
        f"FROM kefu.events FINAL WHERE tenant_id = '{tenant}' ORDER BY conversation_id, seq"
    )
    return client.query(sql).rows


def settled(settings: Settings, tenant: str, ids: list[str]) -> list[list[Any]] | None:
    """Every event of the tenant in ClickHouse and in Redis, and nothing more coming
    (the closes are there)."""
    import redis

    rows = archive(settings, tenant)
    r = redis.Redis.from_url(settings.redis.dsn, decode_responses=True)
    last = {row[0]: row[1] for row in rows}
    for cid in ids:
        state = r.hgetall(conversation_key(tenant, cid))
        if not state or int(state["seq"]) != last.get(cid) or state["status"] != "closed":
            return None
    # The tenant's queue history (its conversations waited for a human) is settled when
    # every conversation sent to a human queue entered the line (the router does that
    # a hop after the hand-off), and everything that entered it left again, in
    # ClickHouse and in Redis.
    to_humans = sum(
        1
        for row in rows
        if (row[3] == "ConversationHandedOff" and json.loads(row[4])["to_assignee"] == "")
        or (row[3] == "ConversationRouted" and json.loads(row[4])["assignee"] == "")
    )
    if sum(row[3] == "ConversationEnqueued" for row in rows) < to_humans:
        return None
    for queue_id in [c for c in last if c.startswith("queue:")]:
        types = [row[3] for row in rows if row[0] == queue_id]
        if types.count("ConversationEnqueued") != types.count("AssignmentReleased"):
            return None
        stored = r.hget(queue_seq_key(tenant, queue_id.removeprefix("queue:")), "seq")
        if stored is None or int(stored) != last[queue_id]:
            return None
    return rows if len(rows) == sum(last.values()) else None


Snapshot = dict[bytes, tuple[str, Any]]


async def tenant_snapshot(client: aioredis.Redis, tenant: str) -> Snapshot:
    """Every key of the tenant with its type and contents, as a reader sees them."""
    keys = sorted([k async for k in client.scan_iter(match=f"{tenant_prefix(tenant)}*")])
    out: Snapshot = {}
    for key in keys:
        kind = _text(await client.type(key))
        if kind == "hash":
            out[key] = (kind, await client.hgetall(key))
        elif kind == "list":
            out[key] = (kind, await client.lrange(key, 0, -1))
        elif kind == "zset":
            out[key] = (kind, await client.zrange(key, 0, -1, withscores=True))
        elif kind == "set":
            out[key] = (kind, sorted(await client.smembers(key)))
        else:
            out[key] = (kind, await client.get(key))
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def redis_snapshot(pipeline: Settings, tenant: str) -> Snapshot:
    """``tenant_snapshot`` through a client of its own (for a test's sync part)."""

    async def take() -> Snapshot:
        client = aioredis.Redis.from_url(pipeline.redis.dsn)
        try:
            return await tenant_snapshot(client, tenant)
        finally:
            await client.aclose()

    return asyncio.run(take())


def log_records(events: list[Event | QueueEvent]) -> list[LogRecord]:
    """Events as the replay's reader hands them over (decoded from their bytes)."""
    out = []
    for offset, event in enumerate(events):
        raw = CODEC.encode(event)
        kind, fields = CODEC.decode_fields(raw)
        assert issubclass(kind, Event | QueueEvent)
        out.append(LogRecord(kind, fields, raw, 0, offset))
    return out


async def live_projection(client: aioredis.Redis, events: list[Event | QueueEvent]) -> None:
    """The live projection's writes: its script, one call per event, in log order."""
    model = RedisConversations(client)
    for event in events:
        await model.apply([event])


async def drop(client: aioredis.Redis, tenant: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{tenant_prefix(tenant)}*")]
    if keys:
        await client.delete(*keys)


def test_the_fold_writes_what_the_live_projection_writes(pipeline: Settings) -> None:
    """Every event type of the model, redeliveries, the recent-messages cap, queues'
    own events; written whole and in batches that cut conversations (each folded on
    the hash the batch before left), over the finished model (nothing changes), by a
    writer that forgets hashes (read back), and on top of a model the live projection
    left half way, with a batch folded before the one it builds on is written (as the
    replay does) and that one's hashes not what its folds expected."""
    tenant = f"fold-{uuid.uuid4().hex[:8]}"
    log = varied_log(tenant)
    records = log_records(log)

    async def run() -> None:
        client = aioredis.Redis.from_url(pipeline.redis.dsn)
        try:
            await live_projection(client, log)
            live = await tenant_snapshot(client, tenant)
            kinds = {kind for kind, _ in live.values()}
            assert kinds == {"hash", "list", "zset"} and len(live) > 25

            async def rebuilt(writer: FoldingWriter, size: int) -> Snapshot:
                await drop(client, tenant)
                for start in range(0, len(records), size):
                    await writer.apply(records[start : start + size])
                return await tenant_snapshot(client, tenant)

            for size in (len(records), 7, 1):
                writer = FoldingWriter(client, conversations_per_call=5)
                assert await rebuilt(writer, size) == live, size
                assert writer.counts["per_event"] == 5  # the queue's events
                assert writer.counts["refolded"] == 0  # each batch on the last one's
                await writer.apply(records)  # a replay over the model changes nothing
                assert await tenant_snapshot(client, tenant) == live, size
                assert writer.counts["refolded"] == 0
            forgetful = FoldingWriter(client, known_conversations=3)
            assert await rebuilt(forgetful, 7) == live
            assert forgetful.counts["refolded"] > 0

            await drop(client, tenant)
            await live_projection(client, log[: len(log) // 2])
            writer = FoldingWriter(client)
            first = writer.prepare(records[: len(log) // 3])
            second = writer.prepare(records[len(log) // 3 :])
            await writer.write(first)
            assert first.write.lost  # these hashes existed: read back and folded again
            await writer.write(second)
            assert await tenant_snapshot(client, tenant) == live
            assert second.write.lost  # folded on the first's, done again
        finally:
            await client.aclose()

    asyncio.run(run())


def _zigzag(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def test_commit_events_reads_what_the_codec_unpacks() -> None:
    log = varied_log("t")
    for size in (0, 1, 2, 3, 70, len(log)):  # 70 events: counts past one varint byte
        value = CODEC.encode(CODEC.commit(log[:size], "k"))
        assert commit_events(value) == CODEC.unpack(value) == [CODEC.encode(e) for e in log[:size]]
    # Avro may write an array as blocks with a negative count and their size in bytes.
    items = [CODEC.encode(e) for e in log[:3]]
    body = b"".join(_zigzag(len(i)) + i for i in items)
    head = CODEC.encode(CODEC.commit([], "k"))  # header, "" (1 byte), "k" (2), [] (0)
    assert head[13] == 0
    blocked = head[:13] + _zigzag(-3) + _zigzag(len(body)) + body + head[13:]
    assert commit_events(blocked) == CODEC.unpack(blocked) == items
    for cut in (12, len(head) + 20):
        with pytest.raises(DecodeError):
            commit_events(CODEC.encode(CODEC.commit(log[:3], "k"))[:cut])


async def write_mixed_log(
    settings: Settings, topic: str, events: list[Event | QueueEvent]
) -> list[tuple[int, int]]:
    """``events`` to a new one-partition topic, in order, in both formats: runs of a
    conversation's events as one ``Commit``, or one record each (as before commits);
    a commit also carries the next event of another conversation (as a commit of
    batched delivery receipts does). The number of events in each record, and its
    offset."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka.servers, **settings.kafka.client_options()
    )
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
        await _wait_for_leaders(admin, {topic: 1})
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.servers, **settings.kafka.client_options()
    )
    await producer.start()
    written: list[tuple[int, int]] = []
    try:
        pending = list(events)
        n = 0
        while pending:
            n += 1
            key = _key(pending[0])
            if n % 3 == 0:  # one event, as before commits
                batch = [pending.pop(0)]
                value = CODEC.encode(batch[0])
            else:  # a commit: this key's next events, and another conversation's
                take = 1 + n % 4
                batch = [e for e in pending if _key(e) == key][:take]
                other = next((e for e in pending if _key(e) != key), None)
                if n % 2 == 0 and other is not None and isinstance(other, Event):
                    batch.append(other)
                for event in batch:
                    pending.remove(event)
                value = CODEC.encode(CODEC.commit(batch, key))
            sent = await producer.send_and_wait(topic, value, key=key.encode())
            written.append((len(batch), sent.offset))
    finally:
        await producer.stop()
    return written


def _key(event: Event | QueueEvent) -> str:
    """The Kafka key its writer gives it: its conversation, or its queue."""
    return event.conversation_id if isinstance(event, Event) else event.queue


def test_replay_of_a_log_of_commits_and_single_events(pipeline: Settings) -> None:
    """A log mixing one-event records and commits (one of several conversations too):
    Redis gets what the live projection left, ClickHouse one row per event with its
    own bytes and its record's offset, and a one-conversation replay finds the
    conversation's events inside other conversations' commits."""
    tenant = f"mixed-{uuid.uuid4().hex[:8]}"
    topic = f"kefu-test-replay-{uuid.uuid4().hex[:8]}"
    log = varied_log(tenant)
    # Each event once on the log, in the order the live projection applies them.
    order: list[Event | QueueEvent] = []

    async def run() -> tuple[list[tuple[int, int]], int]:
        client = aioredis.Redis.from_url(pipeline.redis.dsn)
        ch = pipeline.clickhouse
        clickhouse = ClickHouseTarget(pipeline.clickhouse_url, ch.database, ch.query_port)
        try:
            written = await write_mixed_log(pipeline, topic, log)
            reader = LogReader(pipeline.kafka.servers, topic)
            as_written: list[Any] = []
            async for batch in reader.batches(ReplayFilter(), ReplayStats()):
                # As the live projection takes them (a reply at its record's time).
                order.extend(record.event for record in batch)
                as_written.extend(record.kind.from_avro(record.fields) for record in batch)
            assert sorted(map(repr, as_written)) == sorted(map(repr, log))
            await live_projection(client, order)
            live = await tenant_snapshot(client, tenant)
            await drop(client, tenant)

            flt = ReplayFilter(tenant=tenant)
            stats = await replay(reader, [RedisTarget(client), clickhouse], flt, reset=True)
            assert (stats.read, stats.matched, stats.applied) == (len(log),) * 3
            assert stats.records == len(written) < len(log)
            assert await tenant_snapshot(client, tenant) == live

            one = ReplayFilter(tenant=tenant, conversation="conv-1")
            stats_one = await replay(LogReader(pipeline.kafka.servers, topic), [], one)
            return written, stats_one.matched
        finally:
            await client.aclose()
            await clickhouse.close()

    written, matched = asyncio.run(run())
    assert matched == sum(1 for e in log if isinstance(e, Event) and e.conversation_id == "conv-1")
    rows = wait_for(lambda: archive(pipeline, tenant), timeout=30, what="rows")
    # Redelivered events share their twin's key: FINAL keeps one row.
    distinct = {(_key(e) if isinstance(e, Event) else f"queue:{e.queue}", e.seq) for e in log}
    assert len(rows) == len(distinct)
    offsets = {offset for _, offset in written}
    by_id = {e.event_id: e for e in log}
    for row in rows:
        raw = base64.b64decode(row[5])
        assert CODEC.decode(raw) == by_id[row[2]]  # the event's own bytes
        assert row[6] in offsets  # its record's offset
    assert any(count > 1 for count, _ in written)


def test_rebuilt_tenant_equals_live(pipeline: Settings) -> None:
    tenant = f"replay-{uuid.uuid4().hex[:8]}"
    ids = private_traffic(pipeline, tenant)
    live_rows = wait_for(lambda: settled(pipeline, tenant, ids), timeout=60, what="traffic")

    async def run() -> Snapshot:
        client = aioredis.Redis.from_url(pipeline.redis.dsn)
        ch = pipeline.clickhouse
        clickhouse = ClickHouseTarget(pipeline.clickhouse_url, ch.database, ch.query_port)
        reader = LogReader(pipeline.kafka.servers, replay_topics(TopicNames(pipeline.topic_prefix)))
        try:
            live = await tenant_snapshot(client, tenant)
            assert len(live) >= 3 * 2  # hashes, lists and the tenant's indexes

            flt = ReplayFilter(tenant=tenant)
            await RedisTarget(client).reset(flt)
            await clickhouse.reset(flt)
            assert await tenant_snapshot(client, tenant) == {}
            assert archive(pipeline, tenant) == []

            stats = await replay(reader, [RedisTarget(client), clickhouse], flt)
            assert stats.applied == len(live_rows)
            assert stats.read >= stats.applied and stats.records > 0
            assert await tenant_snapshot(client, tenant) == live
            assert archive(pipeline, tenant) == live_rows

            # One conversation, through the CLI, over the live state: nothing changes.
            one = ids[0]
            await RedisTarget(client).reset(ReplayFilter(tenant=tenant, conversation=one))
            return live
        finally:
            await client.aclose()
            await clickhouse.close()

    live = asyncio.run(run())

    result = cli(
        pipeline, "replay", "--projection", "all", "--tenant", tenant, "--conversation", ids[0]
    )
    assert result.exit_code == 0, result.output
    per_conversation = sum(1 for row in live_rows if row[0] == ids[0])
    assert f"replayed {per_conversation} events into all" in result.output

    assert redis_snapshot(pipeline, tenant) == live
    assert archive(pipeline, tenant) == live_rows


def test_the_owner_refuses_rows_clickhouse_cannot_parse(pipeline: Settings) -> None:
    url = f"http://127.0.0.1:{pipeline.clickhouse.query_port}/events"
    tenant = f"bad-rows-{uuid.uuid4().hex[:8]}"
    for body in (b'["e-1", "ReplyProduced"', b'{"rows": []}', b'["e-1", 2, 3]'):
        response = httpx.post(url, content=body.replace(b"e-1", tenant.encode()))
        assert response.status_code == 400, body
        assert response.json()["error"]
    assert archive(pipeline, tenant) == []


def test_time_filter_selects_nothing_outside(pipeline: Settings) -> None:
    async def run() -> int:
        reader = LogReader(pipeline.kafka.servers, replay_topics(TopicNames(pipeline.topic_prefix)))
        flt = ReplayFilter(since_ms=now_ms() + 86_400_000)
        stats = await replay(reader, [], flt)
        return stats.matched

    assert asyncio.run(run()) == 0


def test_reset_holds_the_live_projection_until_the_replay_is_done(pipeline: Settings) -> None:
    """``kefu replay --reset`` on a live system: a live batch landing between the reset
    and the replay would put a later seq into an emptied hash, and the seq guards would
    then refuse the history before it. The reset holds the live projection instead."""
    tenant = f"hold-{uuid.uuid4().hex[:8]}"
    ids = private_traffic(pipeline, tenant, conversations=2)
    wait_for(lambda: settled(pipeline, tenant, ids), timeout=60, what="first round")
    flt = ReplayFilter(tenant=tenant)

    async def reset_and_replay_while_traffic_flows() -> int:
        client = aioredis.Redis.from_url(pipeline.redis.dsn)
        reader = LogReader(pipeline.kafka.servers, replay_topics(TopicNames(pipeline.topic_prefix)))
        try:
            async with holding_the_model(client):
                assert await client.get(EPOCH_KEY) is None
                await RedisTarget(client).reset(flt)
                before = len(archive(pipeline, tenant))
                # A second round on the same conversations reaches the log and the
                # ClickHouse projector; the live Redis projection waits for the hold.
                await asyncio.to_thread(private_traffic, pipeline, tenant, 2, ids)
                await asyncio.to_thread(
                    wait_for,
                    lambda: len(archive(pipeline, tenant)) > before,
                    60,
                    "second round in ClickHouse",
                )
                assert await tenant_snapshot(client, tenant) == {}
                stats = await replay(reader, [RedisTarget(client)], flt)
            assert await client.get(EPOCH_KEY) is not None
            assert await client.get(LOCK_KEY) is None
            return stats.applied
        finally:
            await client.aclose()

    applied = asyncio.run(reset_and_replay_while_traffic_flows())
    assert applied > 0
    rows = wait_for(lambda: settled(pipeline, tenant, ids), timeout=60, what="second round")

    live = redis_snapshot(pipeline, tenant)
    # A quiet rebuild through the CLI, split over two processes by partition, gives the
    # same bytes: nothing was refused above.
    result = cli(
        pipeline,
        "replay",
        *("--projection", "redis", "--tenant", tenant, "--reset", "--processes", "2"),
    )
    assert result.exit_code == 0, result.output
    assert f"replayed {len(rows)} events into redis" in result.output
    assert redis_snapshot(pipeline, tenant) == live
