"""A whole-machine crash, simulated (issue 19): every process of a private stack
(Kafka, Redis, the ClickHouse projector, both workers, the gateway, the webhook sink,
the SMTP listener) SIGKILLed at once mid-wave, and everything started again.

Redis's worst case is made certain rather than left to timing: ``appendfsync
everysec`` loses up to a second of writes on a crash, so before the restart Redis's
append-only files are replaced by a copy taken before the last wave. Its epoch marker
survives (the copy has it), so the flush rebuild does not fire; the conversations'
hashes are behind the log while the workers' offsets are not. kefu must see that
(each partition's recorded position is behind the reader's committed offset: the
worker logs "behind the log") and fold the lost events back from the log
(``projections/redis_rebuild.py`` ``catch_up``) instead of letting the seq guards
hide the gap.

Then every message acknowledged with 202 before the crash is answered exactly once
after it, and log, Redis and ClickHouse agree (``tests/fault_stack.py`` ``verify``).
The figures (acknowledged before the crash, answered after, duplicates, seconds to
recover) are printed for bench/RESULTS.md "Whole-machine crash, issue 19".
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from aiokafka import AIOKafkaConsumer, TopicPartition

from kefu.processes import wait_until
from schemas.keys import conversation_key
from tests.fault_stack import (
    TENANT,
    Customers,
    FaultStack,
    Report,
    WaveResult,
    decode_events,
    fault_settings,
    read_log,
    redis_settled,
    verify,
)
from tests.test_faults import assert_clean

CONVERSATIONS = 40


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    """A stack of this module's own; its webhook sink keeps what it received in a file,
    as a tenant's endpoint would, so the crash does not erase the replies before it."""
    settings = fault_settings(tmp_path_factory.mktemp("kefu-machine-crash"))
    journal = str(settings.state_dir.absolute() / "webhook-sink.jsonl")
    dev = settings.dev.model_copy(update={"webhook_sink_journal": journal})
    stack = FaultStack(settings.model_copy(update={"dev": dev}))
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


@dataclass(slots=True)
class Crash:
    """What the fault saw: when it struck, what ran, how far behind Redis came back."""

    at: float = 0.0  # monotonic
    killed: list[str] = field(default_factory=list)
    replies_before: dict[str, int] = field(default_factory=dict)  # per conversation
    behind: int = 0  # conversations whose Redis seq came back below the log's
    log_seqs: dict[str, int] = field(default_factory=dict)
    restart_s: float = 0.0


def replies_per_conversation(stack: FaultStack, customers: Customers) -> dict[str, int]:
    mine = set(customers.conversation_ids())
    received = stack.sink()["received"]
    return dict(Counter(r["conversation_id"] for r in received if r["conversation_id"] in mine))


def redis_seqs(stack: FaultStack, conversations: list[str]) -> dict[str, int]:
    client = redis.Redis.from_url(stack.settings.redis.dsn, decode_responses=True)
    try:
        return {c: int(client.hget(conversation_key(TENANT, c), "seq") or 0) for c in conversations}
    finally:
        client.close()


def last_seqs(stack: FaultStack) -> dict[str, int]:
    events = decode_events(asyncio.run(read_log(stack.settings, [stack.names.events])))
    out: dict[str, int] = {}
    for e in events:
        out[e.conversation_id] = max(out.get(e.conversation_id, 0), e.seq)
    return out


def whole_machine_crash(
    stack: FaultStack, customers: Customers, redis_copy: Path, crash: Crash
) -> None:
    """The fault, once the wave's messages are all acknowledged (the workers are
    frozen: the messages wait on the log, unanswered): what the sink had, then SIGKILL
    everything, Redis's newest writes lost, and everything up again (Kafka, Redis,
    topics, projector; then the workers, gateway, sink)."""
    wanted = len(customers.sent)
    wait_until(lambda: len(customers.acked) >= wanted, timeout=60.0, what="202s")
    crash.replies_before = replies_per_conversation(stack, customers)
    crash.at = time.monotonic()
    crash.killed = stack.crash()
    stack.restore_redis_data(redis_copy)
    started = time.monotonic()
    from kefu.cli import stack_up_all

    stack_up_all(stack.settings)  # Kafka, Redis (from the old copy), topics, projector
    # Before any worker runs: the read model is behind the log, its marker present.
    crash.log_seqs = last_seqs(stack)
    ids = customers.conversation_ids()
    back = redis_seqs(stack, ids)
    crash.behind = sum(1 for c in ids if back[c] < crash.log_seqs.get(c, 0))
    stack.services.start(stack.services.app_services(), timeout=180.0)
    crash.restart_s = time.monotonic() - started


