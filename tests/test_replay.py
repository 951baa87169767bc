"""Replay rebuilds the read models from the log: after traffic, drop a tenant's Redis
keys and ClickHouse rows, replay, and the rebuilt state equals the live one."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner, Result

import kefu.cli_analytics
from connectors.publisher import CommandPublisher
from kefu.cli import main
from kefu.settings import Settings
from projections.clickhouse_query import AnalyticsClient
from projections.redis_rebuild import EPOCH_KEY, LOCK_KEY, holding_the_model
from projections.replay import (
    ClickHouseTarget,
    LogReader,
    RedisTarget,
    ReplayFilter,
    replay,
    replay_topics,
)
from schemas.keys import conversation_key, queue_seq_key, tenant_prefix
from schemas.records import CloseConversation, Command, ReceiveMessage
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
        env = {"conversation_id": cid, "tenant_id": tenant}
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


async def tenant_snapshot(client: aioredis.Redis, tenant: str) -> dict[bytes, bytes | None]:
    keys = sorted([k async for k in client.scan_iter(match=f"{tenant_prefix(tenant)}*")])
    return {key: await client.dump(key) for key in keys}


def redis_snapshot(pipeline: Settings, tenant: str) -> dict[bytes, bytes | None]:
    """``tenant_snapshot`` through a client of its own (for a test's sync part)."""

    async def take() -> dict[bytes, bytes | None]:
        client = aioredis.Redis.from_url(pipeline.redis.dsn)
        try:
            return await tenant_snapshot(client, tenant)
        finally:
            await client.aclose()

    return asyncio.run(take())


def test_rebuilt_tenant_equals_live(pipeline: Settings) -> None:
    tenant = f"replay-{uuid.uuid4().hex[:8]}"
    ids = private_traffic(pipeline, tenant)
    live_rows = wait_for(lambda: settled(pipeline, tenant, ids), timeout=60, what="traffic")

    async def run() -> dict[bytes, bytes | None]:
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
            assert stats.read >= stats.applied
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
