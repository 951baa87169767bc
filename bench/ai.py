"""AI responder figures: intent accuracy on the held-out split, semantic-cache hit
latency inside the responder, and throughput against a model answering in 500 ms.

    .venv/bin/python bench/ai.py [--record] [--hits 2000] [--requests 256]

The model is the local OpenAI-compatible fake (``tests/fake_openai.py``); the cache
lives in a throwaway ``redis-server`` on a free loopback port (as in production, where
all workers share it) and, for comparison, in process memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connectors.ai_store import RedisCacheStore
from kefu.processes import free_ports
from schemas.records import ReplyRequested
from streams.intents import evaluate, load_intents
from streams.llm import AIConfig, AIResponder, KnowledgeLibrary, ModelSpec
from streams.semantic_cache import CacheStore, MemoryCacheStore, SemanticCache
from tests.fake_openai import FakeOpenAI

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## AI"
QUESTION = "is this jacket waterproof?"
PARAPHRASE = "Is this jacket waterproof please?"


def request(text: str, n: int) -> ReplyRequested:
    return ReplyRequested(
        event_id=f"bench-{n}",
        conversation_id=f"bench-conv-{n}",
        tenant_id="bench",
        seq=1,
        occurred_at=0,
        message_event_id="m",
        channel="api",
        text=text,
    )


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextlib.contextmanager
def redis_server() -> Iterator[str | None]:
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    (port,) = free_ports(1)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(port=port)
            for _ in range(100):
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        break
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


def model(fake: FakeOpenAI, first_token_timeout: float = 2.0) -> tuple[ModelSpec, ...]:
    return (
        ModelSpec(
            "bench", "bench", fake.base_url, first_token_timeout=first_token_timeout, timeout=10
        ),
    )


@dataclass(frozen=True, slots=True)
class HitFigures:
    store: str
    entries: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    calls: int


async def cache_hits(
    fake: FakeOpenAI, store: CacheStore, name: str, hits: int, entries: int
) -> HitFigures:
    fake.reset()
    cache = SemanticCache(store)
    responder = AIResponder(AIConfig(models=model(fake)), KnowledgeLibrary(), cache=cache)
    # Other questions of the same intent fill the bucket, as in a busy tenant.
    for i in range(entries - 1):
        await cache.store(
            "bench", "product_question", "en", f"question {i} about item {i}", "x", "m"
        )
    first = await responder.answer(request(QUESTION, 0))
    assert not first.cache_hit
    calls = len(fake.chat_calls())
    took = []
    for n in range(hits):
        start = time.perf_counter()
        answer = await responder.answer(request(PARAPHRASE, n + 1))
        took.append((time.perf_counter() - start) * 1000)
        assert answer.cache_hit, answer
    return HitFigures(
        name,
        entries,
        statistics.median(took),
        percentile(took, 0.99),
        max(took),
        len(fake.chat_calls()) - calls,
    )


@dataclass(frozen=True, slots=True)
class Throughput:
    concurrency: int
    requests: int
    seconds: float
    replies_per_s: float
    max_in_flight: int


async def throughput(fake: FakeOpenAI, requests: int, concurrency: int) -> Throughput:
    fake.reset()
    fake.delay = 0.5
    cfg = AIConfig(models=model(fake), first_token_budget=10.0)
    responder = AIResponder(cfg, KnowledgeLibrary())
    gate = asyncio.Semaphore(concurrency)

    async def one(n: int) -> None:
        async with gate:
            answer = await responder.answer(request(QUESTION, n))
            assert answer.responder == "llm", answer.responder

    start = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(requests)))
    seconds = time.perf_counter() - start
    return Throughput(concurrency, requests, seconds, requests / seconds, fake.max_in_flight)


def machine() -> str:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = " ".join(line.split(":", 1)[1].split()[:2])
                break
    return f"{os.cpu_count()}× {cpu}, Python {platform.python_version()}"


SECTION_TEXT = """
## AI

Recorded by `bench/ai.py --record` (see its docstring); one row per run, newest last.
The model is `tests/fake_openai.py` on loopback; nothing here measures a real LLM.

