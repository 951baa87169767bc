"""Replay speed: events/s rebuilding Redis and ClickHouse from a log of N events.

Starts a private embedded stack (Kafka, Redis, the chdb owner) on free ports in a
temporary directory, writes N synthetic but valid conversation events straight to
``kefu.events`` (folded with the real lifecycle, so seqs and ids are what the
pipeline writes), then times ``projections.replay_split.split_replay`` (what
``kefu replay`` runs: one process per core, each a share of the partitions) into
Redis, ClickHouse, and both at once. Bounded: stops by itself after ``--timeout``
seconds.

The log is written as the conversation agent writes it: one Kafka record per
decision, a ``Commit`` of the events one command caused (``--format commit``, the
default), or one record per event as before commits (``--format event``).
``--interleave N`` keeps N conversations going at once, their decisions alternating
on the log as live traffic's do (1: each conversation's decisions back to back).

    .venv/bin/python bench/replay.py [--events 1000000] [--processes N] [--record]
        [--format commit|event] [--interleave 1]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import os
import platform
import pstats
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from kefu.cli import stack_down_all, stack_up_all
from kefu.cli_analytics import replay_job
from kefu.local import private_settings
from kefu.services import Services
from kefu.settings import (
    Settings,
)
from kefu.stack import Stack
from projections.clickhouse_query import AnalyticsClient
from projections.replay import ReplayFilter
from projections.replay_split import default_processes, split_replay
from schemas.codec import CODEC
from schemas.records import Command, Event, ReceiveMessage, RecordDelivery, RecordReply
from schemas.topics import TopicNames
from streams.lifecycle import Conversation, Policy, decide, evolve
from streams.moderation import Moderator
from streams.routing import TenantRouting, router

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
RUNS = ("redis", "clickhouse", "all")
FORMATS = ("commit", "event")
POLICY = Policy(Moderator(), router(lambda tenant: TenantRouting(ai_enabled=True)))


def conversation_decisions(index: int, turns: int) -> list[list[Event]]:
    """One conversation's events, exactly as the conversation agent would write them:
    per command, the events it decided (one Kafka record each since commits)."""
    conversation = f"bench-{index:08d}"
    tenant = f"t{index % 10}"
    state, out = Conversation(), []

    def step(command: Command) -> list[Event]:
        nonlocal state
        events = decide(state, command, POLICY)
        for event in events:
            state = evolve(state, event)
        out.append(events)
        return events

    for turn in range(turns):
        at = 1_790_000_000_000 + index * 10 + turn
        step(
            ReceiveMessage(
                command_id=f"{conversation}/m{turn}",
                issued_at=at,
                channel="api",
                customer_id=conversation,
                text="where is my order?",
                channel_message_id=f"m{turn}",
                conversation_id=conversation,
                tenant_id=tenant,
            )
        )
        replied = step(
            RecordReply(
                command_id=f"{conversation}/r{turn}",
                issued_at=at,
                in_reply_to=state.awaiting_reply[0],
                text="Your order ships today.",
                author="ai",
                responder="offline-faq",
                confidence=1.0,
                intent="order_status",
                conversation_id=conversation,
                tenant_id=tenant,
            )
        )
        step(
            RecordDelivery(
                command_id=f"{conversation}/d{turn}",
                issued_at=at,
                reply_event_id=replied[-1].event_id,
                channel="api",
                status="delivered",
                attempts=1,
                conversation_id=conversation,
                tenant_id=tenant,
            )
        )
    return [events for events in out if events]


def conversation_events(index: int, turns: int) -> list[Event]:
    """One conversation's events in log order (``conversation_decisions``, flat)."""
    return [event for events in conversation_decisions(index, turns) for event in events]


def decisions(events: int, interleave: int) -> Iterator[list[Event]]:
    """Decisions of whole conversations until ``events`` events or more, ``interleave``
    conversations at a time, their decisions alternating on the log."""
    written, index = 0, 0
    while written < events:
        group = [conversation_decisions(index + k, turns=3) for k in range(interleave)]
        index += interleave
        for batch in itertools.zip_longest(*group):
            for decided in batch:
                if decided is not None:
                    written += len(decided)
                    yield decided


