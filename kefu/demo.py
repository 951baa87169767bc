"""``make demo``: start the embedded stack, a worker and the gateway, drive scripted
conversations over REST and the web chat WebSocket, and print what happened at every
stage: replies, the Redis read model, and ClickHouse analytics."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import click
import httpx
import redis.asyncio as aioredis
import websockets
from aiokafka import AIOKafkaConsumer, TopicPartition

from connectors.identity import conversation_id_for
from kefu.cli import format_table, stack_down_all, stack_up_all
from kefu.processes import ProcessError
from kefu.services import Services
from kefu.settings import Settings
from projections.clickhouse_query import AnalyticsClient
from schemas.keys import conversation_key
from schemas.topics import TopicNames

TENANT = "demo"


@dataclass
class Script:
    channel: str  # api | web
    customer: str
    messages: list[str]
    resend_first: bool = False  # a client retry of message 1: must not duplicate


SCRIPTS = [
    Script("api", "alice", ["Hello", "Where is my order?"]),
    Script("api", "bob", ["我要退款", "退款多久到账？"]),
    Script("api", "carol", ["I forgot my password, you stupid bot"]),
    Script("api", "dave", ["Can I pay with PayPal?"], resend_first=True),
    Script("web", "erin", ["When will it arrive?", "Can I cancel my order?"]),
    Script("web", "frank", ["你好", "可以用支付宝吗"]),
]


@dataclass
class Turn:
    text: str
    reply: str = ""
    intent: str | None = None
    latency_ms: float = 0.0


@dataclass
class Outcome:
    script: Script
    conversation_id: str
    turns: list[Turn] = field(default_factory=list)


def _demo_settings(settings: Settings) -> Settings:
    """Point the demo tenant's webhook at the local sink unless one is configured."""
    tenant = settings.tenants.get(TENANT)
    if tenant is None or tenant.webhook_url:
        return settings
    url = f"http://127.0.0.1:{settings.dev.webhook_sink_port}/webhook"
    tenants = {**settings.tenants, TENANT: tenant.model_copy(update={"webhook_url": url})}
    return settings.model_copy(update={"tenants": tenants})


async def _log_size(settings: Settings) -> int:
    topic = TopicNames(settings.topic_prefix).events
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.servers, **settings.kafka.client_options()
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            from streams import faust_private  # imports Faust: only when it is needed

            partitions = await faust_private.topic_partitions(consumer, topic)
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return sum(ends.values())
    finally:
        await consumer.stop()


async def _rest_conversation(
    http: httpx.AsyncClient, settings: Settings, script: Script, run: str
) -> Outcome:
    api_key = settings.tenants[TENANT].api_key.get_secret_value()
    customer = f"{script.customer}-{run}"
    outcome = Outcome(script, conversation_id_for(TENANT, "api", customer))
    sink = f"http://127.0.0.1:{settings.dev.webhook_sink_port}/received"
    for i, text in enumerate(script.messages):
        body = {"customer_id": customer, "text": text, "message_id": f"{customer}-m{i}"}
        started = time.monotonic()
        sends = 2 if script.resend_first and i == 0 else 1
        for _ in range(sends):
            response = await http.post(
                "/v1/messages", json=body, headers={"Authorization": f"Bearer {api_key}"}
            )
            response.raise_for_status()
        turn = Turn(text)
        while time.monotonic() - started < 60:
            received = (await http.get(sink)).json()["received"]
            mine = [r for r in received if r["conversation_id"] == outcome.conversation_id]
            if len(mine) > i:
                turn.reply, turn.intent = mine[i]["text"], mine[i]["intent"]
                break
            await asyncio.sleep(0.05)
        turn.latency_ms = (time.monotonic() - started) * 1000
        outcome.turns.append(turn)
    return outcome


async def _web_conversation(settings: Settings, script: Script, run: str) -> Outcome:
    g = settings.gateway
    customer = f"{script.customer}-{run}"
    url = f"ws://{g.host}:{g.port}/v1/chat/ws?tenant={TENANT}&customer={customer}"
    outcome = Outcome(script, conversation_id_for(TENANT, "web", customer))
    async with websockets.connect(url) as socket:
        await socket.recv()  # history
        for text in script.messages:
            started = time.monotonic()
            await socket.send(
                json.dumps({"type": "message", "id": str(uuid.uuid4()), "text": text})
            )
            turn = Turn(text)
            while True:
                frame = json.loads(await asyncio.wait_for(socket.recv(), 60))
                if frame["type"] == "reply":
                    turn.reply, turn.intent = frame["text"], frame["intent"]
                    break
            turn.latency_ms = (time.monotonic() - started) * 1000
            outcome.turns.append(turn)
    return outcome


