"""Erase: time from the erase request to the last read model redacted.

A private embedded stack (Kafka, Redis, the chdb projector, one worker) gets
``--messages`` FAQ messages from ``--conversations`` customers (sealed on the log with
their keys), then each of ``--erase`` customers is erased in turn with the code of
``kefu privacy erase`` (``kefu/erasure.py``), and the bench polls both read models
every ``--poll`` seconds until each shows the customer redacted: Redis (the
conversation's ``erased_at`` and every listed text the marker) and ClickHouse (no
payload of the conversation holding the customer's words). Printed per erasure:

- **call**: the erase call (find the conversations on the log, shred the keys, send
  the commands, delete the files); this grows with the log (it is read whole);
- **redis**, **clickhouse**: from the request to that model redacted;
- **total**: from the request to the last of them.

    .venv/bin/python bench/erase.py [--messages 2000 --conversations 200 --erase 5] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from bench.pipeline import bench_settings
from bench.projection_lag import machine
from bench.results import append_row
from bench.traffic import TENANT, workload
from kefu.cli import stack_down_all, stack_up_all
from kefu.data_keys import install, key_store
from kefu.erasure import erase_customer
from kefu.services import Services
from kefu.settings import Settings
from projections.clickhouse_query import AnalyticsClient
from schemas.codec import CODEC
from schemas.keys import conversation_key, messages_key
from schemas.sealing import ERASED
from schemas.topics import TopicNames

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Erase, issue 19"
DATE = time.strftime("%Y-%m-%d")


async def publish(settings: Settings, messages: int, conversations: int, run: str) -> list[Any]:
    load = workload(messages, conversations, run)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.servers, acks="all")
    await producer.start()
    try:
        topic = TopicNames(settings.topic_prefix).commands
        for message in load:
            await producer.send(
                topic, CODEC.encode(message.command()), key=message.conversation_id.encode()
            )
        await producer.flush()
    finally:
        await producer.stop()
    return [load[i] for i in range(conversations)]  # each customer's first message


async def redis_redacted(client: aioredis.Redis, conversation: str) -> bool:
    if not await client.hget(conversation_key(TENANT, conversation), "erased_at"):
        return False
    listed = await client.lrange(messages_key(TENANT, conversation), 0, -1)
    return all(orjson.loads(m)["text"] in (ERASED, "") for m in listed)


def clickhouse_rows(settings: Settings, conversation: str) -> list[str]:
    client = AnalyticsClient(settings.clickhouse_url, settings.clickhouse.query_port)
    sql = (
        f"SELECT payload FROM {settings.clickhouse.database}.events "
        f"WHERE conversation_id = '{conversation}'"
    )
    return [str(r[0]) for r in client.query(sql).rows]


async def wait_answered(settings: Settings, client: aioredis.Redis, firsts: list[Any]) -> None:
    deadline = time.monotonic() + 300
    for message in firsts:
        key = messages_key(TENANT, message.conversation_id)
        while not any(b'"role":"ai"' in m for m in await client.lrange(key, 0, -1)):
            if time.monotonic() > deadline:
                raise TimeoutError("the conversations were not answered in 300 s")
            await asyncio.sleep(0.2)
        while not any(
            message.text in p for p in clickhouse_rows(settings, message.conversation_id)
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("ClickHouse did not get the rows in 300 s")
            await asyncio.sleep(0.2)


async def measure(settings: Settings, args: argparse.Namespace) -> list[dict[str, float]]:
    run = uuid.uuid4().hex[:6]
    firsts = await publish(settings, args.messages, args.conversations, run)
    client = aioredis.Redis.from_url(settings.redis.dsn)
    store = key_store(settings)
    install(store)
    out = []
    try:
        await wait_answered(settings, client, firsts)
        for message in firsts[: args.erase]:
            conversation = message.conversation_id
            started = time.perf_counter()
            await erase_customer(settings, store, TENANT, message.customer_id, "bench")
            called = time.perf_counter()
            at: dict[str, float] = {}
            while len(at) < 2:
                now = time.perf_counter()
                if now - started > 120:
                    raise TimeoutError(f"{conversation} not redacted in 120 s")
                if "redis" not in at and await redis_redacted(client, conversation):
                    at["redis"] = now
                if "clickhouse" not in at:
                    rows = await asyncio.to_thread(clickhouse_rows, settings, conversation)
                    if rows and not any(message.text in p for p in rows):
                        at["clickhouse"] = now
                await asyncio.sleep(args.poll)
            figures = {
                "call": called - started,
                "redis": at["redis"] - started,
                "clickhouse": at["clickhouse"] - started,
                "total": max(at.values()) - started,
            }
            print(" ".join(f"{k} {v:.3f} s" for k, v in figures.items()), flush=True)
            out.append(figures)
    finally:
        await client.aclose()
        store.stop()
    return out


HEADER = f"""{SECTION}

Recorded by `bench/erase.py --record`: a private embedded stack (one worker, chdb) with
`messages` FAQ messages of `customers` customers on the log (personal fields sealed per
customer), then `erased` customers erased one after another with `kefu privacy erase`'s
code, both read models polled every `poll` s. **call**: the erase call (it reads the
whole events topic to find the customer's conversations, shreds the keys, sends one
`EraseCustomer` per conversation, deletes the files); **redis** / **clickhouse**: from
the request to that model redacted (the worker appends `CustomerErased`, the Redis
projection rewrites the conversation's list, the projector rewrites the payloads with a
synchronous ClickHouse mutation); **total**: to the last one. Medians, then the max.

"""
HEADER += (
    "| date | machine | command | messages | customers | erased | call s | redis s "
    "| clickhouse s | total s (median) | total s (max) | load |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--erase", type=int, default=5)
    parser.add_argument("--poll", type=float, default=0.02)
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="kefu-bench-erase-"))
    settings = bench_settings(state, 1)
    try:
        stack_up_all(settings)
        services = Services(settings, workers=1)
        services.start(services.app_services())
        found = asyncio.run(measure(settings, args))
    finally:
        stack_down_all(settings)
        shutil.rmtree(state, ignore_errors=True)
    load = os.getloadavg()[0]
    med = {k: statistics.median(f[k] for f in found) for k in found[0]}
    worst = max(f["total"] for f in found)
    print(
        f"median: call {med['call']:.3f} s, redis {med['redis']:.3f} s, clickhouse "
        f"{med['clickhouse']:.3f} s, total {med['total']:.3f} s (max {worst:.3f} s); "
        f"load {load:.1f}"
    )
    if args.record:
        row = (
            f"| {DATE} | {machine()} | `.venv/bin/python bench/erase.py --messages "
            f"{args.messages} --conversations {args.conversations} --erase {args.erase} "
            f"--record` | {args.messages} | {args.conversations} | {len(found)} "
            f"| {med['call']:.2f} | {med['redis']:.2f} | {med['clickhouse']:.2f} "
            f"| {med['total']:.2f} | {worst:.2f} | {load:.1f} |"
        )
        append_row(RESULTS, SECTION, HEADER, row)
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
