"""End-to-end pipeline benchmark, with the raw Kafka baseline measured in the same run.

What it does, on a private embedded stack (free ports, a temporary state dir, so it
never touches a running demo):

1. **Baseline**: N records shaped like the pipeline's commands are pre-produced to a
   topic; one aiokafka consumer reads them and produces each, unchanged, to another
   topic (acks=all, Faust's producer defaults). Timed from the first record consumed
   to the last produce acknowledged. aiokafka is the client Faust uses, so the ratio
   pipeline/baseline says what kefu's processing costs over moving the bytes.
2. **Pipeline**: the workers start; N ``ReceiveMessage`` commands (FAQ questions, so
   the offline responder answers) over M conversations are published straight to the
   commands topic (or, with ``--via-gateway``, POSTed to the REST API). An observer
   tails the events topic and matches each ``ReplyProduced`` to its message through
   ``ReplyRequested``, and each reply to its ``MessageDelivered`` (the events reader's
   projection, webhook POST and receipt done). Throughput is N over the time from the
   first publish to the last reply delivered (``--until-replied``: to the last reply
   seen, the window before 2026-12-08); latency is, per message, publish to its
   ``ReplyProduced`` seen, and ``delivered`` publish to its ``MessageDelivered``.

3. **Time series** (``bench/timeseries.py``): per second, messages published, replies
   seen, their latency p50/p99, and each process's RSS and CPU%; with ``--json`` the
   result goes there and an SVG plot of it next to it (``bench/plot.py``).
4. **Soak** (``--duration S --rate R``): publish at R msg/s for S seconds; each
   worker's RSS after ``--warmup`` seconds against its RSS at the end, flat if it grew
   10 % or less.
5. **Scale-out** (``--workers N``): records each worker processed and the partitions
   it held (``bench/scaleout.py``, from the workers' /metrics), with CPU seconds.

Run: ``.venv/bin/python bench/pipeline.py [--messages 2000 --conversations 200
--workers 1 --rate 0 --record --json out.json]``, or a soak: ``--rate 2000 --duration
600``. It stops by itself (``--timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass
from datetime import date
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.plot import plot_result
from bench.scaleout import WorkerFigures, figures_lines, scrape_all, worker_figures
from bench.timeseries import (
    ProcSampler,
    SecondRow,
    SoakResult,
    build_series,
    cpu_seconds,
    series_table,
    soak,
)
from bench.traffic import (
    TENANT,
    Message,
    Observer,
    Tracking,
    publish_to_kafka,
    publish_via_gateway,
    workload,
)
from kefu.cli import stack_down_all, stack_up_all
from kefu.local import private_settings
from kefu.processes import LOOPBACK
from kefu.services import Services
from kefu.settings import (
    Settings,
    TenantSettings,
)
from kefu.stack import Stack
from schemas.codec import CODEC

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# After the last reply, keep watching this long for duplicate replies (a redelivered
# command or request would show up within a commit interval or two).
DEFAULT_GRACE = 3.0
# All messages published and no new reply for this long: the pipeline is stuck.
STALL_SECONDS = 30.0
# Per-message samples go into the JSON only up to this many messages.
SAMPLES_CAP = 20_000
# The Kafka baseline copies at most this many records unless --baseline-records says.
BASELINE_CAP = 100_000
# A long run prints its progress this often.
PROGRESS_EVERY_S = 10.0
DEFAULT_WARMUP_S = 60.0


# ------------------------------------------------------------------------ machine


@dataclass(frozen=True, slots=True)
class Machine:
    cpu_model: str
    cpus: int
    ram_gib: float
    kafka: str
    python: str
    aiokafka: str
    faust: str

    def short(self) -> str:
        return (
            f"{self.cpus}× {self.cpu_model}, {self.ram_gib:.0f} GiB, "
            f"Kafka {self.kafka}, Python {self.python}"
        )


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(settings: Settings) -> Machine:
    model, cpus = "unknown", 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "processor":
                cpus += 1
    ram_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_kib = int(line.split()[1])
    return Machine(
        cpu_model=model,
        cpus=cpus or os.cpu_count() or 0,
        ram_gib=ram_kib / 1024**2,
        kafka=settings.kafka.version,
        python=platform.python_version(),
        aiokafka=_version("aiokafka"),
        faust=_version("faust-streaming"),
    )


# ------------------------------------------------------------------------ settings


def bench_settings(
    state_dir: Path,
    workers: int,
    event_loop: str | None = None,
    kafka_jvm: Sequence[str] | None = None,
    linger_ms: float | None = None,
    inline_answers: bool = True,
    worker_overrides: Sequence[str] = (),
) -> Settings:
    base = private_settings(state_dir, workers)
    if worker_overrides:  # KEY=VALUE pairs, validated by the settings model
        fields = dict(pair.split("=", 1) for pair in worker_overrides)
        worker = type(base.worker).model_validate({**base.worker.model_dump(), **fields})
        base = base.model_copy(update={"worker": worker})
    if linger_ms is not None:
        base = base.model_copy(
            update={"worker": base.worker.model_copy(update={"linger_ms": linger_ms})}
        )
    if not inline_answers:
        base = base.model_copy(
            update={"worker": base.worker.model_copy(update={"inline_answers": False})}
        )
    if kafka_jvm is not None:
        kafka = base.kafka.model_copy(update={"jvm_options": tuple(kafka_jvm)})
        base = base.model_copy(update={"kafka": kafka})
    if event_loop is not None:  # else the settings' defaults
        base = base.model_copy(
            update={
                "worker": base.worker.model_copy(update={"event_loop": event_loop}),
                "gateway": base.gateway.model_copy(update={"event_loop": event_loop}),
            }
        )
    sink = base.dev.webhook_sink_port
    return base.model_copy(
        update={
            # Replies go out by signed webhook to the local sink, as in the demo: the
            # workers do the whole production path, delivery included.
            "tenants": {
                TENANT: TenantSettings(
                    api_key=SecretStr("bench-key"),
                    webhook_url=f"http://{LOOPBACK}:{sink}/webhook",
                    webhook_secret=SecretStr("bench-webhook-secret"),
                )
            },
            "log_level": "WARNING",
        }
    )


# ------------------------------------------------------------------------ statistics


@dataclass(frozen=True, slots=True)
class Percentiles:
    count: int
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Percentiles:
        if not samples:
            return cls(0, 0.0, 0.0, 0.0, 0.0)
        if len(samples) == 1:
            return cls(1, samples[0], samples[0], samples[0], samples[0])
        cuts = statistics.quantiles(samples, n=100, method="inclusive")
        return cls(len(samples), cuts[49], cuts[89], cuts[98], max(samples))

    def ms(self) -> str:
        return f"p50 {self.p50:.0f}  p90 {self.p90:.0f}  p99 {self.p99:.0f}  max {self.max:.0f} ms"


# ------------------------------------------------------------------------ baseline


@dataclass(frozen=True, slots=True)
class BaselineResult:
    client: str
    records: int
    elapsed_s: float
    msgs_per_s: float
    value_bytes_avg: float


async def _create_topics(settings: Settings, names: Sequence[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.servers)
    await admin.start()
    try:
        partitions = settings.kafka.partitions
        await admin.create_topics([NewTopic(name, partitions, 1) for name in names])
        # Wait until every partition has a leader: producing earlier only earns
        # NotLeaderForPartition retries (and warnings) inside the measurement.
        for _ in range(200):
            if set(names) <= set(await admin.list_topics()):
                described = await admin.describe_topics(list(names))
                leaders = [p["leader"] for t in described for p in t["partitions"]]
                if len(leaders) == partitions * len(names) and min(leaders) >= 0:
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"topics {names} have no leaders after creation")
    finally:
        await admin.close()


async def _preproduce(
    settings: Settings, topic: str, records: Sequence[tuple[bytes, bytes]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.servers, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def aiokafka_baseline(
    settings: Settings, records: Sequence[tuple[bytes, bytes]], deadline: float
) -> BaselineResult:
    """Consume N records and produce each to another topic: no decoding, no state."""
    suffix = uuid.uuid4().hex[:8]
    source = settings.topic(f"bench.baseline-{suffix}.in")
    sink = settings.topic(f"bench.baseline-{suffix}.out")
    await _create_topics(settings, [source, sink])
    await _preproduce(settings, source, records)

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    # Faust's producer settings: acks=all (producer_acks=-1), no linger, 16 KiB batches.
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.servers, acks="all", linger_ms=0, max_batch_size=16384
    )
    await consumer.start()
    await producer.start()
    try:
        tps = [TopicPartition(source, p) for p in range(settings.kafka.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        futures: list[Awaitable[Any]] = []
        first: float | None = None
        consumed = 0
        while consumed < len(records):
            if time.monotonic() > deadline:
                raise TimeoutError(f"baseline: {consumed}/{len(records)} consumed at the deadline")
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                for message in messages:
                    if first is None:
                        first = time.monotonic()
                    futures.append(await producer.send(sink, key=message.key, value=message.value))
                    consumed += 1
        await asyncio.gather(*futures)
        assert first is not None
        elapsed = time.monotonic() - first
    finally:
        await consumer.stop()
        await producer.stop()
    return BaselineResult(
        client=f"aiokafka {_version('aiokafka')}",
        records=len(records),
        elapsed_s=elapsed,
        msgs_per_s=len(records) / elapsed,
        value_bytes_avg=sum(len(v) for _, v in records) / len(records),
    )


def confluent_baseline(
    settings: Settings, records: Sequence[tuple[bytes, bytes]], deadline: float
) -> BaselineResult | None:
    """The same consume → produce with confluent-kafka (librdkafka), if it is installed.

    Not a kefu dependency: reported only as a reference for what a C client does on
    this machine. Synchronous: call it outside an event loop."""
    if importlib.util.find_spec("confluent_kafka") is None:
        return None
    ck = importlib.import_module("confluent_kafka")
    suffix = uuid.uuid4().hex[:8]
    source = settings.topic(f"bench.baseline-ck-{suffix}.in")
    sink = settings.topic(f"bench.baseline-ck-{suffix}.out")
    asyncio.run(_create_topics(settings, [source, sink]))
    asyncio.run(_preproduce(settings, source, records))

    consumer = ck.Consumer(
        {
            "bootstrap.servers": settings.kafka.servers,
            "group.id": f"bench-{suffix}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    producer = ck.Producer(
        {"bootstrap.servers": settings.kafka.servers, "acks": "all", "linger.ms": 0}
    )
    acked = 0
    errors: list[str] = []

    def on_ack(err: Any, _msg: Any) -> None:
        nonlocal acked
        if err is not None:
            errors.append(str(err))
        acked += 1

    try:
        consumer.assign(
            [
                ck.TopicPartition(source, p, ck.OFFSET_BEGINNING)
                for p in range(settings.kafka.partitions)
            ]
        )
        first: float | None = None
        consumed = 0
        while consumed < len(records):
            if time.monotonic() > deadline:
                raise TimeoutError(f"confluent baseline: {consumed} consumed at the deadline")
            for message in consumer.consume(num_messages=1000, timeout=0.5):
                if message.error():
                    continue
                if first is None:
                    first = time.monotonic()
                while True:
                    try:
                        producer.produce(
                            sink, key=message.key(), value=message.value(), on_delivery=on_ack
                        )
                        break
                    except BufferError:
                        producer.poll(0.01)
                producer.poll(0)
                consumed += 1
        while acked < consumed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"confluent baseline: {acked}/{consumed} acked at the deadline")
            producer.poll(0.05)
        assert first is not None
        elapsed = time.monotonic() - first
    finally:
        consumer.close()
    if errors:
        raise RuntimeError(f"confluent baseline: {len(errors)} produce errors, e.g. {errors[0]}")
    return BaselineResult(
        client=f"confluent-kafka {_version('confluent-kafka')}",
        records=len(records),
        elapsed_s=elapsed,
        msgs_per_s=len(records) / elapsed,
        value_bytes_avg=sum(len(v) for _, v in records) / len(records),
    )


# ------------------------------------------------------------------------ pipeline


def stack_pids(settings: Settings, workers: int) -> dict[str, int]:
    """The pids of this run's processes, by name (the bench itself included)."""
    stack = Stack(settings)
    services = Services(settings, workers=workers)
    daemons = [
        stack.kafka_daemon,
        stack.redis_daemon,
        services.clickhouse().daemon,
        *(s.daemon for s in services.app_services()),
    ]
    pids = {"bench": os.getpid()}
    for daemon in daemons:
        pid = daemon.pid()
        if pid is not None:
            pids[daemon.name] = pid
    return pids