async def _drive(settings: Settings, run: str) -> list[Outcome]:
    g = settings.gateway
    async with httpx.AsyncClient(base_url=f"http://{g.host}:{g.port}", timeout=30) as http:
        jobs = [
            _rest_conversation(http, settings, s, run)
            if s.channel == "api"
            else _web_conversation(settings, s, run)
            for s in SCRIPTS
        ]
        return list(await asyncio.gather(*jobs))


async def _human_handoff(settings: Settings, run: str) -> list[str]:
    """A customer asks for a person: the AI hands off, the router assigns the online
    agent, the agent answers and closes, the customer rates. Returns what happened."""
    g = settings.gateway
    agent, customer = f"ana-{run}", f"grace-{run}"
    conversation = conversation_id_for(TENANT, "api", customer)
    headers = {"X-Api-Key": settings.tenants[TENANT].api_key.get_secret_value()}
    sink = f"http://127.0.0.1:{settings.dev.webhook_sink_port}/received"
    redis = aioredis.Redis.from_url(settings.redis.dsn, decode_responses=True)
    lines: list[str] = []
    started = time.monotonic()

    async def until(what: str, check: Any) -> None:
        deadline = time.monotonic() + 60
        while not await check():
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            await asyncio.sleep(0.05)
        lines.append(f"  {time.monotonic() - started:5.2f} s  {what}")

    async def replies() -> list[dict[str, Any]]:
        received = (await http.get(sink)).json()["received"]
        return [r for r in received if r["conversation_id"] == conversation]

    async def field(name: str) -> str:
        value = await redis.hget(conversation_key(TENANT, conversation), name)
        return str(value or "")

    async with httpx.AsyncClient(base_url=f"http://{g.host}:{g.port}", timeout=30) as http:
        try:
            await http.put(
                f"/v1/agents/{agent}/presence",
                json={"presence": "online", "capacity": 2},
                headers=headers,
            )
            lines.append(f"  agent {agent} online (capacity 2)")
            await http.post(
                "/v1/messages",
                json={"customer_id": customer, "text": "I'd like to talk to a human, please"},
                headers=headers,
            )
            lines.append(f"  customer {customer}: I'd like to talk to a human, please")

            async def ai_answered() -> bool:
                return len(await replies()) >= 1

            await until("AI answered and handed off", ai_answered)
            lines.append(f"           kefu (ai): {(await replies())[0]['text']}")

            async def assigned() -> bool:
                return await field("assignee") == agent

            await until(f"router assigned it to {agent}", assigned)
            await http.post(
                f"/v1/conversations/{conversation}/replies",
                json={"agent_id": agent, "text": "Hi, this is Ana. How can I help?"},
                headers=headers,
            )

            async def agent_answered() -> bool:
                return len(await replies()) >= 2

            await until("agent's reply delivered by webhook", agent_answered)
            lines.append(f"           {agent}: {(await replies())[1]['text']}")
            await http.post(
                f"/v1/conversations/{conversation}/close",
                json={"closed_by": agent},
                headers=headers,
            )
            await http.post(
                f"/v1/conversations/{conversation}/rating", json={"rating": 5}, headers=headers
            )

            async def rated() -> bool:
                return await field("status") == "closed" and await field("csat") == "5"

            await until("closed by the agent, rated 5 by the customer", rated)
        finally:
            await http.put(
                f"/v1/agents/{agent}/presence", json={"presence": "offline"}, headers=headers
            )
            await redis.aclose()
    return lines


async def _redis_states(settings: Settings, outcomes: list[Outcome]) -> list[dict[str, str]]:
    client = aioredis.Redis.from_url(settings.redis.dsn, decode_responses=True)
    try:
        states = []
        for outcome in outcomes:
            key = conversation_key(TENANT, outcome.conversation_id)
            # The projection trails the reply by a moment: wait for the delivery receipt.
            for _ in range(200):
                state: dict[str, str] = await client.hgetall(key)  # type: ignore[assignment]
                if int(state.get("deliveries", 0)) >= len(outcome.turns):
                    break
                await asyncio.sleep(0.05)
            states.append(state)
        return states
    finally:
        await client.aclose()


def _analytics(settings: Settings, conversations: list[str], expected: int) -> list[Any]:
    client = AnalyticsClient(settings.clickhouse_url, settings.clickhouse.query_port)
    ids = ", ".join(f"'{c}'" for c in conversations)
    db = settings.clickhouse.database
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        count = client.query(
            f"SELECT count() FROM {db}.events FINAL WHERE conversation_id IN ({ids})"
        ).rows[0][0]
        if count >= expected:
            break
        time.sleep(0.2)
    this_run = client.query(
        f"SELECT type, count() AS events, uniqExact(conversation_id) AS conversations "
        f"FROM {db}.events FINAL WHERE conversation_id IN ({ids}) GROUP BY type ORDER BY type"
    )
    all_runs = client.query(
        f"SELECT channel, count() AS messages, uniqExact(conversation_id) AS conversations, "
        f"min(occurred_at) AS first_seen FROM {db}.events FINAL "
        f"WHERE type = 'MessageReceived' GROUP BY channel ORDER BY channel"
    )
    return [this_run, all_runs]


