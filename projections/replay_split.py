"""A replay split over processes by partition.

One replay process is bound by its own Python (reading, decoding and preparing each
event) while Redis and the ClickHouse owner wait on it. Partitions are independent:
a conversation's events are all in one partition, in order, and every write is
guarded by its seq or keyed by its event id. So ``processes`` readers, each taking
the partitions ``p % processes == i`` of every replayed topic, rebuild the same state,
using every core. The reset and its hold on the live projection stay in the caller's
process, around all of them.

Children are spawned (not forked from a running event loop) and build their own
clients from a picklable :class:`ReplayJob`; they report progress on a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from projections.replay import (
    ClickHouseTarget,
    LogReader,
    Progress,
    RedisTarget,
    ReplayFilter,
    ReplayStats,
    Target,
    replay,
    reset_held,
)

KafkaOptions = Callable[[], Mapping[str, Any]]


@dataclass(frozen=True)
class ClickHouseTargetSpec:
    url: str
    database: str
    query_port: int


@dataclass(frozen=True)
class ReplayJob:
    """What a child needs to build its own reader and targets (all picklable)."""

    bootstrap: str
    topics: tuple[str, ...]
    kafka_options: KafkaOptions | None = None
    redis_dsn: str | None = None
    clickhouse: ClickHouseTargetSpec | None = None
    # Run first in each child: installs what opens sealed fields (schemas/sealing.py;
    # kefu.data_keys.install_for), as the parent has it.
    unsealer: Callable[[], object] | None = None

    def reader(self, share: tuple[int, int] = (0, 1)) -> LogReader:
        options = self.kafka_options() if self.kafka_options else None
        return LogReader(self.bootstrap, self.topics, kafka_options=options, share=share)

    @contextlib.asynccontextmanager
    async def targets(self) -> AsyncIterator[list[Target]]:
        """The job's targets, closed on the way out."""
        client = aioredis.Redis.from_url(self.redis_dsn) if self.redis_dsn else None
        clickhouse = None
        if self.clickhouse is not None:
            spec = self.clickhouse
            clickhouse = ClickHouseTarget(spec.url, spec.database, spec.query_port)
        built: list[Target] = []
        if client is not None:
            built.append(RedisTarget(client))
        if clickhouse is not None:
            built.append(clickhouse)
        try:
            yield built
        finally:
            if client is not None:
                await client.aclose()
            if clickhouse is not None:
                await clickhouse.close()


async def split_replay(
    job: ReplayJob,
    flt: ReplayFilter,
    processes: int,
    reset: bool = False,
    progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> ReplayStats:
    """``replay`` of ``job`` over ``processes`` processes (1: in this one)."""
    started = time.perf_counter()
    if flt.conversation:
        processes = 1  # one partition holds it
    async with job.targets() as targets, reset_held(targets, flt, reset):
        if processes <= 1:
            reader = job.reader()
            report = _Reporter(progress, on_total)
            stats = await replay(reader, targets, flt, progress=lambda n: report(reader, n))
        else:
            stats = await _in_children(job, flt, processes, progress, on_total)
    stats.seconds = time.perf_counter() - started
    return stats


class _Reporter:
    """Progress for one reader: its total once it has started, then counts."""

    def __init__(self, progress: Progress | None, on_total: Callable[[int], None] | None):
        self._progress = progress
        self._on_total = on_total
        self._told = False

    def __call__(self, reader: LogReader, n: int) -> None:
        if not self._told and self._on_total:
            self._on_total(reader.total)
        self._told = True
        if self._progress:
            self._progress(n)


async def _in_children(
    job: ReplayJob,
    flt: ReplayFilter,
    processes: int,
    progress: Progress | None,
    on_total: Callable[[int], None] | None,
) -> ReplayStats:
    context = multiprocessing.get_context("spawn")
    counts: multiprocessing.Queue[tuple[str, int]] = context.Queue()
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(
        processes, mp_context=context, initializer=_child_init, initargs=(counts,)
    ) as pool:
        runs = [
            loop.run_in_executor(pool, _child, job, flt, (i, processes)) for i in range(processes)
        ]
        gathered = asyncio.gather(*runs)
        drain = _Drain(counts, progress, on_total)
        while not gathered.done():
            drain()
            await asyncio.wait([gathered], timeout=0.2)
        drain()
        parts: list[ReplayStats] = gathered.result()
    total = ReplayStats()
    for part in parts:
        total.read += part.read
        total.records += part.records
        total.matched += part.matched
        total.applied += part.applied
        total.undecodable += part.undecodable
    return total


class _Drain:
    """The children's reports, in this process: totals add up, counts pass on."""

    def __init__(
        self,
        counts: multiprocessing.Queue[tuple[str, int]],
        progress: Progress | None,
        on_total: Callable[[int], None] | None,
    ) -> None:
        self._counts = counts
        self._progress = progress
        self._on_total = on_total
        self._total = 0

    def __call__(self) -> None:
        while True:
            try:
                kind, n = self._counts.get_nowait()
            except queue.Empty:
                return
            if kind == "total":
                self._total += n
                if self._on_total:
                    self._on_total(self._total)
            elif self._progress:
                self._progress(n)


_counts: multiprocessing.Queue[tuple[str, int]] | None = None


def _child_init(counts: multiprocessing.Queue[tuple[str, int]]) -> None:
    global _counts
    _counts = counts


def _child(job: ReplayJob, flt: ReplayFilter, share: tuple[int, int]) -> ReplayStats:
    return asyncio.run(_child_replay(job, flt, share))


async def _child_replay(job: ReplayJob, flt: ReplayFilter, share: tuple[int, int]) -> ReplayStats:
    if job.unsealer is not None:
        job.unsealer()
    reader = job.reader(share)
    counts = _counts
    report = _Reporter(
        (lambda n: counts.put(("read", n))) if counts else None,
        (lambda n: counts.put(("total", n))) if counts else None,
    )
    async with job.targets() as targets:
        return await replay(reader, targets, flt, progress=lambda n: report(reader, n))


def default_processes() -> int:
    """One replay process per core: more only contend (4 on 2 cores: Redis 35k → 25k
    events/s, bench/RESULTS.md)."""
    return max(1, os.cpu_count() or 1)
