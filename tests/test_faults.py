"""Faults survived, on a private real stack (tests/fault_stack.py): workers SIGKILLed,
the broker restarted, Redis restarted and flushed, ClickHouse gone for a while, the
model endpoint down / slow / talking garbage, poison in every topic. Each test checks
that no message was lost and none duplicated (at the customer's webhook, on the log,
in Redis and in ClickHouse) and that each conversation stayed in order."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest
import redis

from kefu.processes import wait_until
from projections.redis_rebuild import EPOCH_KEY
from schemas.records import (
    AgentAssigned,
    MessageReceived,
    ReceiveMessage,
    ReplyProduced,
    RequestAssignment,
    WordListChanged,
)
from schemas.time import now_ms
from streams.inbox import MAX_RECORD_BYTES
from tests.fake_openai import FakeOpenAI
from tests.fault_stack import (
    Customers,
    FaultStack,
    Report,
    Sent,
    WaveResult,
    dead_letters,
    decode_events,
    encode,
    fault_settings,
    handoffs,
    produce,
    read_log,
    redis_view,
    verify,
)
from tests.samples import SAMPLES

CONVERSATIONS = 40


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeOpenAI) -> Iterator[FaultStack]:
    """A stack of this module's own: its tests kill its parts."""
    settings = fault_settings(tmp_path_factory.mktemp("kefu-faults"), fake_llm.base_url)
    stack = FaultStack(settings)
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


def assert_clean(report: Report) -> None:
    assert report.ok(), "\n".join(report.problems[:20])
    assert report.delivered == report.messages
    assert report.duplicate_replies == 0


def test_worker_sigkilled_five_times_while_traffic_flows(faults: FaultStack) -> None:
    """Two workers; one is SIGKILLed (no shutdown, no commit) while a wave is in
    flight and started again, five times, alternating; the group rebalances and
    every message gets exactly one reply."""
    customers = Customers(faults.settings, CONVERSATIONS)
    asyncio.run(customers.wave())
    for round_ in range(5):
        index = round_ % 2

        def kill_and_restart(index: int = index) -> None:
            faults.kill_worker(index)
            faults.start_worker(index)

        result: WaveResult = asyncio.run(customers.wave(kill_and_restart, at=0.3))
        assert result.caught_up_s is not None
    asyncio.run(customers.wave())
    assert_clean(verify(faults, customers))


def test_kafka_restarted_mid_stream(faults: FaultStack) -> None:
    customers = Customers(faults.settings, CONVERSATIONS)
    asyncio.run(customers.wave())
    asyncio.run(customers.wave(faults.restart_kafka, at=0.3))
    asyncio.run(customers.wave())
    assert_clean(verify(faults, customers))


def _epoch(faults: FaultStack) -> bytes | None:
    client = redis.Redis.from_url(faults.settings.redis.dsn)
    try:
        value: bytes | None = client.get(EPOCH_KEY)  # type: ignore[assignment]
        return value
    finally:
        client.close()


def test_redis_restarted_and_flushed_comes_back_from_the_log(faults: FaultStack) -> None:
    customers = Customers(faults.settings, CONVERSATIONS)
    asyncio.run(customers.wave())
    asyncio.run(customers.wave(faults.restart_redis, at=0.3))
    before = wait_until(lambda: _epoch(faults) is not None, timeout=30, what="epoch")
    assert before >= 0
    epoch = _epoch(faults)
    asyncio.run(customers.wave(faults.flush_redis, at=0.3))
    asyncio.run(customers.wave())
    # A rebuild ran (a new epoch), and every conversation is whole again: its earlier
    # turns came back from the log, not only the turns after the flush.
    assert _epoch(faults) not in (None, epoch)
    assert_clean(verify(faults, customers))


def test_clickhouse_unavailable_then_catches_up(faults: FaultStack) -> None:
    customers = Customers(faults.settings, CONVERSATIONS)
    asyncio.run(customers.wave())
    asyncio.run(customers.wave(faults.kill_clickhouse, at=0.3))
    asyncio.run(customers.wave())  # replies do not need ClickHouse
    faults.start_clickhouse()
    assert_clean(verify(faults, customers))


# The model answers these (no FAQ intent is confident about them).
LLM_TEXTS = [
    "Could you write me a short poem about purple giraffes number {i}?",
    "What would a medieval knight think of quantum computers, case {i}?",
    "Tell me a joke about penguins and spreadsheets, version {i}.",
    "Describe the smell of rain on a volcano for story {i}.",
]


