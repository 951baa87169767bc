"""Web-chat WebSockets held by one gateway process: memory per connection and the
message round trip (send → durable "ack") while holding them.

Starts Kafka, Redis and one gateway on free loopback ports (the round trip ends at
the gateway's ack, once the command is durable in Kafka: no worker is needed), then
``--clients`` client processes open ``--connections`` sockets between them, paced at
``--open-rate`` per second, each process from source addresses of its own in
127.0.0.0/8 (loopback only, so ports never run out). Then they send ``--messages``
chat messages at ``--rate`` per second in all over random sockets and time each until
its ack. Bounded: the whole measurement stops by ``--timeout``.

One process cannot hold more sockets than its open-files limit: the count is capped at
the gateway's hard RLIMIT_NOFILE less a reserve (the gateway raises its soft limit to
the hard one; raising the hard one needs CAP_SYS_RESOURCE), and the output says so.

    .venv/bin/python bench/websockets_capacity.py [--connections 20000] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import shutil
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from kefu.local import private_settings
from kefu.services import Services
from kefu.settings import GatewaySettings
from kefu.stack import Stack
from kefu.topics import ensure_topics

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
FD_RESERVE = 300  # the gateway's own files: Kafka, Redis, logs, the listening socket


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_nofile() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ------------------------------------------------------------------ client processes


def source_address(client: int, index: int) -> str:
    # Client k uses 127.<k+1>.x.y: up to 250 sockets per source address.
    return f"127.{client + 1}.{(index // 250) % 250 + 1}.{index % 250 + 1}"


async def _open(
    url: str, client: int, count: int, rate: float, deadline: float
) -> tuple[list[ClientConnection], int]:
    sockets: list[ClientConnection] = []
    failed = 0
    errors: dict[str, int] = {}
    in_flight = asyncio.Semaphore(200)

    async def one(index: int) -> None:
        nonlocal failed
        async with in_flight:
            try:
                # Like a browser: no client pings, deflate offered (the server decides).
                socket = await connect(
                    f"{url}&customer=ws-{client}-{index}",
                    local_addr=(source_address(client, index), 0),
                    open_timeout=min(30.0, max(deadline - time.monotonic(), 1.0)),
                    ping_interval=None,
                    max_queue=4,
                )
                await asyncio.wait_for(socket.recv(), 30)  # history
                sockets.append(socket)
            except Exception as exc:  # refused, timed out, closed: counted, not fatal
                failed += 1
                errors[repr(exc)[:80]] = errors.get(repr(exc)[:80], 0) + 1

    started = time.monotonic()
    tasks = []
    for index in range(count):
        if time.monotonic() > deadline:
            failed += count - index
            break
        await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.gather(*tasks)
    for error, times in sorted(errors.items(), key=lambda e: -e[1])[:3]:
        print(f"client {client}: {times} × {error}", flush=True)
    return sockets, failed


async def _round_trips(
    sockets: list[ClientConnection], client: int, messages: int, rate: float
) -> list[float]:
    latencies: list[float] = []
    busy: set[ClientConnection] = set()

    async def one(socket: ClientConnection, n: int) -> None:
        message_id = f"b{client}-{n}"
        started = time.perf_counter()
        try:
            await socket.send(json.dumps({"type": "message", "id": message_id, "text": "hello"}))
            while True:
                frame = json.loads(await asyncio.wait_for(socket.recv(), 30))
                if frame.get("type") == "ack" and frame.get("id") == message_id:
                    latencies.append((time.perf_counter() - started) * 1000)
                    return
        except Exception:
            latencies.append(float("inf"))  # no ack: counts against the p99
        finally:
            busy.discard(socket)

    tasks = []
    begun = time.monotonic()
    for n in range(messages):
        await asyncio.sleep(max(0.0, begun + n / rate - time.monotonic()))
        socket = random.choice(sockets)
        while socket in busy:  # one message in flight per socket, so recv has one reader
            socket = random.choice(sockets)
        busy.add(socket)
        tasks.append(asyncio.create_task(one(socket, n)))
    await asyncio.gather(*tasks)
    return latencies


async def _client_run(pipe: Connection, url: str, client: int, count: int, args: Any) -> None:
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + args.timeout
    sockets, failed = await _open(url, client, count, args.open_rate / args.clients, deadline)
    pipe.send(("opened", len(sockets), failed))
    command = await loop.run_in_executor(None, pipe.recv)
    if command == "send" and sockets:
        share = args.messages // args.clients
        latencies = await _round_trips(sockets, client, share, args.rate / args.clients)
        pipe.send(("latencies", latencies))
        await loop.run_in_executor(None, pipe.recv)  # "close"
    for socket in sockets:
        socket.transport.abort()  # the gateway sees the peers go; no closing handshake


def client_process(pipe: Connection, url: str, client: int, count: int, args: Any) -> None:
    raise_nofile()
    asyncio.run(_client_run(pipe, url, client, count, args))


# -------------------------------------------------------------------------- the run


def _receive(pipes: list[Connection], kind: str, deadline: float) -> list[tuple[Any, ...]]:
    answers = []
    for pipe in pipes:
        if not pipe.poll(max(deadline - time.monotonic(), 0.1)):
            raise TimeoutError(f"a client process did not report {kind!r} in time")
        answer = pipe.recv()
        assert answer[0] == kind, answer
        answers.append(answer)
    return answers


def measure(url: str, pid: int, connections: int, args: Any) -> dict[str, float]:
    deadline = time.monotonic() + args.timeout
    context = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    processes = []
    before = rss_kib(pid)
    files_before = open_files(pid)
    started = time.perf_counter()
    for client in range(args.clients):
        ours, theirs = context.Pipe()
        count = connections // args.clients + (client < connections % args.clients)
        process = context.Process(
            target=client_process, args=(theirs, url, client, count, args), daemon=True
        )
        process.start()
        pipes.append(ours)
        processes.append(process)
    try:
        opened_answers = _receive(pipes, "opened", deadline)
        opened = sum(a[1] for a in opened_answers)
        failed = sum(a[2] for a in opened_answers)
        open_s = time.perf_counter() - started
        print(f"opened {opened}, failed {failed} in {open_s:.1f} s", flush=True)
        time.sleep(2)  # let the gateway settle its buffers before reading RSS
        after = rss_kib(pid)
        files = open_files(pid) - files_before
        cpu = cpu_seconds(pid)
        for pipe in pipes:
            pipe.send("send")
        latencies = sorted(
            x for answer in _receive(pipes, "latencies", deadline) for x in answer[1]
        )
        rss_end = rss_kib(pid)
        cpu = cpu_seconds(pid) - cpu
        for pipe in pipes:
            pipe.send("close")
    finally:
        for process in processes:
            process.join(timeout=max(deadline - time.monotonic(), 5.0))
            if process.is_alive():
                process.kill()
    lost = sum(1 for x in latencies if x == float("inf"))
    return {
        "connections": float(opened),
        "failed": float(failed),
        "open_s": open_s,
        "gateway_fds": float(files),
        "kib_per_connection": (after - before) / max(opened, 1),
        "rss_mib": after / 1024,
        "rss_end_mib": rss_end / 1024,
        "p50_ms": latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99_ms": latencies[max(int(len(latencies) * 0.99) - 1, 0)] if latencies else float("nan"),
        "messages": float(len(latencies) - lost),
        "lost": float(lost),
        "cpu_ms_per_message": cpu * 1000 / max(len(latencies), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--open-rate", type=float, default=1000.0, help="sockets opened/s")
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--rate", type=float, default=1000.0, help="messages/s in all")
    parser.add_argument("--timeout", type=float, default=600, help="seconds, in all")
    parser.add_argument(
        "--gateway",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a GatewaySettings field, e.g. ws=websockets ws_per_message_deflate=true",
    )
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    limit = raise_nofile()  # the gateway inherits it
    connections = min(args.connections, limit - FD_RESERVE)
    if connections < args.connections:
        print(
            f"capped at {connections} sockets: one process may hold {limit} files "
            f"(hard RLIMIT_NOFILE) and the gateway keeps {FD_RESERVE} for itself",
            flush=True,
        )
    state = Path(tempfile.mkdtemp(prefix="kefu-bench-ws-"))
    settings = private_settings(state)
    overrides = dict(item.split("=", 1) for item in args.gateway)
    gateway_settings = GatewaySettings.model_validate(
        {**settings.gateway.model_dump(), **overrides}
    )
    settings = settings.model_copy(update={"gateway": gateway_settings})
    stack = Stack(settings)
    services = Services(settings)
    gateway = services.gateway()
    try:
        stack.up()
        asyncio.run(ensure_topics(settings))
        services.start([gateway])
        pid = gateway.daemon.pid()
        assert pid is not None
        g = settings.gateway
        url = f"ws://{g.host}:{g.port}/v1/chat/ws?tenant=demo"
        figures = measure(url, pid, connections, args)
    finally:
        services.stop([gateway])
        stack.down()
        if not os.environ.get("KEFU_BENCH_KEEP"):
            shutil.rmtree(state, ignore_errors=True)
    load = os.getloadavg()
    loads = "/".join(f"{x:.1f}" for x in load)
    print(
        f"{figures['connections']:.0f} sockets opened ({figures['failed']:.0f} failed) in "
        f"{figures['open_s']:.1f} s, {figures['kib_per_connection']:.1f} KiB each "
        f"(gateway RSS {figures['rss_mib']:.0f} MiB, {figures['rss_end_mib']:.0f} MiB after "
        f"the messages, {figures['gateway_fds']:.0f} more open files); "
        f"{figures['messages']:.0f} messages at {args.rate:.0f}/s ({figures['lost']:.0f} "
        f"unacked): ack p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms, "
        f"gateway CPU {figures['cpu_ms_per_message']:.2f} ms per message; "
        f"load {loads}"
    )
    if args.record:
        text = RESULTS.read_text("utf-8")
        options = "".join(f" --gateway {o}" for o in args.gateway)
        row = (
            f"| 2026-11-21 | `.venv/bin/python bench/websockets_capacity.py --connections "
            f"{args.connections} --clients {args.clients} --rate {args.rate:.0f} --messages "
            f"{args.messages}{options} --record` | {figures['connections']:.0f} | "
            f"{figures['kib_per_connection']:.1f} | {args.rate:.0f} | "
            f"{figures['p50_ms']:.1f} | {figures['p99_ms']:.1f} | {loads} |\n"
        )
        # The section's table is its last paragraph: the row goes before the next section.
        section = text.find("## Web chat sockets")
        end = text.find("\n## ", section + 1) if section >= 0 else -1
        text = text[:end] + row + text[end:] if end >= 0 else text + row
        RESULTS.write_text(text, "utf-8")


if __name__ == "__main__":
    main()