def worker_ports(settings: Settings, workers: int) -> dict[str, int]:
    """Each worker's web port (``/metrics``), as ``Services.worker`` assigns them."""
    return {f"worker-{i}": settings.worker.web_port + i for i in range(workers)}


def _machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (/proc/stat)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0.0
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait.
    ticks = [int(v) for v in first[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds each of our processes spent between ``start`` and ``stop``, and
    what everything else on the machine used meanwhile (a shared machine skews runs)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self._busy = 0.0
        self.used: dict[str, float] = {}
        self.others = 0.0

    def start(self) -> None:
        self._busy = _machine_busy_seconds()
        for name, pid in self.pids.items():
            cpu = cpu_seconds(pid)
            if cpu is not None:
                self._start[name] = cpu

    def stop(self) -> None:
        busy = _machine_busy_seconds() - self._busy
        for name, begin in self._start.items():
            cpu = cpu_seconds(self.pids[name])
            if cpu is not None:
                self.used[name] = cpu - begin
        self.others = max(0.0, busy - sum(self.used.values()))


@dataclass(frozen=True, slots=True)
class PipelineResult:
    messages: int
    conversations: int
    workers: int
    rate: float
    duration_s: float  # --duration (0: a fixed --messages count)
    via: str
    publish_s: float  # first to last publish acknowledged
    elapsed_s: float  # first publish to last reply seen
    msgs_per_s: float
    replies: int
    missing: int
    duplicates: int
    unmatched: int
    blocked: int
    latency_ms: Percentiles  # publish -> ReplyProduced seen
    ingest_ms: Percentiles  # publish -> ReplyRequested seen (commands -> conversation)
    answer_ms: Percentiles  # ReplyRequested -> ReplyProduced (responder round trip)
    observer_lag_ms: Percentiles  # ReplyProduced seen - its record timestamp
    delivered: int  # replies whose MessageDelivered was seen
    delivered_ms: Percentiles  # publish -> the reply's MessageDelivered on the log
    events_seen: int
    timed_out: bool
    replies_per_second: list[int]  # replies seen in each second after the first publish
    cpu_s: dict[str, float]  # CPU seconds per process, first publish to last reply
    others_cpu_s: float  # CPU seconds every other process on the machine used meanwhile
    load_avg: list[float]  # 1, 5, 15 min, at the end: others share the machine
    # Per second from the start of publishing: published, replies, latency, RSS, CPU%.
    timeseries: list[SecondRow]
    soak: SoakResult | None  # worker RSS after the warm-up vs at the end (--duration)
    per_worker: list[WorkerFigures]  # records each worker processed, its partitions
    # Per message, ms after the first publish: published, ReplyRequested seen, reply
    # seen. Only up to SAMPLES_CAP messages (a soak would make the JSON huge).
    samples: list[tuple[float | None, float | None, float | None]]


def _ms_after(origin: float, at: float) -> float | None:
    return None if math.isnan(at) else round((at - origin) * 1000, 1)


@dataclass(frozen=True, slots=True)
class RunOptions:
    conversations: int
    workers: int
    rate: float
    duration: float
    warmup: float
    via_gateway: bool
    grace: float
    deadline: float
    until_delivered: bool = True


async def run_pipeline(
    settings: Settings, messages: Sequence[Message], options: RunOptions, cpu: CpuMeter
) -> PipelineResult:
    tracking = Tracking(len(messages))
    observer = Observer(settings, tracking)
    await observer.start()
    ports = worker_ports(settings, options.workers)
    metrics_before = await asyncio.to_thread(scrape_all, ports)
    sampler = ProcSampler(cpu.pids)
    cpu.start()
    origin = time.monotonic()
    watching = asyncio.create_task(observer.run())
    publish = publish_via_gateway if options.via_gateway else publish_to_kafka

    def on_publish(message: Message) -> None:
        if tracking.sent == 0:  # the series count from the first publish, as elapsed does
            tracking.begin(time.monotonic())
            sampler.start(tracking.buckets.origin)
        observer.expect(message)
        tracking.on_sent(message.index)

    timed_out = False
    deadline = options.deadline
    try:
        publishing = asyncio.create_task(publish(settings, messages, options.rate, on_publish))
        seen = observer.seen
        last_progress = time.monotonic()
        next_report = origin + PROGRESS_EVERY_S
        # Until every reply is also delivered (its MessageDelivered on the log): the
        # events reader's work (projection, delivery) belongs in the window too.
        while seen.replies + seen.blocked < len(messages) or (
            options.until_delivered and seen.delivered < seen.replies
        ):
            if watching.done():
                watching.result()  # the observer died: raise its error
            if publishing.done():
                publishing.result()
            now = time.monotonic()
            if now > deadline:
                timed_out = True
                break
            if publishing.done() and now - last_progress > STALL_SECONDS:
                break  # nothing moves: report what is missing rather than wait out
            if now >= next_report:
                next_report += PROGRESS_EVERY_S
                print(
                    f"  {now - origin:5.0f} s: published {tracking.sent}, replied "
                    f"{seen.replies}, in flight {tracking.sent - seen.replies - seen.blocked}",
                    flush=True,
                )
            observer.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(observer.progress.wait(), 0.5)
            if observer.progress.is_set():
                last_progress = time.monotonic()
        cpu.stop()
        sampler.stop()
        if not publishing.done():
            publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publishing
        metrics_after = await asyncio.to_thread(scrape_all, ports)
        # Duplicates arrive late if at all: keep watching a little after the last reply.
        await asyncio.sleep(max(0.0, min(options.grace, deadline - time.monotonic())))
    finally:
        sampler.stop()
        await observer.stop()
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watching

    seen = observer.seen
    t = tracking
    n = len(messages)
    sent = [at for at in t.sent_at if not math.isnan(at)]
    first = min(sent, default=origin)
    last_sent = max(sent, default=first)
    latency, ingest, answer, delivery = [], [], [], []
    last = first
    for i in range(n):
        s, q, r = t.sent_at[i], t.requested_at[i], t.replied_at[i]
        d = t.delivered_at[i]
        if not math.isnan(d):
            last = max(last, d)
            delivery.append((d - s) * 1000)
        if not math.isnan(r):
            last = max(last, r)
            latency.append((r - s) * 1000)
            if not math.isnan(q):
                answer.append((r - q) * 1000)
        if not math.isnan(q):
            ingest.append((q - s) * 1000)
    elapsed = last - first
    replies = seen.replies
    timeline = [0] * (int(elapsed) + 1)
    for at in t.replied_at:
        if not math.isnan(at):
            timeline[int(at - first)] += 1
    series = build_series(t.buckets, sampler.samples)
    workers = [f"worker-{i}" for i in range(options.workers)]
    return PipelineResult(
        messages=n,
        conversations=options.conversations,
        workers=options.workers,
        rate=options.rate,
        duration_s=options.duration,
        via="gateway" if options.via_gateway else "kafka",
        publish_s=last_sent - first,
        elapsed_s=elapsed,
        msgs_per_s=replies / elapsed if elapsed > 0 else 0.0,
        replies=replies,
        missing=n - replies - seen.blocked,
        duplicates=seen.duplicates,
        unmatched=seen.unmatched,
        blocked=seen.blocked,
        latency_ms=Percentiles.of(latency),
        ingest_ms=Percentiles.of(ingest),
        answer_ms=Percentiles.of(answer),
        observer_lag_ms=Percentiles.of(seen.reply_lag_ms),
        delivered=seen.delivered,
        delivered_ms=Percentiles.of(delivery),
        events_seen=seen.events,
        timed_out=timed_out,
        replies_per_second=timeline,
        cpu_s={name: round(used, 2) for name, used in cpu.used.items()},
        others_cpu_s=round(cpu.others, 2),
        load_avg=[round(v, 2) for v in os.getloadavg()],
        timeseries=series,
        soak=soak(series, workers, int(options.warmup)) if options.duration > 0 else None,
        per_worker=worker_figures(
            metrics_before, metrics_after, {w: cpu.used[w] for w in workers if w in cpu.used}
        ),
        samples=[
            (
                _ms_after(first, t.sent_at[i]),
                _ms_after(first, t.requested_at[i]),
                _ms_after(first, t.replied_at[i]),
            )
            for i in range(n)
        ]
        if n <= SAMPLES_CAP
        else [],
    )


# ------------------------------------------------------------------------ report


@dataclass(frozen=True, slots=True)
class BenchResult:
    date: str
    command: str
    machine: Machine
    pipeline: PipelineResult
    baseline: BaselineResult
    confluent: BaselineResult | None
    startup_s: float

    @property
    def ratio(self) -> float:
        return self.pipeline.msgs_per_s / self.baseline.msgs_per_s

    @property
    def others_share(self) -> float:
        """The share of the machine's CPU other processes used during the pipeline run."""
        capacity = self.pipeline.elapsed_s * self.machine.cpus
        return self.pipeline.others_cpu_s / capacity if capacity > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = self.ratio
        out["others_share"] = self.others_share
        return out


def summary(result: BenchResult) -> str:
    p, b, m = result.pipeline, result.baseline, result.machine
    lines = [
        "",
        "kefu pipeline benchmark",
        f"  machine       {m.cpus}× {m.cpu_model}, {m.ram_gib:.1f} GiB RAM",
        f"  software      Python {m.python}, Kafka {m.kafka}, aiokafka {m.aiokafka}, "
        f"faust-streaming {m.faust}",
        f"  command       {result.command}",
        f"  workload      {p.messages} messages over {p.conversations} conversations, "
        f"{p.workers} worker(s), rate "
        + (f"{p.rate:g} msg/s" if p.rate > 0 else "unlimited")
        + (f" for {p.duration_s:g} s" if p.duration_s > 0 else "")
        + f", published via {p.via}",
        "",
        f"  elapsed       {p.elapsed_s:.2f} s (first publish to last reply delivered; publishing "
        f"took {p.publish_s:.2f} s)",
        f"  throughput    {p.msgs_per_s:.0f} msg/s",
        f"  latency       {p.latency_ms.ms()}   (publish to ReplyProduced on the log)",
        f"    ingest      {p.ingest_ms.ms()}   (publish to ReplyRequested)",
        f"    answer      {p.answer_ms.ms()}   (ReplyRequested to ReplyProduced)",
        f"    observer    {p.observer_lag_ms.ms()}   (reply seen minus its record timestamp)",
        f"  delivered     {p.delivered_ms.ms()}   (publish to MessageDelivered on the log: "
        f"{p.delivered} replies)",
        f"  baseline      {b.msgs_per_s:.0f} msg/s  ({b.client}: consume → produce of "
        f"{b.records} records of {b.value_bytes_avg:.0f} B, {b.elapsed_s:.2f} s)",
    ]
    if result.confluent is not None:
        c = result.confluent
        lines.append(f"  baseline      {c.msgs_per_s:.0f} msg/s  ({c.client}, {c.elapsed_s:.2f} s)")
    else:
        lines.append("  baseline      confluent-kafka not installed: no figure")
    lines += [
        f"  ratio         {result.ratio:.3f}  (pipeline / aiokafka baseline"
        + ("; paced run: not a capacity figure)" if p.rate > 0 else ")"),
        f"  replies       {p.replies}/{p.messages}, duplicates {p.duplicates}, "
        f"missing {p.missing}, blocked {p.blocked}, unmatched {p.unmatched}"
        + ("   TIMED OUT" if p.timed_out else ""),
        f"  events seen   {p.events_seen} on the events topic; stack startup "
        f"{result.startup_s:.1f} s",
        f"  load average  {p.load_avg[0]:.2f} {p.load_avg[1]:.2f} {p.load_avg[2]:.2f} "
        f"(1/5/15 min, at the end; {m.cpus} = every core busy)",
    ]
    if len(p.replies_per_second) <= 60:
        lines.append("  replies/s     " + " ".join(str(n) for n in p.replies_per_second))
    lines += [
        f"  CPU seconds   first publish to last reply ({p.elapsed_s:.1f} s wall, "
        f"{m.cpus} CPUs = {p.elapsed_s * m.cpus:.1f} CPU-s available):",
    ]
    for name, used in sorted(p.cpu_s.items(), key=lambda kv: -kv[1]):
        share = used / p.elapsed_s * 100 if p.elapsed_s > 0 else 0.0
        lines.append(f"    {name:<14}{used:7.2f}  ({share:.0f}% of one CPU)")
    lines.append(
        f"    {'other procs':<14}{p.others_cpu_s:7.2f}  (everything else on the machine: "
        f"{result.others_share * 100:.0f}% of its capacity)"
    )
    lines += figures_lines(p.per_worker, p.replies, p.elapsed_s, p.msgs_per_s)
    if p.timeseries:
        workers = [f.name for f in p.per_worker] or ["worker-0"]
        every = max(1, math.ceil(len(p.timeseries) / 40))
        lines.append(f"  per second    (every {every} s; RSS at the end of the second)")
        lines.append(series_table(p.timeseries, workers, every))
    if p.soak is not None:
        verdict = "FLAT" if p.soak.flat else "NOT FLAT"
        lines.append(
            f"  soak          worker RSS {verdict} (after the warm-up vs the last seconds)"
        )
        lines += p.soak.lines()
    elif p.duration_s > 0:
        lines.append("  soak          too short to compare RSS after the warm-up with the end")
    lines.append("")
    return "\n".join(lines)


_RESULTS_HEADER = """\
# Benchmark results

Recorded by `bench/pipeline.py --record`; one row per run, newest last. Reproduce with

    .venv/bin/python bench/pipeline.py --record

(options: `--messages`, `--conversations`, `--workers`, `--rate`, `--duration`,
`--warmup`, `--via-gateway`, `--json PATH` (also writes PATH.svg), `--keep-logs DIR`,
`--timeout`), or the standard set with `kefu bench`. Every run starts its own embedded
stack (Kafka, Redis, ClickHouse projector, the workers, gateway, webhook sink) on free
ports in a temporary state dir, so it never touches a running demo, and removes it
afterwards.

What the figures mean:

- **msg/s**: pipeline throughput: messages answered divided by the time from the first
  customer command published to the last `ReplyProduced` event seen on the events
  topic. Commands go straight to the commands topic (the pipeline, not HTTP) unless
  the command says `--via-gateway`.
- **p50 / p90 / p99 / max**: per message, the time from publishing its
  `ReceiveMessage` command to its `ReplyProduced` event appearing on the events topic
  (matched through `ReplyRequested`), in ms. With `--rate 0` all messages are
  published at once, so latency includes queueing behind the whole batch: it is a
  throughput run. Use `--rate` for latency at a given load.
- **baseline msg/s**: in the same run, on the same broker: an aiokafka consumer reads
  N pre-produced records of the same size and produces each to another topic (acks=all,
  Faust's producer defaults), timed from the first record consumed to the last produce
  acknowledged. **ratio** = pipeline / baseline: the share of raw Kafka throughput the
  pipeline keeps (only for `--rate 0`; a paced run shows `paced`). With the default
  N = 2000 the baseline lasts ~0.1 s, so it varies by ±20 % between runs;
  `--baseline-records` makes it longer. The baseline runs before the workers start.
- **dup / missing**: replies produced twice for one request, and messages with no
  reply. Both must be 0.
- **others %**: the share of the machine's CPU that processes outside this run used
  while it ran. Anything but ~0 means a shared, busy machine: the row is skewed.

Timing is never a test assertion; these rows are for comparing changes on one machine.

"""
_COLUMNS = [
    "date",
    "machine",
    "command",
    "messages",
    "conv.",
    "workers",
    "elapsed_s",
    "msg/s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "baseline_msg/s",
    "ratio",
    "dup",
    "missing",
    "others_%",
]
_RESULTS_HEADER += "| " + " | ".join(c.replace("_", " ") for c in _COLUMNS) + " |\n"
_RESULTS_HEADER += "|---|---|---|" + "---:|" * (len(_COLUMNS) - 3) + "\n"


def record(result: BenchResult, path: Path = RESULTS) -> None:
    p = result.pipeline
    row = [
        result.date,
        result.machine.short(),
        f"`{result.command}`",
        str(p.messages),
        str(p.conversations),
        str(p.workers),
        f"{p.elapsed_s:.2f}",
        f"{p.msgs_per_s:.0f}",
        f"{p.latency_ms.p50:.0f}",
        f"{p.latency_ms.p90:.0f}",
        f"{p.latency_ms.p99:.0f}",
        f"{p.latency_ms.max:.0f}",
        f"{result.baseline.msgs_per_s:.0f}",
        f"{result.ratio:.3f}" if p.rate == 0 else "paced",
        str(p.duplicates),
        str(p.missing),
        f"{result.others_share * 100:.0f}",
    ]
    text = path.read_text("utf-8") if path.exists() else _RESULTS_HEADER
    path.write_text(insert_row(text, "| " + " | ".join(row) + " |"), "utf-8")


def insert_row(text: str, line: str) -> str:
    """Add ``line`` at the end of the pipeline table (the first table of the file):
    other benchmarks keep their own sections after it."""
    lines = text.splitlines()
    header = next((i for i, row in enumerate(lines) if row.startswith("| date |")), None)
    if header is None:
        return text.rstrip("\n") + "\n" + line + "\n"
    end = header + 1
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join([*lines[:end], line, *lines[end:]]) + "\n"


# ------------------------------------------------------------------------ main


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=2000, help="customer messages (N)")
    parser.add_argument("--conversations", type=int, default=200, help="conversations (M)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="messages/s to publish at; 0 = as fast as possible"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="seconds to publish for at --rate (a soak): --messages becomes rate × duration",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=DEFAULT_WARMUP_S,
        help="with --duration: worker RSS 'at start' is read this many seconds in "
        "(at most half the duration)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds; the run stops by itself after (default 300, or duration + 300)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the result here as JSON")
    parser.add_argument("--record", action="store_true", help="append a row to bench/RESULTS.md")
    parser.add_argument(
        "--via-gateway", action="store_true", help="POST to the REST API instead of Kafka"
    )
    parser.add_argument(
        "--baseline-records",
        type=int,
        default=0,
        help=f"records for the Kafka baseline; 0 = as many as --messages, at most {BASELINE_CAP}",
    )
    parser.add_argument(
        "--keep-logs",
        type=Path,
        default=None,
        metavar="DIR",
        help="copy the stack's logs (workers, Kafka, ...) here before the state dir goes",
    )
    parser.add_argument(
        "--grace", type=float, default=DEFAULT_GRACE, help="seconds to watch for duplicates"
    )
    parser.add_argument(
        "--until-replied",
        action="store_true",
        help="end the window at the last reply on the log, not the last reply delivered",
    )
    parser.add_argument(
        "--linger-ms",
        type=float,
        default=None,
        help="the workers' producer linger (default: the settings' worker.linger_ms)",
    )
    parser.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a worker setting for this run (e.g. fetch_min_bytes=4096); repeatable",
    )
    parser.add_argument(
        "--no-inline-answers",
        dest="inline_answers",
        action="store_false",
        help="send every reply request through the responder agent (worker.inline_answers)",
    )
    parser.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default=None,
        help="the workers' and gateway's event loop (default: the settings' defaults)",
    )
    parser.add_argument(
        "--kafka-jvm",
        action="append",
        default=None,
        metavar="FLAG",
        help="a JVM flag for the broker instead of the settings' kafka.jvm_options "
        "(repeatable; e.g. --kafka-jvm=-XX:TieredStopAtLevel=1)",
    )
    args = parser.parse_args(argv)
    if args.duration < 0:
        parser.error("--duration must be positive")
    if args.duration > 0:
        if args.rate <= 0:
            parser.error("--duration needs --rate (messages per second to publish at)")
        args.messages = max(1, math.ceil(args.rate * args.duration))
        args.conversations = min(args.conversations, args.messages)
        args.warmup = max(0.0, min(args.warmup, args.duration / 2))
    if args.timeout is None:
        args.timeout = 300.0 + args.duration
    if args.messages < 1 or args.conversations < 1 or args.workers < 1:
        parser.error("--messages, --conversations and --workers must be at least 1")
    if args.conversations > args.messages:
        parser.error("--conversations cannot exceed --messages")
    if args.workers > args.conversations:
        parser.error("--workers cannot exceed --conversations")
    return args