async def write_log(
    settings: Settings, events: int, fmt: str = "commit", interleave: int = 1
) -> tuple[int, int, float]:
    """The log of ``events`` (at least: whole decisions); events and records written,
    and the seconds it took."""
    topic = TopicNames(settings.topic_prefix).events
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.servers, linger_ms=20, max_batch_size=1 << 20, acks=1
    )
    await producer.start()
    started = time.perf_counter()
    written, records, pending = 0, 0, []
    try:
        for decided in decisions(events, interleave):
            key = decided[0].conversation_id
            if fmt == "commit":
                values = [CODEC.encode(CODEC.commit(decided, key))]
            else:
                values = [CODEC.encode(event) for event in decided]
            for value in values:
                pending.append(await producer.send(topic, value, key=key.encode()))
            written += len(decided)
            records += len(values)
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return written, records, time.perf_counter() - started


async def timed_replay(settings: Settings, name: str, processes: int) -> tuple[int, float]:
    stats = await split_replay(replay_job(settings, name), ReplayFilter(), processes)
    return stats.applied, stats.seconds


def settle(settings: Settings, written: int, stall_s: float = 60.0) -> tuple[int, float]:
    """Wait until the stack's live ClickHouse projector has stored the log just written
    (it consumes it as it is written, and shares the chdb owner's one insert thread
    with the replays); gives up after ``stall_s`` without progress. Rows stored, and
    the seconds waited."""
    client = AnalyticsClient(settings.clickhouse_url, settings.clickhouse.query_port)
    started = last_change = time.monotonic()
    stored = -1
    sql = f"SELECT count() FROM {settings.clickhouse.database}.events"
    while time.monotonic() - last_change < stall_s:
        count = int(client.query(sql).rows[0][0])
        if count != stored:
            stored, last_change = count, time.monotonic()
        if stored >= written:
            break
        time.sleep(1.0)
    return stored, time.monotonic() - started