- **intent acc.**: top-1 accuracy of the intent classifier (`streams/intents.py`,
  character n-gram TF-IDF, centroid + nearest-examples cosine, softmax calibrated on a
  validation fold) on the held-out quarter of `streams/knowledge/intents.json`
  (19 intents, 14 English + 14 Chinese examples each; every 4th example is test data).
  **≥ 0.92**: share of test questions at or above the 0.92 threshold, and the
  accuracy on those (the ones answered straight from the FAQ or handed off).
- **hit p50/p99**: a paraphrase answered from the semantic cache, timed around
  `AIResponder.answer` (classify, vectorise, fetch the bucket, compare): Redis store
  (one `HVALS` round trip on loopback) with the bucket holding 200 entries, and the
  in-process store. No model call is made on any hit (checked).
- **replies/s @500 ms**: the fake model answers after 500 ms; requests run through
  `AIResponder.answer` with the given number in flight (the worker's responder agent
  runs `worker.concurrency` = 16 at once). One call at a time would be 2/s.

| date | machine | command | intent acc. (en / zh) | ≥ 0.92: share / acc. \
| hit p50 / p99 ms (Redis, 200 entries) | hit p50 / p99 ms (memory) | in flight \
| replies/s @500 ms | max in flight seen |
|---|---|---|---|---|---|---|---:|---:|---:|
"""


def record(row: list[str]) -> None:
    text = RESULTS.read_text("utf-8") if RESULTS.exists() else "# Benchmark results\n"
    if SECTION + "\n" not in text:
        text = text.rstrip("\n") + "\n" + SECTION_TEXT
    lines = text.splitlines()
    start = lines.index(SECTION)
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("| date"))
    end = header + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines.insert(end, "| " + " | ".join(row) + " |")
    RESULTS.write_text("\n".join(lines) + "\n", "utf-8")


async def run(args: argparse.Namespace) -> list[str]:
    report = evaluate(load_intents())
    print(
        f"intent accuracy (held-out, {report.test} questions): {report.accuracy:.3f} "
        f"(en {report.by_language['en']:.3f}, zh {report.by_language['zh']:.3f}); "
        f"≥ {report.threshold}: {report.coverage:.0%} of questions, "
        f"accuracy {report.accuracy_above:.3f}; temperature {report.temperature:g}"
    )
    fake = FakeOpenAI().start()
    try:
        figures = []
        with redis_server() as url:
            if url:
                client = aioredis.Redis.from_url(url)
                figures.append(
                    await cache_hits(fake, RedisCacheStore(client), "redis", args.hits, 200)
                )
                await client.aclose()
        figures.append(await cache_hits(fake, MemoryCacheStore(), "memory", args.hits, 200))
        for f in figures:
            print(
                f"cache hit ({f.store}, {f.entries} entries in the bucket, {args.hits} hits): "
                f"p50 {f.p50_ms:.2f} ms, p99 {f.p99_ms:.2f} ms, max {f.max_ms:.2f} ms; "
                f"model calls during hits: {f.calls}"
            )
        runs = [await throughput(fake, args.requests, c) for c in args.concurrency]
        for t in runs:
            print(
                f"throughput, model at 500 ms, {t.concurrency} in flight: {t.requests} replies "
                f"in {t.seconds:.2f} s = {t.replies_per_s:.1f} replies/s "
                f"(max {t.max_in_flight} calls in flight at the server)"
            )
    finally:
        fake.stop()
    by = {f.store: f for f in figures}
    redis_cell = f"{by['redis'].p50_ms:.2f} / {by['redis'].p99_ms:.2f}" if "redis" in by else "n/a"
    return [
        "2026-11-21",
        machine(),
        "`.venv/bin/python bench/ai.py --record`",
        f"{report.accuracy:.3f} ({report.by_language['en']:.3f} / {report.by_language['zh']:.3f})",
        f"{report.coverage:.0%} / {report.accuracy_above:.3f}",
        redis_cell,
        f"{by['memory'].p50_ms:.2f} / {by['memory'].p99_ms:.2f}",
        " / ".join(str(t.concurrency) for t in runs),
        " / ".join(f"{t.replies_per_s:.1f}" for t in runs),
        " / ".join(str(t.max_in_flight) for t in runs),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hits", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--record", action="store_true", help="append a row to bench/RESULTS.md")
    args = parser.parse_args(argv)
    row = asyncio.run(run(args))
    if args.record:
        record(row)
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
