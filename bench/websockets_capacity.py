"""Web-chat WebSockets held by one gateway process: memory per connection and the
message round trip (send → durable "ack") while holding them.

Starts a private stack on free ports, opens ``--connections`` sockets from
127.0.0.x source addresses (loopback only, bounded in count and time), then sends
``--messages`` chat messages at ``--rate`` per second over random sockets and times
each until its ack (the gateway acks once the command is durable in Kafka).

    .venv/bin/python bench/websockets_capacity.py [--connections 2000] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets

from kefu.cli import stack_down_all, stack_up_all
from kefu.local import private_settings
from kefu.services import Services
from kefu.settings import (
    Settings,
)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def open_sockets(url: str, count: int) -> list[Any]:
    sockets: list[Any] = []
    semaphore = asyncio.Semaphore(50)

    async def one(index: int) -> None:
        async with semaphore:
            # Spread source addresses over 127.0.0.0/8 so ports never run out.
            source = f"127.0.{(index // 250) % 250 + 1}.{index % 250 + 1}"
            socket = await websockets.connect(
                f"{url}&customer=ws-{index}", local_addr=(source, 0), open_timeout=30
            )
            await socket.recv()  # history
            sockets.append(socket)

    await asyncio.gather(*(one(i) for i in range(count)))
    return sockets


async def round_trips(sockets: list[Any], messages: int, rate: float) -> list[float]:
    latencies: list[float] = []

    async def one(socket: Any, n: int) -> None:
        started = time.perf_counter()
        await socket.send(json.dumps({"type": "message", "id": f"b{n}", "text": "hello"}))
        while True:
            frame = json.loads(await asyncio.wait_for(socket.recv(), 30))
            if frame.get("type") == "ack" and frame.get("id") == f"b{n}":
                latencies.append((time.perf_counter() - started) * 1000)
                return

    tasks = []
    chosen = random.sample(sockets, min(messages, len(sockets)))
    for n, socket in enumerate(chosen):
        tasks.append(asyncio.create_task(one(socket, n)))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)
    return latencies


async def run(
    settings: Settings, pid: int, connections: int, messages: int, rate: float
) -> dict[str, float]:
    g = settings.gateway
    url = f"ws://{g.host}:{g.port}/v1/chat/ws?tenant=demo"
    before = rss_kib(pid)
    started = time.perf_counter()
    sockets = await open_sockets(url, connections)
    print(f"opened {len(sockets)}", flush=True)
    opened = time.perf_counter() - started
    await asyncio.sleep(1)  # let the gateway settle its buffers before reading RSS
    after = rss_kib(pid)
    latencies = await round_trips(sockets, messages, rate)
    await asyncio.gather(*(s.close() for s in sockets))
    latencies.sort()
    return {
        "connections": float(len(sockets)),
        "open_s": opened,
        "kib_per_connection": (after - before) / max(len(sockets), 1),
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
        "messages": float(len(latencies)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="kefu-bench-ws-"))
    settings = private_settings(state)
    services = Services(settings)
    try:
        stack_up_all(settings)
        services.start(services.app_services())
        pid = services.gateway().daemon.pid()
        assert pid is not None
        figures = asyncio.run(
            asyncio.wait_for(
                run(settings, pid, args.connections, args.messages, args.rate), args.timeout
            )
        )
    finally:
        stack_down_all(settings)
        if not os.environ.get("KEFU_BENCH_KEEP"):
            shutil.rmtree(state, ignore_errors=True)
    load = os.getloadavg()[0]
    print(
        f"{figures['connections']:.0f} sockets opened in {figures['open_s']:.1f} s, "
        f"{figures['kib_per_connection']:.1f} KiB each (gateway RSS); "
        f"{figures['messages']:.0f} messages at {args.rate:.0f}/s: ack p50 "
        f"{figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms; load {load:.1f}"
    )
    if args.record:
        text = RESULTS.read_text("utf-8")
        if "## Web chat sockets" not in text:
            text += (
                "\n## Web chat sockets\n\nRecorded by `bench/websockets_capacity.py --record`: "
                "widget WebSockets held by one gateway process (from 127.0.x.y source "
                "addresses), the gateway's RSS growth per socket, and the round trip of a "
                "chat message to its ack (durable in Kafka) while holding them. Goal: "
                "50,000 sockets, ≤ 40 KB each, p99 ≤ 50 ms at 1,000 msg/s.\n\n"
                "| date | command | sockets | KiB/socket | msg/s | ack p50 ms | ack p99 ms "
                "| load |\n|---|---|---:|---:|---:|---:|---:|---:|\n"
            )
        text += (
            f"| 2026-11-21 | `.venv/bin/python bench/websockets_capacity.py --connections "
            f"{args.connections} --rate {args.rate:.0f} --record` | "
            f"{figures['connections']:.0f} | {figures['kib_per_connection']:.1f} | "
            f"{args.rate:.0f} | {figures['p50_ms']:.1f} | {figures['p99_ms']:.1f} | {load:.1f} |\n"
        )
        RESULTS.write_text(text, "utf-8")


if __name__ == "__main__":
    main()
