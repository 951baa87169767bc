"""The live projection's batch is one round trip, and keeps every guarantee.

:meth:`projections.redis_rebuild.RebuildingRedisModel.apply` sends a batch as one
``MULTI``/``EXEC`` of ``EVALSHA`` calls that check the epoch marker themselves: no
``WATCH``, ``GET`` or ``SCRIPT EXISTS`` per batch. These tests count what it sends, and
check that a batch without the marker writes nothing and rebuilds first, that a flushed
script cache is loaded again, and that the state is byte for byte the one-event
script's. On a private Redis, as tests/test_redis_catch_up.py (whose harness they use).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from projections.redis_rebuild import (
    EPOCH_KEY,
    LOCK_KEY,
    POSITIONS_KEY,
    RebuildingRedisModel,
    Rebuilt,
    position_field,
)
from projections.redis_state import RedisConversations, script_call
from tests.test_redis_catch_up import TP, Harness, State, log_of, private_redis
from tests.test_redis_state import ORIGINAL_APPLY, mixed_log, tenant_snapshot


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with private_redis(tmp_path_factory.mktemp("redis-live-batch")) as port:
        yield port


class CountingConnection(aioredis.Connection):
    """Counts the writes to the socket: one per round trip (a command or a pipeline)."""

    writes = 0

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        CountingConnection.writes += 1
        await super().send_packed_command(command, check_health)


def run_on(port: int, body: Callable[[aioredis.Redis], Awaitable[None]]) -> None:
    """``body`` with a counting client of a flushed Redis, in a loop of its own."""

    async def run() -> None:
        pool = aioredis.ConnectionPool(
            host="127.0.0.1", port=port, connection_class=CountingConnection
        )
        client = aioredis.Redis(connection_pool=pool)
        try:
            await client.flushall()
            await client.script_flush()
            await body(client)
        finally:
            await client.aclose()
            await pool.aclose()

    asyncio.run(run())


async def commands(client: aioredis.Redis) -> dict[str, int]:
    """Calls per command since the last ``CONFIG RESETSTAT`` (scripts' own included)."""
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def whole_log(h: Harness, end: int) -> State:
    """What the model holds when it applied ``h.log[:end]`` once, through plain calls."""
    await h.client.flushall()
    await h.plain.apply(h.log[:end])
    return await h.state()


async def never_rebuild() -> Rebuilt:
    raise AssertionError("the marker is set: no rebuild")


def test_a_live_batch_is_one_round_trip(redis_port: int) -> None:
    async def body(client: aioredis.Redis) -> None:
        await client.set(EPOCH_KEY, "1")
        h = Harness(client, log_of())
        CountingConnection.writes = 0
        await h.batch(0, 1)
        assert CountingConnection.writes == 2  # the script's SCRIPT LOAD, once per process
        for start, end in [(1, 2), (2, 4), (4, 5), (5, 7)]:  # a trickle: 1 or 2 events
            await client.config_resetstat()
            CountingConnection.writes = 0
            await h.batch(start, end)
            assert CountingConnection.writes == 1
            calls = await commands(client)
            assert (calls["multi"], calls["evalsha"], calls["exists"], calls["exec"]) == (1,) * 4
            assert not {"watch", "get", "unwatch", "script|exists", "script|load", "eval"} & set(
                calls
            )
            assert await client.hget(POSITIONS_KEY, position_field(TP)) == str(end).encode()
        # A big batch: many script calls (4 events each here), still one transaction.
        chunked = RebuildingRedisModel(
            client, RedisConversations(client, batch_events=4), never_rebuild
        )
        await chunked.apply(h.log[:1])  # loads (a model of its own: SCRIPT LOAD again)
        await client.config_resetstat()
        CountingConnection.writes = 0
        await chunked.apply(h.log[7:], {TP: len(h.log)})
        assert CountingConnection.writes == 1
        calls = await commands(client)
        calls_per_batch = -(-(len(h.log) - 7) // 4)
        assert (calls["multi"], calls["exec"]) == (1, 1)
        assert calls["evalsha"] == calls["exists"] == calls_per_batch
        assert await client.hget(POSITIONS_KEY, position_field(TP)) == str(len(h.log)).encode()
        assert await h.state() == await whole_log(h, len(h.log))

    run_on(redis_port, body)


@pytest.mark.parametrize("lost", ["marker", "everything"])
def test_a_batch_without_the_marker_writes_nothing_and_rebuilds_first(
    redis_port: int, lost: str
) -> None:
    """The marker went (a reset, a restored snapshot) or Redis is a new empty one: the
    batch's calls write nothing, not even its positions; the model is rebuilt from the
    log, then the batch goes in again (its events dropped by the seq guards)."""

    async def body(client: aioredis.Redis) -> None:
        h = Harness(client, log_of()[:12])  # the log so far
        model = RebuildingRedisModel(
            client, RedisConversations(client, batch_events=2), h.rebuild, h.fold
        )
        await client.set(EPOCH_KEY, "1")
        await model.apply(h.log[:6], {TP: 6})
        kept = await h.state()
        if lost == "marker":
            await client.delete(EPOCH_KEY)
        else:
            await client.flushall()
        seen: dict[str, Any] = {}

        async def rebuild() -> Rebuilt:
            seen["state"] = await h.state()
            seen["keys"] = sorted(await client.keys("*"))
            seen["position"] = await client.hget(POSITIONS_KEY, position_field(TP))
            return await h.rebuild()

        model = RebuildingRedisModel(
            client, RedisConversations(client, batch_events=2), rebuild, h.fold
        )
        await model.apply(h.log[6:12], {TP: 12})  # three script calls, all refused
        if lost == "marker":
            assert seen["state"] == kept and seen["position"] == b"6"
        else:
            assert seen["keys"] == [LOCK_KEY.encode()] and seen["position"] is None
        assert model.rebuilds == 1 and h.rebuilt == 1
        assert await client.get(EPOCH_KEY) is not None
        assert await client.get(LOCK_KEY) is None
        assert await client.hget(POSITIONS_KEY, position_field(TP)) == b"12"
        assert await h.state() == await whole_log(h, 12)

    run_on(redis_port, body)


def test_a_batch_after_a_script_flush_still_applies(redis_port: int) -> None:
    """``SCRIPT FLUSH`` (or a restarted Redis): the ``EVALSHA``s fail with NOSCRIPT, all
    alike, and the model loads the script and sends the batch again."""

    async def body(client: aioredis.Redis) -> None:
        await client.set(EPOCH_KEY, "1")
        h = Harness(client, log_of())
        await h.batch(0, 6)
        await client.script_flush()
        await client.config_resetstat()
        await h.batch(6, 12)
        calls = await commands(client)
        assert calls["script|load"] == 1 and calls["exec"] == 2  # the failed one, then again
        assert await client.hget(POSITIONS_KEY, position_field(TP)) == b"12"
        assert h.rebuilt == 0
        await h.batch(12, 13)  # and on as before
        assert await h.state() == await whole_log(h, 13)

    run_on(redis_port, body)


def test_an_empty_batch_records_its_positions_and_checks_the_marker(redis_port: int) -> None:
    async def body(client: aioredis.Redis) -> None:
        h = Harness(client, log_of())
        await client.set(EPOCH_KEY, "1")
        await h.model.apply([], {TP: 3})
        assert await client.hget(POSITIONS_KEY, position_field(TP)) == b"3"
        await client.flushall()
        await h.model.apply([])
        assert h.rebuilt == 1 and await client.get(EPOCH_KEY) is not None

    run_on(redis_port, body)


def test_live_batches_write_what_one_call_per_event_writes(redis_port: int) -> None:
    """The live batch script leaves the bytes the original one-event script leaves
    (tests/test_redis_state.py's reference), in batches of any size, redelivered too."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    log = mixed_log(tenant)

    async def body(client: aioredis.Redis) -> None:
        original = client.register_script(ORIGINAL_APPLY)
        for event in [*log, *log[::3]]:  # one call per event, some redelivered
            keys, args = script_call(event)
            await original(keys=keys, args=args)
        reference = await tenant_snapshot(client, tenant)
        assert len(reference) > 60
        await client.flushall()
        await client.set(EPOCH_KEY, "1")
        model = RebuildingRedisModel(
            client, RedisConversations(client, batch_events=7), never_rebuild
        )
        at, sizes = 0, itertools.cycle([1, 2, 1, 30, 2, 100])
        while at < len(log):  # a trickle and bursts, chunks crossing conversations
            end = min(at + next(sizes), len(log))
            await model.apply(log[at:end], {TP: end})
            at = end
        await model.apply(log[::3])
        assert await tenant_snapshot(client, tenant) == reference

    run_on(redis_port, body)
