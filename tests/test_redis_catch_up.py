"""Redis that lost its newest writes is caught up from the log, not left behind (issue 19).

With ``appendfsync everysec`` a crash loses up to a second of Redis's append-only file
(a restored backup loses more) while the readers' committed offsets stay on Kafka: the
conversation hash is at seq k, the log at k+n, and the epoch marker is still there.
Without a check the reader resumes after the lost events and its next event of the
conversation passes the seq guard over the gap, which then stays for good. These tests
drive :class:`projections.redis_rebuild.RebuildingRedisModel` on a private Redis with
a log held in memory (the real log's fold is exercised by tests/test_machine_crash.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import TopicPartition

from kefu.processes import free_ports, port_open, wait_until
from projections.redis_rebuild import (
    EPOCH_KEY,
    POSITIONS_KEY,
    RebuildingRedisModel,
    Rebuilt,
    position_field,
)
from projections.redis_state import RedisConversations
from schemas.keys import conversation_key, messages_key
from schemas.records import Event
from tests.test_redis_projection import Conv

TENANT = "catchup"
State = dict[str, tuple[dict[Any, Any], list[Any]]]  # per conversation: hash, recent
TP = TopicPartition("t.events", 0)


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A Redis of this module's own (the session stack's workers watch the real keys)."""
    with private_redis(tmp_path_factory.mktemp("redis-catch-up")) as port:
        yield port


@contextlib.contextmanager
def private_redis(where: Path) -> Iterator[int]:
    """A ``redis-server`` of its own, with its files in ``where``; yields its port."""
    server = shutil.which("redis-server")
    # Never a skip: `make test` installs it (scripts/ensure-system.sh).
    assert server is not None, "no redis-server: run scripts/ensure-system.sh"
    port = free_ports(1)[0]
    argv = [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(where)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: port_open(port), timeout=20.0, what="redis-server")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def log_of(conversations: int = 3, turns: int = 3) -> list[Event]:
    """One partition's log: conversations taking turns, as a worker appends them."""
    convs = [Conv(TENANT, f"c{i}") for i in range(conversations)]
    out: list[Event] = []
    for turn in range(turns):
        for i, conv in enumerate(convs):
            at = 1000 * (turn + 1) + i
            out += conv.received(at)
            out.append(conv.reply(at + 500, "ai"))
    return out


class Harness:
    """The model over a fresh Redis, its log, and what was folded from the log."""

    def __init__(self, client: aioredis.Redis, log: Sequence[Event]) -> None:
        self.client = client
        self.log = list(log)
        self.folded: list[tuple[int, int]] = []
        self.rebuilt = 0
        self.plain = RedisConversations(client)
        self.model = RebuildingRedisModel(client, self.plain, self.rebuild, self.fold)

    async def rebuild(self) -> Rebuilt:
        self.rebuilt += 1
        await self.plain.apply(self.log)
        return Rebuilt(len(self.log), {TP: len(self.log)})

    async def fold(self, ranges: Mapping[TopicPartition, tuple[int, int]]) -> int:
        start, end = ranges[TP]
        self.folded.append((start, end))
        await self.plain.apply(self.log[start:end])
        return end - start

    async def batch(self, start: int, end: int) -> None:
        """The reader's batch of offsets ``[start, end)`` (one event a record)."""
        await self.model.apply(self.log[start:end], {TP: end})

    async def state(self) -> State:
        out: State = {}
        for cid in sorted({e.conversation_id for e in self.log}):
            state = await self.client.hgetall(conversation_key(TENANT, cid))
            recent = await self.client.lrange(messages_key(TENANT, cid), 0, -1)
            out[cid] = (state, recent)
        return out


Body = Callable[[Harness], Awaitable[None]]


def with_harness(port: int, body: Body) -> None:
    """``body`` on a flushed Redis, in a loop of its own."""

    async def run() -> None:
        client = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            await client.flushall()
            await body(Harness(client, log_of()))
        finally:
            await client.aclose()

    asyncio.run(run())


