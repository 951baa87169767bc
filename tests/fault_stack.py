"""A private stack to break on purpose, customers to drive it, and the checks that
nothing was lost or duplicated (tests/test_faults.py, bench/faults.py).

The stack is kefu's real one (Kafka, Redis, the ClickHouse projector on chdb, two
workers, gateway, webhook sink) on free ports in a state dir of its own, so killing a
piece never touches another test's pipeline. Customers talk in *waves*: each wave
sends one message to every conversation through the REST API (retried with the same
message id until it is accepted, as a client does) and waits for every reply at the
webhook sink; a fault is injected while a wave is in flight. Everything waits on
conditions (replies, counts), never on sleeps.

What counts as correct, checked by :func:`verify`:

- the customer side: every message has exactly one reply at the tenant's webhook
  (distinct reply ids, one per message), in the order the messages were sent;
- the log: each conversation's seqs run 1..n without a gap, a seq redelivered after
  a crash carries the same event id (events derive from commands), messages appear in
  the order they were sent, each with one reply;
- Redis: the conversation hash counts n messages, n replies, n deliveries at the
  log's last seq, and the recent-messages list alternates customer / AI with no twin;
- ClickHouse: ``FINAL`` holds exactly seqs 1..n per conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import SecretStr

from kefu.cli import stack_down_all, stack_up_all
from kefu.data_keys import install_for, uninstall_for
from kefu.local import private_settings
from kefu.processes import Daemon, wait_until
from kefu.services import Service, Services
from kefu.settings import (
    AIModelSettings,
    AISettings,
    ReliabilitySettings,
    Settings,
    TenantSettings,
)
from kefu.stack import Stack
from projections.clickhouse_query import AnalyticsClient
from schemas.codec import CODEC, DecodeError
from schemas.keys import conversation_key, messages_key
from schemas.records import (
    ConversationHandedOff,
    DeadLetter,
    Event,
    MessageReceived,
    Record,
    ReplyProduced,
    ReplyRequested,
)
from schemas.topics import TopicNames

TENANT = "faults"
API_KEY = "faults-test-key"
WEBHOOK_SECRET = "faults-webhook-secret"


def fault_settings(
    state_dir: Path,
    llm_base_url: str = "",
    *,
    exactly_once: bool = False,
    log_level: str = "INFO",
) -> Settings:
    """Two workers; group timeouts short enough that a dead member leaves in seconds
    (the broker's floor is 6 s); the AI on a fake model endpoint if one is given."""
    base = private_settings(state_dir, workers=2)
    sink = f"http://127.0.0.1:{base.dev.webhook_sink_port}/webhook"
    ai = AISettings()
    if llm_base_url:
        model: dict[str, Any] = {
            "base_url": llm_base_url,
            "first_token_timeout": 0.5,
            "timeout": 2.0,
        }
        ai = AISettings(
            models={"fault-model": AIModelSettings(**model)},
            breaker_failures=3,
            breaker_reset_seconds=1.0,
            # Every test message must reach the broken model, not an earlier answer.
            cache_enabled=False,
            backoff_seconds=0.01,
            first_token_budget_seconds=0.8,
            # Under load the per-tenant LLM budget would answer from the FAQ instead.
            rate_per_second=1000.0,
            rate_burst=1000.0,
        )
    return base.model_copy(
        update={
            "clickhouse": base.clickhouse.model_copy(update={"batch_seconds": 0.2}),
            "tenants": {
                TENANT: TenantSettings(
                    api_key=SecretStr(API_KEY),
                    webhook_url=sink,
                    webhook_secret=SecretStr(WEBHOOK_SECRET),
                )
            },
            "ai": ai,
            "reliability": ReliabilitySettings(
                session_timeout_s=6.0,
                heartbeat_interval_s=1.0,
                rebalance_timeout_s=10.0,
                processing_guarantee="exactly_once" if exactly_once else "at_least_once",
            ),
            "log_level": log_level,
        }
    )


def faq_questions() -> list[str]:
    """Questions the AI answers from its FAQ (asking for a person would hand off)."""
    from streams.responders import HUMAN_INTENT

    text = (resources.files("streams") / "knowledge" / "faq.json").read_text("utf-8")
    return [
        q for item in json.loads(text) if item["intent"] != HUMAN_INTENT for q in item["questions"]
    ]


# ----------------------------------------------------------------------- the stack


class FaultStack:
    """The private stack and the faults it can suffer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services = Services(settings, workers=2)
        self.stack = Stack(settings)
        self.names = TopicNames(settings.topic_prefix)

    def up(self) -> float:
        started = time.monotonic()
        stack_up_all(self.settings)
        # This process reads the stack's events: their sealed fields open with its keys.
        install_for(self.settings)
        self.services.start(self.services.app_services(), timeout=180.0)
        return time.monotonic() - started

    def down(self) -> None:
        uninstall_for(self.settings)
        stack_down_all(self.settings)

    def log_dir(self) -> Path:
        return self.settings.state_dir.absolute() / "logs"

    # -- workers

    def worker(self, index: int) -> Service:
        return self.services.worker(index)

    def kill_worker(self, index: int) -> int:
        """SIGKILL a worker (its whole process group): no shutdown, no commit."""
        daemon = self.worker(index).daemon
        pid = daemon.pid()
        assert pid is not None, f"worker-{index} is not running"
        os.killpg(pid, signal.SIGKILL)
        wait_until(lambda: not daemon.is_running(), timeout=10.0, what=f"worker-{index} gone")
        daemon.pid_path.unlink(missing_ok=True)
        return pid

    def start_worker(self, index: int) -> float:
        return self.services.start([self.worker(index)], timeout=120.0)[f"worker-{index}"]

    # -- Kafka, Redis, ClickHouse

    def restart_kafka(self) -> None:
        self.stack.kafka_daemon.stop(timeout=60.0)
        self.stack.up(timeout=120.0)

    def restart_redis(self) -> None:
        self.stack.redis_daemon.stop(timeout=30.0)
        self.stack.up(timeout=60.0)

    def flush_redis(self) -> None:
        client = redis.Redis.from_url(self.settings.redis.dsn)
        try:
            client.flushall()
        finally:
            client.close()

    def clickhouse(self) -> Service:
        return self.services.clickhouse()

    def kill_clickhouse(self) -> None:
        """The chdb owner and projector gone at once (SIGKILL): no query endpoint, no
        inserts, uncommitted offsets."""
        daemon = self.clickhouse().daemon
        pid = daemon.pid()
        assert pid is not None, "the ClickHouse projector is not running"
        os.killpg(pid, signal.SIGKILL)
        wait_until(lambda: not daemon.is_running(), timeout=10.0, what="projector gone")
        daemon.pid_path.unlink(missing_ok=True)

    def start_clickhouse(self) -> None:
        self.services.start([self.clickhouse()], timeout=120.0)

    # -- the whole machine

    def daemons(self) -> list[Daemon]:
        """Every process of the stack: Kafka's nodes, Redis, the ClickHouse projector,
        the webhook sink, the workers, the gateway, the SMTP listener."""
        app = [service.daemon for service in self.services.app_services()]
        return [
            *self.stack.kafka_daemons,
            self.stack.redis_daemon,
            self.clickhouse().daemon,
            *app,
        ]

    def crash(self) -> list[str]:
        """SIGKILL every process of the stack at once (each process group: no
        shutdown, no flush, no commit), as a machine that loses power, then wait
        until all are gone. Returns the names of what was running."""
        running = [(d, pid) for d in self.daemons() if (pid := d.pid()) is not None]
        for _, pid in running:  # the pids first, then the signals back to back
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        for daemon, pid in running:
            wait_until(_gone(daemon), timeout=30.0, what=f"{daemon.name} gone")
            # Its command line goes before its sockets do: wait until it has exited.
            wait_until(_exited(daemon, pid), timeout=30.0, what=f"{daemon.name} exited")
            daemon.pid_path.unlink(missing_ok=True)
        return [daemon.name for daemon, _ in running]

    def redis_data(self) -> Path:
        """Redis's append-only files (``appendonlydir``)."""
        return self.stack.redis_dir / "appendonlydir"

    def copy_redis_data(self, to: Path) -> None:
        """A copy of Redis's append-only files as they are now (Redis running: the
        copy may end inside a command, which Redis drops when it loads it)."""
        shutil.rmtree(to, ignore_errors=True)
        shutil.copytree(self.redis_data(), to)

    def restore_redis_data(self, copy: Path) -> None:
        """Redis stopped: its append-only files replaced by an older ``copy``, as if
        it had lost every write since (``appendfsync everysec`` loses up to a second)."""
        assert not self.stack.redis_daemon.is_running(), "stop Redis first"
        shutil.rmtree(self.redis_data())
        shutil.copytree(copy, self.redis_data())

    # -- reading what landed

    def analytics(self, sql: str) -> list[list[Any]]:
        client = AnalyticsClient(self.settings.clickhouse_url, self.settings.clickhouse.query_port)
        return client.query(sql).rows

    def sink(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.settings.dev.webhook_sink_port}/received"
        body: dict[str, Any] = httpx.get(url, timeout=10.0).json()
        return body


def _gone(daemon: Daemon) -> Callable[[], bool]:
    return lambda: not daemon.is_running()


def _exited(daemon: Daemon, pid: int) -> Callable[[], bool]:
    """``pid`` gone, or a zombie with none of its threads left: its files, so its
    ports, are closed by then (a multithreaded process's leader can be a zombie while
    its other threads still hold them)."""

    def check() -> bool:
        daemon.is_running()  # collects the exit status of a child of ours
        proc = Path(f"/proc/{pid}")
        try:
            stat = (proc / "stat").read_text()
            threads = len(list((proc / "task").iterdir()))
        except OSError:
            return True
        zombie = stat[stat.rfind(")") + 2 :].startswith(("Z", "X"))
        return zombie and threads <= 1

    return check


# ------------------------------------------------------------------- the customers


@dataclass(frozen=True, slots=True)
class Sent:
    conversation_id: str
    customer_id: str
    message_id: str
    wave: int


@dataclass(slots=True)
class WaveResult:
    wave: int
    messages: int
    seconds: float
    fault_at: float | None = None  # seconds into the wave
    # After the fault: first reply, and every reply outstanding at the fault, in.
    progress_s: float | None = None
    caught_up_s: float | None = None
    fault_seconds: float = 0.0  # how long the fault action itself took
    post_retries: int = 0


@dataclass(slots=True)
class Customers:
    """``conversations`` customers of one tenant on the REST API, replies read from
    the webhook sink. A run id keeps conversations apart across tests."""

    settings: Settings
    conversations: int
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    texts: list[str] = field(default_factory=faq_questions)
    sent: list[Sent] = field(default_factory=list)
    waves: int = 0
    post_retries: int = 0
    # (customer id, message id) -> monotonic time of its 202: what the API promised.
    acked: dict[tuple[str, str], float] = field(default_factory=dict)

    def customer(self, index: int) -> str:
        return f"f-{self.run}-c{index}"

    def conversation_ids(self) -> list[str]:
        from connectors.identity import conversation_id_for

        return [
            conversation_id_for(TENANT, "api", self.customer(i)) for i in range(self.conversations)
        ]

    def text(self, index: int, wave: int) -> str:
        # A different question each turn: the same text thrice is spam by design.
        return self.texts[(index * 7 + wave) % len(self.texts)]

    def _client(self) -> httpx.AsyncClient:
        g = self.settings.gateway
        return httpx.AsyncClient(
            base_url=f"http://{g.host}:{g.port}",
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=httpx.Timeout(10.0),
            limits=httpx.Limits(max_connections=32),
        )

    async def _post(self, http: httpx.AsyncClient, body: dict[str, str]) -> None:
        """Until accepted (202): a resend with the same message id is not a second
        message, so retrying through an outage is safe."""
        delay = 0.05
        for _ in range(2000):
            with contextlib.suppress(httpx.HTTPError):
                response = await http.post("/v1/messages", json=body)
                if response.status_code == 202:
                    key = (body["customer_id"], body["message_id"])
                    self.acked.setdefault(key, time.monotonic())
                    return
                assert response.status_code >= 500 or response.status_code == 429, (
                    response.status_code,
                    response.text,
                )
            self.post_retries += 1
            await asyncio.sleep(delay)  # a client's backoff, not a test waiting
            delay = min(delay * 2, 1.0)
        raise AssertionError(f"message {body['message_id']} never accepted")

    async def replies(self, http: httpx.AsyncClient) -> dict[str, list[dict[str, Any]]]:
        url = f"http://127.0.0.1:{self.settings.dev.webhook_sink_port}/received"
        received = (await http.get(url)).json()["received"]
        mine = set(self.conversation_ids())
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for reply in received:
            if reply["conversation_id"] in mine:
                out[reply["conversation_id"]].append(reply)
        return out

    async def wave(
        self,
        fault: Callable[[], None] | None = None,
        at: float = 0.3,
        limit_s: float = 120.0,
        texts: Sequence[str] | None = None,
    ) -> WaveResult:
        """Send one message to every conversation; run ``fault`` (in a thread) once
        ``at`` of the wave's replies are in; wait for all of them."""
        wave = self.waves
        self.waves += 1
        expected = wave + 1  # replies per conversation once this wave is done
        ids = self.conversation_ids()
        started = time.monotonic()
        result = WaveResult(wave=wave, messages=len(ids), seconds=0.0)
        retries_before = self.post_retries
        async with self._client() as http:

            async def send(index: int) -> None:
                message_id = f"w{wave}"
                self.sent.append(Sent(ids[index], self.customer(index), message_id, wave))
                text = texts[index % len(texts)] if texts else self.text(index, wave)
                body = {"customer_id": self.customer(index), "text": text, "message_id": message_id}
                await self._post(http, body)

            sending = asyncio.gather(*(send(i) for i in range(len(ids))))
            fault_task: asyncio.Future[None] | None = None
            fault_started = 0.0
            outstanding: set[str] = set()
            deadline = started + limit_s
            got: dict[str, list[dict[str, Any]]] = {}
            while True:
                # The sink itself may be down (a whole-machine crash): ask again.
                with contextlib.suppress(httpx.HTTPError):
                    got = await self.replies(http)
                done = {c for c in ids if len(got.get(c, [])) >= expected}
                now = time.monotonic()
                if fault is not None and fault_task is None and len(done) >= at * len(ids):
                    fault_started = now
                    result.fault_at = now - started
                    outstanding = set(ids) - done
                    fault_task = asyncio.ensure_future(asyncio.to_thread(fault))
                if fault_task is not None and outstanding:
                    if result.progress_s is None and outstanding & done:
                        result.progress_s = now - fault_started
                    if outstanding <= done and result.caught_up_s is None:
                        result.caught_up_s = now - fault_started
                if fault_task is not None and fault_task.done() and not result.fault_seconds:
                    fault_task.result()  # raise what the fault raised
                    result.fault_seconds = time.monotonic() - fault_started
                all_in = len(done) == len(ids)
                if all_in and (fault_task is None or fault_task.done()) and sending.done():
                    break
                if now > deadline:
                    missing = sorted(set(ids) - done)
                    sending.cancel()
                    raise AssertionError(
                        f"wave {wave}: {len(missing)} of {len(ids)} replies missing after "
                        f"{limit_s:.0f} s (e.g. {missing[:3]})"
                    )
                await asyncio.sleep(0.1)  # polling interval of the condition
            await sending
            if fault_task is not None:
                await fault_task
                if result.caught_up_s is None and outstanding:
                    result.caught_up_s = time.monotonic() - fault_started
                if not outstanding:
                    result.caught_up_s = result.progress_s = 0.0
        result.seconds = time.monotonic() - started
        result.post_retries = self.post_retries - retries_before
        return result


# ----------------------------------------------------------------- the log, checks


async def read_log(settings: Settings, topics: Sequence[str]) -> list[tuple[str, int, int, bytes]]:
    """Every committed record of ``topics`` now: (topic, partition, offset, value).
    Committed: with Faust's exactly-once mode, aborted transactions stay in the log."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.servers,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        parts = [
            TopicPartition(t, p) for t in topics for p in sorted(cluster.partitions_for_topic(t))
        ]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        out: list[tuple[str, int, int, bytes]] = []
        pending = {tp for tp in parts if ends[tp] > 0}
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=1000)
            for tp, records in batch.items():
                out.extend((tp.topic, tp.partition, r.offset, r.value or b"") for r in records)
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
        return out
    finally:
        await consumer.stop()


def decode_events(raw: Sequence[tuple[str, int, int, bytes]], tenant: str = TENANT) -> list[Event]:
    out: list[Event] = []
    for _topic, _partition, _offset, value in raw:
        try:
            records = CODEC.decode_all(value)  # one event, or a commit's events
        except DecodeError:
            continue
        out += [r for r in records if isinstance(r, Event) and r.tenant_id == tenant]
    return out


async def dead_letters(settings: Settings) -> list[DeadLetter]:
    names = TopicNames(settings.topic_prefix)
    raw = await read_log(settings, [names.deadletter])
    return [r for r in (CODEC.decode(v) for *_, v in raw) if isinstance(r, DeadLetter)]


async def produce(settings: Settings, topic: str, items: Sequence[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.servers, acks="all", max_request_size=4 << 20
    )
    await producer.start()
    try:
        for key, value in items:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def encode(record: Record) -> bytes:
    return CODEC.encode(record)


@dataclass(slots=True)
class Report:
    messages: int = 0
    delivered: int = 0  # distinct replies at the webhook
    redelivered: int = 0  # the same reply (idempotency key) POSTed again
    duplicate_replies: int = 0  # two different replies to one message
    log_duplicates: int = 0  # event copies on the log (dropped by every consumer)
    problems: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return not self.problems


def _by_conversation(events: Sequence[Event]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        out[e.conversation_id].append(e)
    return out


def check_log(events: Sequence[Event], customers: Customers, report: Report) -> dict[str, int]:
    """Per conversation: seqs 1..n, one event id per seq, messages in sending order,
    one reply each. Returns the last seq per conversation."""
    sent: dict[str, list[str]] = defaultdict(list)
    for s in customers.sent:
        sent[s.conversation_id].append(s.message_id)
    last: dict[str, int] = {}
    grouped = _by_conversation(events)
    for conversation in customers.conversation_ids():
        copies = grouped.get(conversation, [])
        by_seq: dict[int, set[str]] = defaultdict(set)
        for e in copies:
            by_seq[e.seq].add(e.event_id)
        report.log_duplicates += len(copies) - len(by_seq)
        for seq, ids in by_seq.items():
            if len(ids) > 1:
                report.problems.append(f"{conversation}: seq {seq} has {len(ids)} different events")
        n = max(by_seq, default=0)
        last[conversation] = n
        if sorted(by_seq) != list(range(1, n + 1)):
            report.problems.append(f"{conversation}: seqs are not 1..{n}")
        ordered = {e.seq: e for e in copies}
        history = [ordered[s] for s in sorted(ordered)]
        received = [e for e in history if isinstance(e, MessageReceived)]
        if [e.channel_message_id for e in received] != sent[conversation]:
            report.problems.append(
                f"{conversation}: messages on the log {[e.channel_message_id for e in received]}"
                f" != sent {sent[conversation]}"
            )
        requested = {e.event_id: e for e in history if isinstance(e, ReplyRequested)}
        answered = [
            requested[e.in_reply_to].message_event_id
            for e in history
            if isinstance(e, ReplyProduced) and e.in_reply_to in requested
        ]
        if answered != [e.event_id for e in received]:
            report.problems.append(
                f"{conversation}: {len(answered)} replies on the log for "
                f"{len(received)} messages, or out of order"
            )
    return last


def check_customer_side(
    replies: dict[str, list[dict[str, Any]]], customers: Customers, report: Report
) -> None:
    per_conversation = Counter(s.conversation_id for s in customers.sent)
    for conversation, expected in per_conversation.items():
        got = replies.get(conversation, [])
        report.delivered += len(got)
        answered = Counter(r["in_reply_to"] for r in got)
        twins = sum(n - 1 for n in answered.values())
        report.duplicate_replies += twins
        if len(got) != expected or twins:
            report.problems.append(
                f"{conversation}: {len(got)} replies at the webhook for {expected} messages"
                f" ({twins} duplicates)"
            )


def redis_view(
    settings: Settings, conversation: str
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    client = redis.Redis.from_url(settings.redis.dsn, decode_responses=True)
    try:
        state: dict[str, str] = client.hgetall(conversation_key(TENANT, conversation))  # type: ignore[assignment]
        raw: list[str] = client.lrange(messages_key(TENANT, conversation), 0, -1)  # type: ignore[assignment]
    finally:
        client.close()
    return state, [json.loads(m) for m in raw]


def check_redis(
    settings: Settings, customers: Customers, last: dict[str, int], report: Report
) -> None:
    per_conversation = Counter(s.conversation_id for s in customers.sent)
    for conversation, n in per_conversation.items():
        state, recent = redis_view(settings, conversation)
        want = {"seq": str(last[conversation]), "messages": str(n), "replies": str(n)}
        got = {k: state.get(k, "") for k in want}
        if got != want or state.get("deliveries") != str(n):
            report.problems.append(
                f"{conversation}: Redis {got} deliveries={state.get('deliveries')}, "
                f"log {want} deliveries={n}"
            )
        roles = [m["role"] for m in recent]
        ids = [m["id"] for m in recent]
        if roles != ["customer", "ai"] * (len(roles) // 2) or len(set(ids)) != len(ids):
            report.problems.append(f"{conversation}: Redis recent messages {roles}")


def redis_settled(settings: Settings, customers: Customers) -> bool:
    """Every reply's delivery is projected (the last events of each turn)."""
    per_conversation = Counter(s.conversation_id for s in customers.sent)
    for conversation, n in per_conversation.items():
        state, _ = redis_view(settings, conversation)
        if state.get("deliveries") != str(n):
            return False
    return True


def clickhouse_counts(stack: FaultStack) -> dict[str, tuple[int, int, int, int]]:
    """Per conversation of the tenant: FINAL rows, distinct seqs, min and max seq."""
    rows = stack.analytics(
        "SELECT conversation_id, count(), uniqExact(seq), min(seq), max(seq) "
        f"FROM kefu.events FINAL WHERE tenant_id = '{TENANT}' "
        "GROUP BY conversation_id"
    )
    return {str(r[0]): (int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows}


def clickhouse_matches(stack: FaultStack, last: dict[str, int]) -> bool:
    try:
        counts = clickhouse_counts(stack)
    except Exception:
        return False
    return all(counts.get(c) == (n, n, 1, n) for c, n in last.items())


def verify(stack: FaultStack, customers: Customers, timeout: float = 90.0) -> Report:
    """Wait until the read models settle, then compare customer side, log, Redis and
    ClickHouse (see the module docstring). Never raises for a mismatch: the report
    lists them."""
    report = Report(messages=len(customers.sent))
    settings = stack.settings
    with contextlib.suppress(Exception):
        wait_until(
            lambda: redis_settled(settings, customers), timeout=timeout, what="Redis settled"
        )
    raw = asyncio.run(read_log(settings, [stack.names.events]))
    events = decode_events(raw)
    last = check_log(events, customers, report)
    sink = stack.sink()
    mine = set(customers.conversation_ids())
    replies: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in sink["received"]:
        if r["conversation_id"] in mine:
            replies[r["conversation_id"]].append(r)
    report.redelivered = int(sink.get("duplicates", 0))
    check_customer_side(replies, customers, report)
    check_redis(settings, customers, last, report)
    with contextlib.suppress(Exception):
        wait_until(lambda: clickhouse_matches(stack, last), timeout=timeout, what="ClickHouse")
    counts = clickhouse_counts(stack)
    for conversation, n in last.items():
        if counts.get(conversation) != (n, n, 1, n):
            report.problems.append(
                f"{conversation}: ClickHouse FINAL (rows, seqs, min, max) = "
                f"{counts.get(conversation)}, log 1..{n}"
            )
    return report


def handoffs(events: Sequence[Event]) -> set[str]:
    return {e.conversation_id for e in events if isinstance(e, ConversationHandedOff)}
