"""Redis's own cost of the read model's script, per event.

A replay into Redis is bound by Redis's one thread (bench/RESULTS.md, "Replay"), so
this measures just that: events as the conversation agent writes them (the replay
benchmark's conversations, interleaved as a partition interleaves them), turned into
batch payloads up front, applied in order to a private ``redis-server`` configured as
the embedded stack's (AOF, fsync every second), and the server's CPU time read from
``/proc``. Prints events/s and µs of Redis CPU per event.

    .venv/bin/python bench/redis_script.py [--events 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import zip_longest
from pathlib import Path

import redis
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from bench.replay import conversation_events
from bench.timeseries import cpu_seconds
from kefu.processes import LOOPBACK, free_port, wait_until
from projections.redis_state import RedisConversations
from schemas.records import Event


def interleaved(events: int, at_once: int = 200) -> list[Event]:
    """Conversations ``at_once`` at a time, their events interleaved round robin."""
    out: list[Event] = []
    index = 0
    while len(out) < events:
        group = [conversation_events(index + k, turns=3) for k in range(at_once)]
        index += at_once
        out += [e for row in zip_longest(*group) for e in row if e is not None]
    return out[:events]


async def measure(port: int, pid: int, events: list[Event]) -> tuple[float, float]:
    client = aioredis.Redis(host=LOOPBACK, port=port)
    model = RedisConversations(client)
    payloads = model.payloads(events)
    try:
        await model.apply_payloads(payloads[:1])  # load the script
        cpu, started = _cpu(pid), time.perf_counter()
        for start in range(1, len(payloads), 8):  # a replay's writes: a few calls a trip
            await model.apply_payloads(payloads[start : start + 8])
        return time.perf_counter() - started, _cpu(pid) - cpu
    finally:
        await client.aclose()


def _cpu(pid: int) -> float:
    seconds = cpu_seconds(pid)
    if seconds is None:
        raise RuntimeError(f"redis-server (pid {pid}) is gone")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    events = interleaved(args.events)
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="kefu-redis-bench-"))
    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--bind", LOOPBACK, "--port", str(port), "--dir", str(workdir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        ],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ping = redis.Redis(host=LOOPBACK, port=port)
        wait_until(lambda: bool(ping.ping()), timeout=10, what="redis-server")
        ping.close()
        wall, cpu = asyncio.run(measure(port, server.pid, events))
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    applied = len(events) - 500  # the first payload loaded the script
    print(f"events        {applied}")
    print(f"wall          {wall:.2f} s = {applied / wall:,.0f} events/s")
    print(f"redis CPU     {cpu:.2f} s = {cpu / applied * 1e6:.1f} µs per event")


if __name__ == "__main__":
    main()