def _model_attempts(faults: FaultStack) -> float:
    """Model calls the workers made or their breakers refused (``kefu_llm_calls_total``
    on each worker's /metrics; a worker that does not answer counts nothing)."""
    total = 0.0
    for index in range(2):
        port = faults.settings.worker.web_port + index
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            continue
        for line in text.splitlines():
            if line.startswith("kefu_llm_calls_total{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def _llm_outcomes(faults: FaultStack, customers: Customers) -> dict[str, tuple[int, int]]:
    """Per conversation: (replies, handoffs) in Redis."""
    out = {}
    for conversation in customers.conversation_ids():
        state, _ = redis_view(faults.settings, conversation)
        out[conversation] = (int(state.get("replies", 0)), int(state.get("handoffs", 0)))
    return out


@pytest.mark.parametrize("mode", ["down", "slow", "garbage", "fail"])
def test_llm_endpoint_faults_under_load(
    faults: FaultStack, fake_llm: FakeOpenAI, mode: str
) -> None:
    """Each message, in a conversation of its own, gets exactly one reply or a
    handoff to a person while the model endpoint is broken; none is lost."""
    fake_llm.reset()
    port = fake_llm.port
    if mode == "down":
        fake_llm.stop()
    elif mode == "slow":
        fake_llm.delay = 1.5  # past the first-token budget
    else:
        fake_llm.mode = mode
    customers = Customers(faults.settings, CONVERSATIONS)
    texts = [t.format(i=i) for i in range(CONVERSATIONS) for t in LLM_TEXTS][:CONVERSATIONS]
    attempts = _model_attempts(faults)

    async def send() -> None:
        async with customers._client() as http:
            await asyncio.gather(
                *(
                    customers._post(
                        http,
                        {"customer_id": customers.customer(i), "text": texts[i], "message_id": "q"},
                    )
                    for i in range(CONVERSATIONS)
                )
            )

    try:
        asyncio.run(send())
        for i, conversation in enumerate(customers.conversation_ids()):
            customers.sent.append(Sent(conversation, customers.customer(i), "q", 0))

        def settled() -> bool:
            return all(r + h >= 1 for r, h in _llm_outcomes(faults, customers).values())

        wait_until(settled, timeout=90, what=f"a reply or handoff for every message ({mode})")
        # The messages did take the model path: calls reached the endpoint, or the
        # breaker (still open from the previous mode if they all came within its
        # reset time) refused them, which the workers count.
        assert mode == "down" or fake_llm.chat_calls() or _model_attempts(faults) > attempts
    finally:
        if mode == "down":
            fake_llm.start(port)
        fake_llm.reset()
    events = decode_events(asyncio.run(read_log(faults.settings, [faults.names.events])))
    mine = set(customers.conversation_ids())
    # On the log a reply may be there twice (a redelivery): count distinct ids.
    distinct = {
        (e.conversation_id, e.event_id)
        for e in events
        if isinstance(e, ReplyProduced) and e.conversation_id in mine
    }
    per_conversation = Counter(c for c, _ in distinct)
    handed = handoffs(events) & mine
    received = {e.conversation_id for e in events if isinstance(e, MessageReceived)} & mine
    assert received == mine
    for conversation in mine:
        assert per_conversation[conversation] <= 1, conversation
        assert per_conversation[conversation] == 1 or conversation in handed, conversation
    sink = faults.sink()
    at_webhook = Counter(
        r["conversation_id"] for r in sink["received"] if r["conversation_id"] in mine
    )
    assert all(n <= 1 for n in at_webhook.values())
    assert sum(at_webhook.values()) == sum(per_conversation.values())


def _poison(faults: FaultStack) -> dict[str, list[bytes]]:
    """For each consumed topic: undecodable bytes, a valid record of the wrong
    schema, and a valid record of the right schema that is too big."""
    names = faults.names
    huge = "x" * (MAX_RECORD_BYTES + 64 * 1024)
    by_type = {type(r).__name__: r for r in SAMPLES}
    command = by_type["ReceiveMessage"]
    event = by_type["MessageReceived"]
    assert isinstance(command, ReceiveMessage) and isinstance(event, MessageReceived)
    request = by_type["RequestAssignment"]
    assert isinstance(request, RequestAssignment)
    assigned = by_type["AgentAssigned"]
    assert isinstance(assigned, AgentAssigned)
    garbage = b"\x00not avro at all\xff"
    words = WordListChanged(
        tenant_id="poison",
        category="spam",
        action="flag",
        words=[huge],
        version=now_ms(),
        changed_at=now_ms(),
    )
    return {
        names.commands: [
            garbage,
            encode(event),
            encode(replace(command, tenant_id="poison", text=huge)),
        ],
        names.events: [
            garbage,
            encode(command),
            encode(replace(event, tenant_id="poison", text=huge)),
        ],
        names.routing: [garbage, encode(event), encode(replace(request, preferred_agent=huge))],
        names.queue_events: [garbage, encode(command), encode(replace(assigned, agent_id=huge))],
        names.control: [garbage, encode(command), encode(words)],
    }


def test_poison_in_every_topic_is_dead_lettered_and_the_stream_goes_on(
    faults: FaultStack,
) -> None:
    customers = Customers(faults.settings, CONVERSATIONS)
    asyncio.run(customers.wave())
    before = asyncio.run(read_log(faults.settings, list(_poison(faults))))
    ends = Counter(topic for topic, *_ in before)
    poison = _poison(faults)
    for topic, values in poison.items():
        key = b"poison/spam" if topic == faults.names.control else b"poison-key"
        asyncio.run(produce(faults.settings, topic, [(key, v) for v in values]))
    # Later messages are still answered, on every partition.
    asyncio.run(customers.wave())
    asyncio.run(customers.wave())
    assert_clean(verify(faults, customers))

    after = asyncio.run(read_log(faults.settings, list(poison)))
    old = {(t, p, o) for t, p, o, _ in before}
    injected = {(t, p, o) for t, p, o, v in after if v in poison[t] and (t, p, o) not in old}
    assert len(injected) == sum(len(v) for v in poison.values()), ends

    def all_dead_lettered() -> bool:
        letters = asyncio.run(dead_letters(faults.settings))
        seen = {(d.source_topic, d.partition, d.offset) for d in letters}
        return injected <= seen

    with contextlib.suppress(Exception):
        wait_until(all_dead_lettered, timeout=30, what="dead letters", interval=0.5)
    letters = asyncio.run(dead_letters(faults.settings))
    by_position: dict[tuple[str, int, int], list[str]] = {}
    for d in letters:
        by_position.setdefault((d.source_topic, d.partition, d.offset), []).append(d.reason)
    missing = sorted(injected - set(by_position))
    assert not missing, f"not dead-lettered: {missing}"
    reasons = " | ".join(r for rs in by_position.values() for r in rs)
    assert "byte limit" in reasons and "expected" in reasons
