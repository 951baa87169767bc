"""Replay speed: events/s rebuilding Redis and ClickHouse from a log of N events.

Starts a private embedded stack (Kafka, Redis, the chdb owner) on free ports in a
temporary directory, writes N synthetic but valid conversation events straight to
``kefu.events`` (folded with the real lifecycle, so seqs and ids are what the
pipeline writes), then times ``projections.replay_split.split_replay`` (what
``kefu replay`` runs: one process per core, each a share of the partitions) into
Redis, ClickHouse, and both. Bounded: stops by itself after ``--timeout`` seconds.

    .venv/bin/python bench/replay.py [--events 1000000] [--processes N] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import platform
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from kefu.cli import stack_down_all, stack_up_all
from kefu.cli_analytics import replay_job
from kefu.local import private_settings
from kefu.settings import (
    Settings,
)
from projections.replay import ReplayFilter
from projections.replay_split import default_processes, split_replay
from schemas.codec import CODEC
from schemas.records import Event, ReceiveMessage, RecordDelivery, RecordReply
from schemas.topics import TopicNames
from streams.lifecycle import Conversation, Policy, decide, evolve
from streams.moderation import Moderator
from streams.routing import TenantRouting, router

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
RUNS = ("redis", "clickhouse", "all")
POLICY = Policy(Moderator(), router(lambda tenant: TenantRouting(ai_enabled=True)))


def conversation_events(index: int, turns: int) -> list[Event]:
    """One conversation's events, exactly as the conversation agent would write them."""
    conversation = f"bench-{index:08d}"
    state, out = Conversation(), []
    for turn in range(turns):
        tenant = f"t{index % 10}"
        commands = [
            ReceiveMessage(
                command_id=f"{conversation}/m{turn}",
                issued_at=1_790_000_000_000 + index * 10 + turn,
                channel="api",
                customer_id=conversation,
                text="where is my order?",
                channel_message_id=f"m{turn}",
                conversation_id=conversation,
                tenant_id=tenant,
            )
        ]
        for command in commands:
            for event in decide(state, command, POLICY):
                state = evolve(state, event)
                out.append(event)
        reply = RecordReply(
            command_id=f"{conversation}/r{turn}",
            issued_at=1_790_000_000_000 + index * 10 + turn,
            in_reply_to=state.awaiting_reply[0],
            text="Your order ships today.",
            author="ai",
            responder="offline-faq",
            confidence=1.0,
            intent="order_status",
            conversation_id=conversation,
            tenant_id=tenant,
        )
        for event in decide(state, reply, POLICY):
            state = evolve(state, event)
            out.append(event)
        receipt = RecordDelivery(
            command_id=f"{conversation}/d{turn}",
            issued_at=1_790_000_000_000 + index * 10 + turn,
            reply_event_id=out[-1].event_id,
            channel="api",
            status="delivered",
            attempts=1,
            conversation_id=conversation,
            tenant_id=tenant,
        )
        for event in decide(state, receipt, POLICY):
            state = evolve(state, event)
            out.append(event)
    return out


async def write_log(settings: Settings, events: int) -> tuple[int, float]:
    topic = TopicNames(settings.topic_prefix).events
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.servers, linger_ms=20, max_batch_size=1 << 20, acks=1
    )
    await producer.start()
    started = time.perf_counter()
    written, index, pending = 0, 0, []
    try:
        while written < events:
            for event in conversation_events(index, turns=3):
                pending.append(
                    await producer.send(
                        topic, CODEC.encode(event), key=event.conversation_id.encode()
                    )
                )
                written += 1
            index += 1
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return written, time.perf_counter() - started


async def timed_replay(settings: Settings, name: str, processes: int) -> tuple[int, float]:
    stats = await split_replay(replay_job(settings, name), ReplayFilter(), processes)
    return stats.applied, stats.seconds


async def measure(
    settings: Settings,
    events: int,
    only: tuple[str, ...] = RUNS,
    profile: bool = False,
    processes: int = 1,
) -> dict[str, float]:
    written, seconds = await write_log(settings, events)
    figures = {"events": float(written), "write_s": seconds}
    client = aioredis.Redis.from_url(settings.redis.dsn)
    try:
        loads = []
        for name in RUNS:
            if name not in only:
                continue
            await client.flushdb()
            profiler = cProfile.Profile() if profile else None
            if profiler:
                profiler.enable()
            applied, took = await timed_replay(settings, name, processes)
            if profiler:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            loads.append(os.getloadavg()[0])
            figures[f"{name}_events_per_s"] = applied / took if took else 0.0
            print(
                f"  replay into {name:<10}: {applied} events in {took:6.1f} s "
                f"= {applied / took:,.0f} events/s",
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
                measure(settings, args.events, only, args.profile, args.processes), args.timeout
            )
        )
    finally:
        stack_down_all(settings)
        shutil.rmtree(state, ignore_errors=True)
    load = os.getloadavg()[0]
    print(
        f"wrote {figures['events']:,.0f} events in {figures['write_s']:.1f} s; load avg {load:.1f}"
        f" (during the replays: {figures['load_during']:.1f})"
    )
    if args.record:
        row = (
            f"| {time.strftime('%Y-%m-%d')} | {machine()} | `.venv/bin/python bench/replay.py "
            f"--events {args.events} --processes {args.processes} --record` | "
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