def run_demo(settings: Settings, keep_running: bool = False, workers: int = 1) -> int:
    settings = _demo_settings(settings)
    run = time.strftime("%H%M%S")
    services = Services(settings, workers=workers)
    app = services.app_services()
    click.secho("kefu demo: starting the embedded stack", bold=True)
    try:
        for name, seconds in stack_up_all(settings).items():
            click.echo(f"  {name:<12} ready after {seconds:.1f} s")
        before = asyncio.run(_log_size(settings))
        click.echo(f"  the event log already holds {before} records from earlier runs")
        for name, seconds in services.start(app).items():
            click.echo(f"  {name:<12} ready after {seconds:.1f} s")
    except ProcessError as exc:
        click.secho(f"could not start: {exc}", fg="red", err=True)
        if not keep_running:
            stack_down_all(settings)
        return 2
    try:
        return _show(settings, run, before)
    finally:
        g = settings.gateway
        click.secho("\nOpen:", bold=True)
        click.echo(f"  web chat      http://{g.host}:{g.port}/chat?tenant={TENANT}")
        click.echo(f"  API docs      http://{g.host}:{g.port}/docs")
        click.echo(f"  dashboard     http://{g.host}:{g.port}/dashboard  (tenant API key)")
        click.echo(f"  console       http://{g.host}:{g.port}/console  (agent token or /login)")
        click.echo(f"  admin         http://{g.host}:{g.port}/admin  (sign in at /login)")
        click.echo(f"  gateway       http://{g.host}:{g.port}/healthz")
        if settings.embedded_clickhouse:
            click.echo(
                f"  ClickHouse    POST SQL to http://127.0.0.1:{settings.clickhouse.query_port}"
                '/query, or `kefu analytics query "SELECT ..."`'
            )
        if keep_running:
            click.echo("\nStill running; stop with `.venv/bin/kefu stack down`.")
        else:
            click.echo(
                "\nStopping (the log and read models stay on disk under "
                f"{settings.state_dir}/; `make demo DEMO_ARGS=--keep-running` leaves it up)."
            )
            stack_down_all(settings)


def _show(settings: Settings, run: str, before: int) -> int:
    click.secho(f"\nConversations (run {run})", bold=True)
    outcomes = asyncio.run(_drive(settings, run))
    failures = 0
    for outcome in outcomes:
        s = outcome.script
        click.secho(
            f"\n[{s.channel}] {s.customer}  conversation {outcome.conversation_id}", bold=True
        )
        for turn in outcome.turns:
            click.echo(f"  customer: {turn.text}" + ("   (sent twice)" if s.resend_first else ""))
            if turn.reply:
                click.echo(
                    f"  kefu:     {turn.reply}   [{turn.intent or 'no intent'}, "
                    f"{turn.latency_ms:.0f} ms]"
                )
            else:
                failures += 1
                click.secho("  kefu:     (no reply within 60 s)", fg="red")

    click.secho("\nHandoff to a human agent (REST routing API)", bold=True)
    try:
        for line in asyncio.run(_human_handoff(settings, run)):
            click.echo(line)
    except TimeoutError as exc:
        failures += 1
        click.secho(f"  timed out waiting for: {exc}", fg="red")

    click.secho("\nRedis read model (kefu:demo:conv:<id>)", bold=True)
    states = asyncio.run(_redis_states(settings, outcomes))
    columns = [
        "customer",
        "channel",
        "status",
        "assignee",
        "messages",
        "replies",
        "first_response_ms",
        "moderation",
        "seq",
        "last_delivery",
    ]
    rows = [
        [o.script.customer, *(st.get(c, "") for c in columns[1:])]
        for o, st in zip(outcomes, states, strict=True)
    ]
    click.echo(format_table(columns, rows))

    expected = sum(int(st.get("seq", 0)) for st in states)
    this_run, all_runs = _analytics(settings, [o.conversation_id for o in outcomes], expected)
    click.secho("\nClickHouse: this run's events by type", bold=True)
    click.echo(format_table(this_run.columns, this_run.rows))
    click.secho("\nClickHouse: customer messages per channel, every run so far", bold=True)
    click.echo(format_table(all_runs.columns, all_runs.rows))
    after = asyncio.run(_log_size(settings))
    # Records, one per decision (a commit of its events): end offsets, not a full read.
    click.echo(f"\nevent log: {before} records before this run, {after} now")
    if failures:
        click.secho(f"{failures} message(s) got no reply", fg="red")
        return 1
    click.secho("every message got its reply", fg="green")
    return 0
