"""Routing on the real stack: agents, the waiting line, assignment as capacity frees
up, re-queueing when an agent goes offline, handoff, idle close, SLA breaches, and
two workers sharing the queues without over-assigning."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
import redis
import websockets

from connectors.identity import conversation_id_for
from kefu.services import Services
from kefu.settings import Settings
from projections.clickhouse_query import AnalyticsClient
from projections.clickhouse_views import render
from schemas.codec import CODEC
from schemas.keys import conversation_key
from schemas.records import (
    AgentAssigned,
    ConversationClosed,
    ConversationHandedOff,
    ConversationQueued,
    CsatRated,
    CsatRequested,
    Event,
    QueueEvent,
    SlaBreached,
)
from schemas.time import now_ms
from schemas.topics import TopicNames
from streams.queueing import Queue, evolve_queue
from tests.conftest import wait_for
from tests.kafka_helpers import read_events, read_topic
from tests.test_metrics import families
from tests.test_pipeline import gateway

E = TypeVar("E", bound=Event)


def key(settings: Settings, tenant: str) -> dict[str, str]:
    return {"X-Api-Key": settings.tenants[tenant].api_key.get_secret_value()}


def post(
    settings: Settings, tenant: str, path: str, body: dict[str, Any], method: str = "POST"
) -> None:
    if path.startswith("/v1/conversations/"):
        # The API answers 404 for conversations the read model has not seen yet.
        conversation = path.split("/")[3]
        client = redis.Redis.from_url(settings.redis.dsn)
        wait_for(
            lambda: client.exists(conversation_key(tenant, conversation)),
            what=f"{conversation} in the read model",
        )
    with gateway(settings) as http:
        response = http.request(method, path, json=body, headers=key(settings, tenant))
    assert response.status_code == 202, response.text


def message(settings: Settings, tenant: str, customer: str, text: str = "hello") -> str:
    post(settings, tenant, "/v1/messages", {"customer_id": customer, "text": text})
    return conversation_id_for(tenant, "api", customer)


def presence(settings: Settings, tenant: str, agent: str, state: str, capacity: int = 2) -> None:
    post(
        settings,
        tenant,
        f"/v1/agents/{agent}/presence",
        {"presence": state, "capacity": capacity},
        "PUT",
    )


def queue_log(settings: Settings, queue: str) -> list[QueueEvent]:
    topic = TopicNames(settings.topic_prefix).queue_events
    found = []
    for record in asyncio.run(read_topic(settings, topic)):
        for event in CODEC.decode_all(record):  # one event, or a commit's
            assert isinstance(event, QueueEvent)
            if event.queue == queue:
                found.append(event)
    return sorted(found, key=lambda e: e.seq)


def queue_state(settings: Settings, queue: str) -> Queue:
    state = Queue()
    for event in queue_log(settings, queue):
        state = evolve_queue(state, event)
    return state


def queue_when(
    settings: Settings,
    queue: str,
    condition: Callable[[Queue], bool],
    what: str,
    timeout: float = 30,
) -> Queue:
    def probe() -> Queue | None:
        state = queue_state(settings, queue)
        return state if condition(state) else None

    return wait_for(probe, timeout=timeout, what=what)


def events_of(settings: Settings, conversation: str, kind: type[E]) -> list[E]:
    return [e for e in conversation_log(settings, conversation) if isinstance(e, kind)]


def conversation_log(settings: Settings, conversation: str) -> list[Event]:
    topic = TopicNames(settings.topic_prefix).events
    found = []
    for event in asyncio.run(read_events(settings, topic)):  # commits unpacked
        if isinstance(event, Event) and event.conversation_id == conversation:
            found.append(event)
    return sorted(found, key=lambda e: e.seq)


def test_three_agents_ten_conversations_priority_then_age(pipeline: Settings) -> None:
    queue = "hq:default"
    for agent in ("ana", "bo", "cy"):
        presence(pipeline, "hq", agent, "online", capacity=2)
    wait_for(lambda: len(queue_state(pipeline, queue).agents) == 3, what="3 agents online")

    first = [message(pipeline, "hq", f"early-{i}") for i in range(6)]
    wait_for(lambda: len(queue_state(pipeline, queue).assigned) == 6, what="6 assigned")
    # Four more: they wait, VIP first, then by age.
    late = []
    for customer in ("late-normal-1", "late-normal-2", "vip-customer", "late-normal-3"):
        late.append(message(pipeline, "hq", customer))
    state = queue_when(pipeline, queue, lambda s: len(s.waiting) == 4, "4 waiting")
    assert {len(a.conversations) for a in state.agents.values()} == {2}
    assert set(state.assigned) == set(first)
    vip = conversation_id_for("hq", "api", "vip-customer")
    assert [w.conversation_id for w in state.waiting] == [vip, late[0], late[1], late[3]]
    # The customers were told their place in line.
    queued = wait_for(
        lambda: events_of(pipeline, late[3], ConversationQueued), what="position reported"
    )
    assert queued[-1].position >= 1

    # An agent closes one: the head of the line is assigned to them at once.
    closing = first[0]
    agent = state.assigned[closing][0]
    post(pipeline, "hq", f"/v1/conversations/{closing}/close", {"closed_by": agent})
    state = queue_when(pipeline, queue, lambda s: vip in s.assigned, "VIP assigned")
    assert state.assigned[vip][0] == agent
    assert [w.conversation_id for w in state.waiting] == [late[0], late[1], late[3]]

    # The customer rates the closed conversation.
    wait_for(lambda: events_of(pipeline, closing, CsatRequested), what="rating requested")
    post(pipeline, "hq", f"/v1/conversations/{closing}/rating", {"rating": 4})
    rated = wait_for(lambda: events_of(pipeline, closing, CsatRated), what="rating")
    assert rated[0].rating == 4 and rated[0].assignee == agent

    # An agent goes offline: their conversations go back in line, ahead of the rest,
    # and the others keep theirs.
    leaving = "bo"
    held = set(state.agents[leaving].conversations)
    presence(pipeline, "hq", leaving, "offline")
    # The router writes the presence change and the re-queueing as one batch, but a
    # reader can catch the log between them: wait for the whole batch.
    state = queue_when(
        pipeline,
        queue,
        lambda s: (
            s.agents[leaving].presence == "offline"
            and held <= {w.conversation_id for w in s.waiting}
        ),
        "bo offline and their conversations back in line",
    )
    assert not state.agents[leaving].conversations
    assert [w.conversation_id for w in state.waiting][:2] == sorted(
        held, key=lambda c: next(w.order for w in state.waiting if w.conversation_id == c)
    )
    assert all(len(a.conversations) <= a.capacity for a in state.agents.values())


def test_handoff_when_the_customer_asks_for_a_human(pipeline: Settings) -> None:
    who = f"cust-{uuid.uuid4().hex[:8]}"
    conversation = message(pipeline, "demo", who, "I want to talk to a human agent")
    handoff = wait_for(
        lambda: events_of(pipeline, conversation, ConversationHandedOff), what="handoff"
    )
    assert handoff[0].from_assignee == "ai" and handoff[0].to_assignee == ""
    state = queue_when(
        pipeline, "demo:default", lambda s: s.position(conversation) > 0, "in the demo queue"
    )
    assert state.position(conversation) >= 1


def test_idle_close_and_sla_breach(pipeline: Settings) -> None:
    conversation = message(pipeline, "timers", f"idle-{uuid.uuid4().hex[:8]}")
    breach = wait_for(lambda: events_of(pipeline, conversation, SlaBreached), what="SLA breach")
    assert breach[0].kind == "first" and len(breach) == 1
    # It shows in the analysts' SLA report (the dashboard and Grafana run the same SQL).
    client = AnalyticsClient(pipeline.clickhouse_url, pipeline.clickhouse.query_port)
    sql = render("sla-breaches", "kefu", "timers", 0, now_ms() + 60_000)
    rows = wait_for(lambda: client.query(sql).rows, what="SLA report row")
    assert rows[0][0] == "first" and rows[0][2] >= 1
    closed = wait_for(
        lambda: events_of(pipeline, conversation, ConversationClosed), what="idle close"
    )
    assert closed[0].reason == "idle" and closed[0].closed_by == "system"
    assert len(events_of(pipeline, conversation, SlaBreached)) == 1


def worker_health(pipeline: Settings, index: int = 0) -> dict[str, Any]:
    port = pipeline.worker.web_port + index
    try:
        reply = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    except httpx.HTTPError:
        return {"status": "down"}
    health: dict[str, Any] = reply.json()
    return health


def worker_lag(pipeline: Settings, index: int = 0) -> float | None:
    """Records of kefu's topics the worker has not processed and committed yet (None
    while its /metrics does not answer or has no partition of them)."""
    url = f"http://127.0.0.1:{pipeline.worker.web_port + index}/metrics"
    try:
        lag = families(url).get("kefu_consumer_lag")
    except (httpx.HTTPError, AssertionError):
        return None
    prefix = f"{pipeline.topic_prefix}."
    ours = [s.value for s in lag.samples if s.labels["topic"].startswith(prefix)] if lag else []
    return sum(ours) if ours else None


@contextlib.contextmanager
def second_worker(pipeline: Settings) -> Iterator[None]:
    """Worker-1 in the group for the block. After it, worker-0 owns every partition
    again, is ready, and has processed and committed what the rebalance made it read
    again: a later test that resets state or counts on a quick answer does not race
    with those redeliveries."""
    alone = wait_for(lambda: (h := worker_health(pipeline))["status"] == "ok" and h)
    services = Services(pipeline, workers=2)
    second = services.worker(1)
    services.start([second])
    try:
        yield
    finally:
        services.stop([second])
        wait_for(
            lambda: worker_health(pipeline) == alone and worker_lag(pipeline) == 0,
            timeout=120,
            what=f"worker-0 alone again ({alone}) with no lag",
        )


def test_two_workers_never_over_assign(pipeline: Settings) -> None:
    with second_worker(pipeline):
        queue = "hq2:default"
        for agent in ("a1", "a2", "a3"):
            presence(pipeline, "hq2", agent, "online", capacity=2)
        conversations = [message(pipeline, "hq2", f"two-{i}") for i in range(12)]
        # Capacity churn while the line is long: one agent leaves and comes back.
        presence(pipeline, "hq2", "a2", "offline")
        presence(pipeline, "hq2", "a2", "online", capacity=1)
        for closing in conversations[:3]:
            post(pipeline, "hq2", f"/v1/conversations/{closing}/close", {"closed_by": "test"})
        last: list[Queue] = []

        def settled() -> bool:
            last[:] = [queue_state(pipeline, queue)]
            return len(last[0].assigned) == 5 and len(last[0].waiting) == 4

        try:
            # Generous: a second worker joining means a rebalance and table recovery.
            wait_for(settled, timeout=150, what="5 assigned (capacity 2+1+2), 4 waiting")
        except AssertionError:
            state = last[0]
            agents = {
                a.agent_id: (a.presence, a.capacity, len(a.conversations))
                for a in state.agents.values()
            }
            raise AssertionError(
                f"assigned={len(state.assigned)} waiting={len(state.waiting)} agents={agents} "
                f"seq={state.seq}"
            ) from None
    # Replay the queue's history: no assignment ever went above capacity, and no
    # conversation was held by two agents at once.
    state = Queue()
    for event in queue_log(pipeline, "hq2:default"):
        if isinstance(event, AgentAssigned):
            taker = state.agents[event.agent_id]
            assert len(taker.conversations) < taker.capacity
            assert event.conversation_id not in state.assigned
        state = evolve_queue(state, event)
    seqs = [e.seq for e in queue_log(pipeline, "hq2:default")]
    assert seqs == list(range(1, len(seqs) + 1)), "one writer per queue: no gaps, no forks"


def test_a_worker_leaving_at_once_does_not_hang_the_other_in_recovery(
    pipeline: Settings,
) -> None:
    """(streams/recovery.py; here, after the other two-worker test, so that tests of
    other modules never run in the wake of its rebalances.) Worker-0 reads the
    changelog partitions it hands over as a standby while a second
    worker is in the group; when that one leaves at once, worker-0 recovers them as
    active from their beginning. Faust's fetch loop dropped those records (below its
    read mark) and worker-0 never finished recovering (a clean-clone CI run)."""
    # Something in both tables' changelogs, on every partition.
    for i in range(12):
        message(pipeline, "rec", f"recovery-{i}")
    with second_worker(pipeline):
        pass  # leaves as soon as it is ready


def test_waiting_web_customer_is_told_their_place_in_line(pipeline: Settings) -> None:
    async def chat() -> dict[str, Any]:
        g = pipeline.gateway
        who = f"web-{uuid.uuid4().hex[:8]}"
        url = f"ws://{g.host}:{g.port}/v1/chat/ws?tenant=acme&customer={who}"
        async with websockets.connect(url) as socket:
            await socket.recv()  # history
            await socket.send(json.dumps({"type": "message", "id": "q1", "text": "hello?"}))
            while True:
                frame: dict[str, Any] = json.loads(await asyncio.wait_for(socket.recv(), 30))
                if frame["type"] == "queue":
                    return frame

    frame = asyncio.run(chat())
    assert frame["position"] >= 1


def test_agent_transfers_to_a_named_colleague(pipeline: Settings) -> None:
    queue = "hq3:default"
    presence(pipeline, "hq3", "kim", "online", capacity=1)
    conversation = message(pipeline, "hq3", "transfer-me")
    queue_when(pipeline, queue, lambda s: conversation in s.assigned, "assigned to kim")
    presence(pipeline, "hq3", "lee", "online", capacity=1)
    post(
        pipeline,
        "hq3",
        f"/v1/conversations/{conversation}/handoff",
        {"to": "human", "agent": "lee", "requested_by": "kim", "reason": "billing expert"},
    )
    state = queue_when(
        pipeline,
        queue,
        lambda s: s.assigned.get(conversation, ("",))[0] == "lee",
        "transferred to lee",
    )
    assert not state.agents["kim"].conversations