def _command(argv: Sequence[str]) -> str:
    """The command line that reproduces the figures (output paths left out)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--json", "--keep-logs"):
            skip = True
        elif not arg.startswith(("--json=", "--keep-logs=")):
            kept.append(arg)
    return " ".join([".venv/bin/python bench/pipeline.py", *kept])


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwind through the finally: the stack goes down


def _measure(
    settings: Settings, args: argparse.Namespace, deadline: float
) -> tuple[PipelineResult, BaselineResult, BaselineResult | None, float]:
    run = uuid.uuid4().hex[:8]
    messages = workload(args.messages, args.conversations, run)
    # Baseline records: the same commands, encoded as the pipeline's are.
    baseline_records = args.baseline_records or min(args.messages, BASELINE_CAP)
    records = [
        (m.conversation_id.encode(), CODEC.encode(m.command()))
        for m in workload(baseline_records, args.conversations, f"{run}-baseline")
    ]
    print("baseline: aiokafka consume → produce ...", flush=True)
    baseline = asyncio.run(aiokafka_baseline(settings, records, deadline))
    confluent = confluent_baseline(settings, records, deadline)
    # The workers start after the baseline, so it runs on an otherwise idle machine.
    print(f"starting {args.workers} worker(s), the gateway and the webhook sink ...", flush=True)
    started = time.monotonic()
    services = Services(settings, workers=args.workers)
    services.start(services.app_services())
    startup = time.monotonic() - started
    pace = f" at {args.rate:g} msg/s" if args.rate > 0 else ""
    print(
        f"  ready after {startup:.1f} s; publishing {len(messages)} messages{pace} ...", flush=True
    )
    cpu = CpuMeter(stack_pids(settings, args.workers))
    options = RunOptions(
        conversations=args.conversations,
        workers=args.workers,
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        via_gateway=args.via_gateway,
        grace=args.grace,
        until_delivered=not args.until_replied,
        deadline=deadline,
    )
    pipeline = asyncio.run(run_pipeline(settings, messages, options, cpu))
    return pipeline, baseline, confluent, startup


def _keep_logs(state_dir: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for log in state_dir.glob("*/*.log"):  # logs/*.log, kafka/server.log, redis/...
        shutil.copy2(log, target / log.name)
    print(f"logs copied to {target}")


def _watchdog(seconds: float) -> threading.Timer:
    """Last resort if something blocks past the deadline: SIGTERM ourselves, which
    unwinds through the finally that stops the stack."""
    timer = threading.Timer(seconds, os.kill, args=(os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    return timer


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _parse(raw)
    signal.signal(signal.SIGTERM, _on_sigterm)
    begin = time.monotonic()
    deadline = begin + args.timeout
    watchdog = _watchdog(args.timeout + 120.0)
    state_dir = Path(tempfile.mkdtemp(prefix="kefu-bench-"))
    settings = bench_settings(
        state_dir,
        args.workers,
        args.event_loop,
        args.kafka_jvm,
        args.linger_ms,
        args.inline_answers,
        args.worker,
    )
    try:
        print(f"kefu bench: private stack in {state_dir}", flush=True)
        stack_start = time.monotonic()
        stack_up_all(settings)
        stack_s = time.monotonic() - stack_start
        print(f"  stack ready after {stack_s:.1f} s", flush=True)
        pipeline, baseline, confluent, startup = _measure(settings, args, deadline)
    finally:
        print("stopping the stack ...", flush=True)
        try:
            stack_down_all(settings)
            if args.keep_logs is not None:
                _keep_logs(state_dir, args.keep_logs)
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)
            watchdog.cancel()
    result = BenchResult(
        date=date.today().isoformat(),
        command=_command(raw),
        machine=machine(settings),
        pipeline=pipeline,
        baseline=baseline,
        confluent=confluent,
        startup_s=stack_s + startup,
    )
    print(summary(result))
    if args.json is not None:
        data = result.to_json()
        args.json.write_text(json.dumps(data, indent=2) + "\n", "utf-8")
        print(f"wrote {args.json}")
        print(f"wrote {plot_result(data, args.json.with_suffix('.svg'))}")
    if args.record:
        record(result)
        print(f"recorded in {RESULTS}")
    ok = pipeline.duplicates == 0 and pipeline.missing == 0 and not pipeline.timed_out
    ok = ok and (pipeline.soak is None or pipeline.soak.flat)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
