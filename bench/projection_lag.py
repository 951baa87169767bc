"""ClickHouse projection lag under pipeline load: seconds from an event's timestamp to
its row being queryable, p50/p90/p99/max.

On a private embedded stack (free ports, a temporary state dir), the workers, gateway
and webhook sink run as in ``bench/pipeline.py``; FAQ questions are published to the
commands topic at ``--rate`` messages per second for ``--duration`` seconds (the
pipeline bench's own workload and publisher), so every message makes its events
(received, moderated, routed, reply requested, reply produced, delivered). Meanwhile a
poller asks the ClickHouse owner, every ``--poll`` seconds, for the rows that are new
since its last look (per Kafka partition, by offset: the projector inserts each
partition in order) and takes, for each row, the end of the first query that returned
it minus the event's ``occurred_at``. ``occurred_at`` is the command's time (when
the bench published it), so the lag covers the whole way: the worker, Kafka, the
projector's batching (``clickhouse.batch_seconds``) and the insert. A group-less
consumer also tails the events topic, so each row has a second lag, from the moment
its event was readable on the log: the projection's own part (the projector's fetch,
batching and insert). The resolution is the poll interval plus a query's duration.

    .venv/bin/python bench/projection_lag.py [--rate 100 --duration 60] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.pipeline import bench_settings
from bench.results import append_row
from bench.traffic import TENANT, publish_to_kafka, workload
from kefu.cli import stack_down_all, stack_up_all
from kefu.services import Services
from kefu.settings import Settings
from projections.clickhouse_query import AnalyticsClient
from schemas.topics import TopicNames

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## ClickHouse projection lag"
DATE = "2026-11-21"


@dataclass(slots=True)
class Lags:
    seconds: list[float]  # occurred_at -> queryable
    from_log: list[float]  # readable on the log -> queryable
    polls: int
    poll_s: float  # mean time a poll query took


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LogTail:
    """When each record of the events topic became readable (epoch ms), by position."""

    def __init__(self, settings: Settings) -> None:
        self.arrived: dict[tuple[int, int], float] = {}
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.servers,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=5,
        )
        self._topic = TopicNames(settings.topic_prefix).events

    async def start(self) -> None:
        await self._consumer.start()
        cluster = await self._consumer._client.fetch_all_metadata()
        found = sorted(cluster.partitions_for_topic(self._topic) or ())
        partitions = [TopicPartition(self._topic, p) for p in found]
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)

    async def run(self) -> None:
        while True:
            fetched = await self._consumer.getmany(timeout_ms=20)
            now = time.time() * 1000
            for tp, records in fetched.items():
                for record in records:
                    self.arrived[(tp.partition, record.offset)] = now

    async def stop(self) -> None:
        await self._consumer.stop()


def new_rows_sql(database: str, seen: dict[int, int]) -> str:
    """Rows of the bench tenant's conversations past the offsets already seen."""
    parts = [f"(kafka_partition = {p} AND kafka_offset > {o})" for p, o in seen.items()]
    if seen:
        parts.append(f"kafka_partition NOT IN ({', '.join(map(str, seen))})")
    where = " OR ".join(parts) or "1"
    return (
        "SELECT kafka_partition, kafka_offset, toUnixTimestamp64Milli(occurred_at) "
        f"FROM {database}.events WHERE tenant_id = '{TENANT}' "
        f"AND NOT startsWith(conversation_id, 'queue:') AND ({where})"
    )


async def poll(
    settings: Settings,
    interval: float,
    publishing: asyncio.Task[None],
    quiet_s: float,
    tail: LogTail,
) -> Lags:
    """Until publishing is over and no new row came for ``quiet_s`` seconds."""
    ch = settings.clickhouse
    client = AnalyticsClient(settings.clickhouse_url, ch.query_port)
    seen: dict[int, int] = {}
    lags: list[float] = []
    from_log: list[float] = []
    polls, query_s = 0, 0.0
    last_new = time.monotonic()
    while True:
        started = time.monotonic()
        result = await asyncio.to_thread(client.query, new_rows_sql(ch.database, seen))
        visible_ms = time.time() * 1000
        took = time.monotonic() - started
        polls += 1
        query_s += took
        for partition, offset, occurred_ms in result.rows:
            p, o = int(partition), int(offset)
            seen[p] = max(seen.get(p, -1), o)
            lags.append((visible_ms - int(occurred_ms)) / 1000)
            arrived = tail.arrived.get((p, o))
            if arrived is not None:
                from_log.append((visible_ms - arrived) / 1000)
        if result.rows:
            last_new = time.monotonic()
        if publishing.done() and time.monotonic() - last_new > quiet_s:
            publishing.result()
            return Lags(lags, from_log, polls, query_s / polls)
        await asyncio.sleep(max(0.0, interval - took))