async def the_whole_log(h: Harness) -> State:
    """What the model holds when it applied every event of the log, once."""
    await h.client.flushall()
    await h.plain.apply(h.log)
    return await h.state()


def seqs(state: State) -> dict[str, int]:
    return {cid: int(s[0][b"seq"]) for cid, s in state.items()}


def test_the_seq_guard_alone_hides_a_lost_tail(redis_port: int) -> None:
    """The bug: Redis kept offsets 0..5 of 27, the reader had committed 18; its next
    batch passes every conversation's guard and the lost turns never come back."""

    async def run(h: Harness) -> None:
        await h.client.set(EPOCH_KEY, "1")
        await h.batch(0, 6)  # what the append-only file kept
        await h.plain.apply(h.log[18:])  # the reader goes on at its committed offset
        behind = await h.state()
        full = await the_whole_log(h)
        assert seqs(behind) == seqs(full)  # the guards see nothing wrong...
        assert behind != full  # ...but two turns of each conversation are missing
        assert behind["c0"][0][b"messages"] == b"2" and full["c0"][0][b"messages"] == b"3"

    with_harness(redis_port, run)


def test_a_model_behind_the_log_is_caught_up_before_the_reader_goes_on(redis_port: int) -> None:
    async def run(h: Harness) -> None:
        await h.client.set(EPOCH_KEY, "1")
        await h.batch(0, 6)
        assert await h.client.hget(POSITIONS_KEY, position_field(TP)) == b"6"
        # Crash: Redis kept offsets 0..5; the reader had applied and committed 18.
        assert await h.model.catch_up({TP: 18}) == 12
        assert h.folded == [(6, 18)] and h.rebuilt == 0
        assert await h.client.hget(POSITIONS_KEY, position_field(TP)) == b"18"
        await h.batch(18, len(h.log))
        caught_up = await h.state()
        assert caught_up == await the_whole_log(h)
        assert h.model.caught_up == 12

    with_harness(redis_port, run)


def test_nothing_is_folded_when_the_model_is_at_or_past_the_reader(redis_port: int) -> None:
    async def run(h: Harness) -> None:
        await h.client.set(EPOCH_KEY, "1")
        await h.batch(0, 12)
        # Committed behind what Redis holds (the crash came before the commit): the
        # reader applies 9..11 again and the guards drop them.
        assert await h.model.catch_up({TP: 9}) == 0
        assert await h.model.catch_up({TP: 12}) == 0
        assert h.folded == []
        await h.batch(9, len(h.log))
        assert await h.state() == await the_whole_log(h)

    with_harness(redis_port, run)


def test_a_partition_the_model_never_recorded_is_folded_from_the_beginning(redis_port: int) -> None:
    """The marker survived, the partition's position did not (written after it, then
    lost; or a model from before positions): from offset 0, the guards drop repeats."""

    async def run(h: Harness) -> None:
        await h.client.set(EPOCH_KEY, "1")
        await h.plain.apply(h.log[:3])
        assert await h.model.catch_up({TP: 15}) == 15
        assert h.folded == [(0, 15)]
        await h.batch(15, len(h.log))
        assert await h.state() == await the_whole_log(h)

    with_harness(redis_port, run)


def test_a_flushed_model_is_rebuilt_and_its_positions_recorded(redis_port: int) -> None:
    async def run(h: Harness) -> None:
        await h.batch(0, 6)  # no marker: the whole log is replayed first
        assert h.rebuilt == 1
        assert await h.client.hget(POSITIONS_KEY, position_field(TP)) == b"6"
        await h.client.flushall()
        assert await h.model.catch_up({TP: 20}) == 0  # rebuilt to the end: nothing behind
        assert h.rebuilt == 2 and h.folded == []
        assert await h.client.hget(POSITIONS_KEY, position_field(TP)) == str(len(h.log)).encode()
        assert await h.state() == await the_whole_log(h)

    with_harness(redis_port, run)