def reader_committed_all(stack: FaultStack) -> bool:
    """The workers' events readers have committed every record of their topics."""

    async def check() -> bool:
        group = f"{stack.settings.app_id}-events"
        consumer = AIOKafkaConsumer(
            bootstrap_servers=stack.settings.kafka.servers,
            group_id=group,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            cluster = await consumer._client.fetch_all_metadata()
            topics = (stack.names.events, stack.names.queue_events)
            tps = [
                TopicPartition(t, p) for t in topics for p in cluster.partitions_for_topic(t) or ()
            ]
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                if ends[tp] and (await consumer.committed(tp) or 0) < ends[tp]:
                    return False
            return True
        finally:
            await consumer.stop()

    return asyncio.run(check())


def this_start(log: Path) -> str:
    """A daemon's log since its last start (each start writes a header)."""
    text = log.read_text(errors="replace")
    return text[text.rfind("--- kefu: starting") :]


def test_whole_machine_crash(machine: FaultStack, tmp_path: Path) -> None:
    customers = Customers(machine.settings, CONVERSATIONS)
    asyncio.run(customers.wave())
    wait_until(lambda: redis_settled(machine.settings, customers), timeout=60.0, what="Redis")
    redis_copy = tmp_path / "redis-before-the-last-wave"
    machine.copy_redis_data(redis_copy)  # what Redis will come back with
    asyncio.run(customers.wave())

    # The readers' offsets past what the copy holds: Redis will come back behind them.
    wait_until(lambda: reader_committed_all(machine), timeout=60.0, what="offsets committed")
    # The crash must find work in flight, and answers take milliseconds: the workers
    # are frozen (SIGSTOP) as the last wave starts, so the gateway acknowledges every
    # message and each waits on the log, unanswered. SIGKILL takes them as they are.
    for index in (0, 1):
        frozen = machine.worker(index).daemon.pid()
        assert frozen is not None
        os.killpg(frozen, signal.SIGSTOP)
    crash = Crash()
    wave = asyncio.run(
        customers.wave(
            lambda: whole_machine_crash(machine, customers, redis_copy, crash),
            at=0.0,
            limit_s=300.0,
        )
    )
    every = {"kafka", "redis", "clickhouse", "worker-0", "worker-1", "gateway", "webhook-sink"}
    assert every <= set(crash.killed), crash.killed
    # The worst case held: Redis came back without the last waves' events.
    assert crash.behind == CONVERSATIONS, crash.behind

    report = verify(machine, customers, timeout=120.0)
    assert_clean(report)  # Redis equals the log again: the gap was found and folded

    # kefu saw the model behind the log and folded the lost events from it.
    logs = [this_start(machine.log_dir() / f"worker-{i}.log") for i in (0, 1)]
    assert any("behind the log" in text for text in logs), "no worker caught Redis up"
    assert not any("rebuilding it from the log" in text for text in logs)  # marker kept

    first = figures(customers, crash, wave, report)
    print(f"\nwhole-machine crash, workers frozen: {first}")
    assert first["acked_before_unanswered_at_crash"] == CONVERSATIONS, first  # work in flight

    # Again with the workers running: the crash lands inside their batches (sends,
    # Redis writes, commits in flight), 30 % into the wave's replies; Redis loses
    # every write of the wave again.
    machine.copy_redis_data(redis_copy)
    again = Crash()
    wave = asyncio.run(
        customers.wave(
            lambda: whole_machine_crash(machine, customers, redis_copy, again),
            at=0.3,
            limit_s=300.0,
        )
    )
    report = verify(machine, customers, timeout=120.0)
    assert_clean(report)
    second = figures(customers, again, wave, report)
    print(f"whole-machine crash, workers running: {second}")


def figures(customers: Customers, crash: Crash, wave: WaveResult, report: Report) -> dict[str, Any]:
    """bench/RESULTS.md "Whole-machine crash, issue 19": the promises made before the
    crash (202s), the ones still unanswered when it struck, and how they ended."""
    ids = customers.conversation_ids()
    customer_of = {customers.customer(i): ids[i] for i in range(len(ids))}
    acked_before: Counter[str] = Counter()
    acked_after = 0
    for (customer, _message), at in customers.acked.items():
        if at < crash.at:
            acked_before[customer_of[customer]] += 1
        else:
            acked_after += 1
    unanswered_at_crash = sum(
        max(0, n - crash.replies_before.get(c, 0)) for c, n in acked_before.items()
    )
    return {
        "messages": report.messages,
        "acked_before_crash": sum(acked_before.values()),
        "acked_before_unanswered_at_crash": unanswered_at_crash,
        "answered_after_crash": unanswered_at_crash,  # verify: every message, once
        "acked_after_crash": acked_after,
        "delivered": report.delivered,
        "duplicate_replies": report.duplicate_replies,
        "webhook_redelivered_same_key": report.redelivered,
        "log_duplicate_events": report.log_duplicates,
        "conversations_behind_in_redis": crash.behind,
        "killed": sorted(crash.killed),
        "fault_at_s": round(wave.fault_at or 0.0, 2),
        "restart_s": round(crash.restart_s, 1),
        "first_reply_after_crash_s": round(wave.progress_s or 0.0, 1),
        "all_outstanding_answered_s": round(wave.caught_up_s or 0.0, 1),
        "post_retries": wave.post_retries,
    }