async def measure(
    settings: Settings, rate: float, duration: float, args: argparse.Namespace
) -> Lags:
    messages = workload(max(1, int(rate * duration)), args.conversations, uuid.uuid4().hex[:8])
    tail = LogTail(settings)
    await tail.start()
    tailing = asyncio.create_task(tail.run())
    try:
        publishing = asyncio.create_task(
            publish_to_kafka(settings, messages, rate, lambda message: None)
        )
        return await poll(settings, args.poll, publishing, args.quiet, tail)
    finally:
        tailing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tailing
        await tail.stop()


def machine() -> str:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    cpu = model.split()[0] if model else platform.machine()
    return f"{os.cpu_count()}× {cpu}, Python {platform.python_version()}"


def record(row: str) -> None:
    append_row(RESULTS, SECTION, HEADER, row)


HEADER = f"""{SECTION}

Recorded by `bench/projection_lag.py --record`: FAQ messages published at a paced rate
through the whole pipeline (one worker, the embedded stack), and for every event of
the bench's conversations, the seconds to its row being queryable in ClickHouse
(through the chdb owner, polled every `poll` seconds: the resolution), counted from
its `occurred_at` (the command's time: the worker's processing included; **e2e**)
and from when it was readable on the events topic (the projection's own lag: fetch,
batching, insert; **log**). The projector's defaults: batches of up to 5,000 rows or
0.5 s. **load** is the 1-minute load average at the end.

"""
HEADER += (
    "| date | machine | command | msg/s | events | e2e p50 s | e2e p99 s | log p50 s "
    "| log p90 s | log p99 s | log max s | poll s | load |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of publishing")
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between queries")
    parser.add_argument("--quiet", type=float, default=10.0, help="stop after this long idle")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="kefu-bench-lag-"))
    settings = bench_settings(state, args.workers)
    try:
        stack_up_all(settings)
        services = Services(settings, workers=args.workers)
        services.start(services.app_services())
        print(f"publishing {args.rate:g} msg/s for {args.duration:g} s …", flush=True)
        lags = asyncio.run(
            asyncio.wait_for(measure(settings, args.rate, args.duration, args), args.timeout)
        )
    finally:
        stack_down_all(settings)
        shutil.rmtree(state, ignore_errors=True)
    load = os.getloadavg()[0]
    s, g = lags.seconds, lags.from_log
    for label, values in (("from occurred_at", s), ("from the log", g)):
        print(
            f"{len(values)} events, lag {label}: p50 {quantile(values, 0.5):.3f} s, "
            f"p90 {quantile(values, 0.9):.3f} s, p99 {quantile(values, 0.99):.3f} s, "
            f"max {max(values, default=float('nan')):.3f} s"
        )
    print(f"{lags.polls} polls, {lags.poll_s * 1000:.0f} ms each; load avg {load:.1f}")
    if args.record:
        row = (
            f"| {DATE} | {machine()} | `.venv/bin/python bench/projection_lag.py --rate "
            f"{args.rate:g} --duration {args.duration:g} --record` | {args.rate:g} "
            f"| {len(s)} | {quantile(s, 0.5):.2f} | {quantile(s, 0.99):.2f} "
            f"| {quantile(g, 0.5):.2f} | {quantile(g, 0.9):.2f} | {quantile(g, 0.99):.2f} "
            f"| {max(g, default=float('nan')):.2f} | {args.poll:g} | {load:.1f} |"
        )
        record(row)
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