def stack_pids(settings: Settings) -> dict[str, int]:
    """The private stack's processes whose CPU a replay spends."""
    stack = Stack(settings)
    daemons = {
        "kafka": stack.kafka_daemon,
        "redis": stack.redis_daemon,
        "chdb owner": Services(settings).clickhouse().daemon,
    }
    return {name: pid for name, daemon in daemons.items() if (pid := daemon.pid()) is not None}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, from /proc (as bench/timeseries.py)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_now(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far: the stack's processes, and this process with its reaped
    children (the replay processes, once their pool has closed)."""
    times = os.times()
    out = {"replay": times.user + times.system + times.children_user + times.children_system}
    for name, pid in pids.items():
        out[name] = cpu_seconds(pid) or 0.0
    return out


async def measure(
    settings: Settings,
    events: int,
    only: tuple[str, ...] = RUNS,
    profile: bool = False,
    processes: int = 1,
    fmt: str = "commit",
    interleave: int = 1,
) -> dict[str, float]:
    written, records, seconds = await write_log(settings, events, fmt, interleave)
    figures = {"events": float(written), "records": float(records), "write_s": seconds}
    print(
        f"  wrote {written:,} events in {records:,} Kafka records ({fmt}) in {seconds:.1f} s",
        flush=True,
    )
    stored, waited = await asyncio.to_thread(settle, settings, written)
    print(f"  the live ClickHouse projector stored {stored:,} of them ({waited:.0f} s more)")
    client = aioredis.Redis.from_url(settings.redis.dsn)
    pids = stack_pids(settings)
    try:
        loads = []
        for name in RUNS:
            if name not in only:
                continue
            await client.flushdb()
            profiler = cProfile.Profile() if profile else None
            if profiler:
                profiler.enable()
            before = cpu_now(pids)
            applied, took = await timed_replay(settings, name, processes)
            after = cpu_now(pids)
            if profiler:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            loads.append(os.getloadavg()[0])
            figures[f"{name}_events_per_s"] = applied / took if took else 0.0
            label = "both" if name == "all" else name
            spent = "; ".join(
                f"{part} {(after[part] - before[part]) / max(applied, 1) * 1e6:.1f}"
                for part in after
            )
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            print(
                f"  replay into {label:<10}: {applied} events in {took:6.1f} s "
                f"= {applied / took:,.0f} events/s (CPU µs per event: {spent}; "
                f"load {os.getloadavg()[0]:.1f}; replay processes' peak RSS so far "
                f"{peak:,.0f} MiB)",
                flush=True,
            )
        figures["load_during"] = max(loads, default=0.0)
    finally:
        await client.aclose()
    return figures


def machine() -> str:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    cpu = model.split()[0] if model else platform.machine()
    return f"{os.cpu_count()}× {cpu}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--record", action="store_true", help="append a row to bench/RESULTS.md")
    parser.add_argument("--runs", default=",".join(RUNS), help="which replays, e.g. redis")
    parser.add_argument(
        "--processes",
        type=int,
        default=default_processes(),
        help="replay processes, each a share of the partitions (default: one per core)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile each replay (with --processes 1)"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="commit",
        help="commit: one Kafka record per decision (as the workers write); event: one per event",
    )
    parser.add_argument(
        "--interleave",
        type=int,
        default=1,
        help="conversations going at once, their decisions alternating on the log",
    )
    args = parser.parse_args()
    only = tuple(args.runs.split(","))
    if args.record and only != RUNS:
        parser.error("--record needs every run")
    state = Path(tempfile.mkdtemp(prefix="kefu-bench-replay-"))
    settings = private_settings(state)
    try:
        stack_up_all(settings)
        print(f"writing {args.events:,} events to kefu.events …", flush=True)
        figures = asyncio.run(
            asyncio.wait_for(
                measure(
                    settings,
                    args.events,
                    only,
                    args.profile,
                    args.processes,
                    args.format,
                    args.interleave,
                ),
                args.timeout,
            )
        )
    finally:
        stack_down_all(settings)
        shutil.rmtree(state, ignore_errors=True)
    load = os.getloadavg()[0]
    print(
        f"wrote {figures['events']:,.0f} events ({figures['records']:,.0f} records) in "
        f"{figures['write_s']:.1f} s; load avg {load:.1f}"
        f" (during the replays: {figures['load_during']:.1f})"
    )
    if args.record:
        options = f"--events {args.events} --processes {args.processes}"
        if args.format != "commit":
            options += f" --format {args.format}"
        if args.interleave != 1:
            options += f" --interleave {args.interleave}"
        row = (
            f"| {time.strftime('%Y-%m-%d')} | {machine()} | `.venv/bin/python bench/replay.py "
            f"{options} --record` | "
            f"{figures['events']:,.0f} | {figures['redis_events_per_s']:,.0f} | "
            f"{figures['clickhouse_events_per_s']:,.0f} | {figures['all_events_per_s']:,.0f} | "
            f"{figures['load_during']:.1f} |\n"
        )
        text = RESULTS.read_text("utf-8")
        header = "## Replay\n"
        if header in text:
            # After the section's last table row: other sections follow it.
            lines = text.split("\n")
            start = lines.index("## Replay")
            end = next(
                (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                len(lines),
            )
            last = max(i for i in range(start, end) if lines[i].startswith("|"))
            lines.insert(last + 1, row.rstrip("\n"))
            RESULTS.write_text("\n".join(lines), "utf-8")
            print(f"recorded in {RESULTS}")
            return
        if header not in text:
            text += (
                "\n## Replay\n\nRecorded by `bench/replay.py --record`: rebuild the read models "
                "from a log of N events (synthetic conversations folded by the real lifecycle, "
                "3 turns each), group-less reader, into Redis, ClickHouse (through the chdb "
                "owner), and both. Goal: ≥ 50,000 events/s. **load** is the 1-minute load "
                "average at the end (2 = both cores busy; above that, other work skewed it).\n\n"
                "| date | machine | command | events | redis ev/s | clickhouse ev/s | all ev/s "
                "| load |\n|---|---|---|---:|---:|---:|---:|---:|\n"
            )
        RESULTS.write_text(text + row, "utf-8")
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
