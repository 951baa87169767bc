"""Tracing: W3C trace context through Kafka headers, the hop spans the agents get from
``streams.inbox.records``, the gateway's producer span, the JSONL exporter; and, on the
real stack, one REST message = one trace across the gateway and every agent."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY

from connectors.metrics import publishing
from kefu.settings import Settings
from kefu.telemetry import JsonlSpanExporter
from schemas import tracing
from schemas.codec import CODEC
from schemas.records import Event, ReceiveMessage, ReplyRequested
from streams import telemetry
from streams.inbox import records, send_dead_letter
from tests.conftest import wait_for
from tests.samples import CMD, EVT

RECEIVE = ReceiveMessage(**CMD, channel="api", customer_id="u1", text="hi", channel_message_id="m1")
REQUEST = ReplyRequested(**EVT, message_event_id="e-0", channel="api", text="hi")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.set_enabled(True, provider)
    try:
        yield exporter
    finally:
        tracing.set_enabled(False)
        provider.shutdown()


@dataclass
class Message:
    """What Faust hands an agent as ``event.message``."""

    headers: Any = None
    topic: str = "kefu.events"
    partition: int = 1
    offset: int = 42
    key: bytes = b"conv-1"
    value: bytes = b""


@dataclass
class FaustEvent:
    value: bytes
    message: Message


@dataclass
class Topic:
    """A Faust topic that remembers what was sent to it."""

    sent: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, **kwargs: Any) -> None:
        self.sent.append(kwargs)

    def get_topic_name(self) -> str:
        return "kefu.commands"


class Stream:
    def __init__(self, *events: FaustEvent) -> None:
        self._events = events

    async def events(self) -> AsyncIterator[FaustEvent]:
        for event in self._events:
            yield event


def _headers(sent: dict[str, Any]) -> dict[str, bytes]:
    return dict(sent["headers"] or [])


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------- headers, pure


def test_inject_extract_round_trip_through_record_headers(
    spans: InMemorySpanExporter,
) -> None:
    tracer = tracing.tracer()
    with tracer.start_as_current_span("root") as root:
        headers = tracing.inject()
    names = [name for name, _ in headers]
    assert names == ["traceparent"]
    for carried in (headers, dict(headers)):  # aiokafka: a list of pairs; a mapping too
        with tracer.start_as_current_span("child", context=tracing.extract(carried)) as child:
            pass
        assert child.get_span_context().trace_id == root.get_span_context().trace_id
        assert _parent(child) == _id(root)


def test_extract_ignores_foreign_and_missing_headers() -> None:
    assert tracing.extract(None) == tracing.extract([])
    empty = tracing.extract([("x-other", b"1"), ("traceparent", b"garbage")])
    assert empty == tracing.extract(None)
    assert tracing.origin_ms([("kefu-origin-ms", b"123")]) == 123
    assert tracing.origin_ms({"kefu-origin-ms": b"nope"}) is None
    assert tracing.origin_ms(None) is None


def test_a_stored_event_is_traced_only_under_its_own_context(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.tracer().start_as_current_span("conversation") as hop:
        carried = tracing.inject()
    tracing.finished_span_under(carried, "projection.clickhouse", {"k": 1}, 1_000, 2_000)
    tracing.finished_span_under([], "projection.clickhouse", {}, 1_000, 2_000)  # replayed
    (stored,) = [s for s in spans.get_finished_spans() if s.name == "projection.clickhouse"]
    assert stored.parent is not None
    assert stored.parent.span_id == hop.get_span_context().span_id
    assert (stored.start_time, stored.end_time) == (1_000, 2_000)


def test_nothing_is_traced_or_injected_while_tracing_is_off() -> None:
    assert not tracing.enabled()
    hop = telemetry.begin("responder", Message(), REQUEST)
    assert telemetry.outgoing(None) is None  # no origin, no context: nothing added
    telemetry.end(hop)
    assert hop.span is None


# ------------------------------------------------------------------- the hops


def test_producer_span_is_the_parent_of_the_first_hop(spans: InMemorySpanExporter) -> None:
    before = _metric("kefu_messages_in_total", tenant="t1", channel="api")
    with publishing(RECEIVE, "kefu.commands") as headers:
        assert headers is not None
    assert _metric("kefu_messages_in_total", tenant="t1", channel="api") == before + 1
    carried = dict(headers)
    assert carried["kefu-origin-ms"] == str(RECEIVE.issued_at).encode()
    (publish,) = spans.get_finished_spans()
    assert publish.name == "publish kefu.commands"
    assert publish.kind == SpanKind.PRODUCER

    out = telemetry.TracedTopic(Topic())
    hop = telemetry.begin("conversation", Message(headers=headers), RECEIVE)
    _run(out.send(key="conv-1", value=REQUEST))
    telemetry.end(hop)
    conversation = _span(spans, "conversation")
    assert conversation.kind == SpanKind.CONSUMER
    assert _parent(conversation) == _id(publish)
    assert conversation.context is not None and publish.context is not None
    assert conversation.context.trace_id == publish.context.trace_id
    assert conversation.attributes is not None
    assert conversation.attributes["kefu.record_type"] == "ReceiveMessage"
    assert conversation.attributes["messaging.kafka.offset"] == 42
    # What the hop sent carries the hop's own span and the origin onwards.
    sent = _headers(out._topic.sent[0])
    assert sent["kefu-origin-ms"] == str(RECEIVE.issued_at).encode()
    child = tracing.extract(sent)
    with tracing.tracer().start_as_current_span("next", context=child) as nxt:
        pass
    assert _parent(nxt) == _id(conversation)


def test_a_record_the_agent_only_looks_at_costs_no_span(spans: InMemorySpanExporter) -> None:
    before = _metric("kefu_stage_seconds_count", stage="skipper")
    hop = telemetry.begin("skipper", Message(), REQUEST)
    telemetry.end(hop)
    assert spans.get_finished_spans() == ()
    assert _metric("kefu_stage_seconds_count", stage="skipper") == before


def test_records_opens_a_hop_per_record_and_closes_it_on_the_next(
    spans: InMemorySpanExporter,
) -> None:
    with publishing(RECEIVE, "kefu.commands") as headers:
        pass
    now = int(time.time() * 1000)
    headers = [h for h in headers or [] if h[0] != "kefu-origin-ms"]
    headers.append(("kefu-origin-ms", str(now - 1500).encode()))  # accepted 1.5 s ago
    stream = Stream(
        FaustEvent(CODEC.encode(REQUEST), Message(headers=headers, offset=1)),
        FaustEvent(CODEC.encode(REQUEST), Message(headers=headers, offset=2)),
    )
    out = telemetry.TracedTopic(Topic())
    deadletter = telemetry.TracedTopic(Topic())
    e2e_before = _metric("kefu_end_to_end_seconds_count", stage="responder-test")
    slow_before = _metric("kefu_end_to_end_seconds_bucket", stage="responder-test", le="1.0")
    dead_before = _metric(
        "kefu_dead_letters_total", consumer="responder-test", reason="RuntimeError"
    )

    async def agent() -> None:
        # No Faust consumer behind this stream: no offset gate.
        records_in = records(stream, Event, deadletter, "responder-test", in_order=False)
        async for event, record in records_in:
            assert isinstance(record, ReplyRequested)
            if event.message.offset == 1:
                await out.send(key=record.conversation_id, value=record)
            else:
                await send_dead_letter(
                    deadletter, event.message, repr(RuntimeError("boom")), "responder-test"
                )

    _run(agent())
    hops = [s for s in spans.get_finished_spans() if s.name == "responder-test"]
    assert len(hops) == 2
    ok, failed = sorted(hops, key=lambda s: str((s.attributes or {})["messaging.kafka.offset"]))
    assert ok.status.status_code == StatusCode.UNSET
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.status.description == "RuntimeError"
    publish = _span(spans, "publish kefu.commands")
    assert {_parent(ok), _parent(failed)} == {_id(publish)}
    # The dead letter carries the failed hop's context: the trace shows where it went.
    dead = _headers(deadletter._topic.sent[0])
    assert tracing.origin_ms(dead) == now - 1500
    assert _metric("kefu_end_to_end_seconds_count", stage="responder-test") == e2e_before + 2
    # 1.5 s since the origin: above the 1 s bucket.
    assert (
        _metric("kefu_end_to_end_seconds_bucket", stage="responder-test", le="1.0") == slow_before
    )
    assert (
        _metric("kefu_dead_letters_total", consumer="responder-test", reason="RuntimeError")
        == dead_before + 1
    )


def test_projected_batch_spans_each_event_under_its_producer(
    spans: InMemorySpanExporter,
) -> None:
    with publishing(RECEIVE, "kefu.commands") as headers:
        pass
    events = [FaustEvent(b"", Message(headers=headers, offset=i)) for i in range(3)]
    telemetry.projected("projection.test", events, time.perf_counter())
    projected = [s for s in spans.get_finished_spans() if s.name == "projection.test"]
    publish = _span(spans, "publish kefu.commands")
    assert len(projected) == 3
    assert {_parent(s) for s in projected} == {_id(publish)}


def test_traced_app_wraps_only_the_topics_sent_to() -> None:
    from streams.app import KefuApp

    topics = {name: Topic() for name in KefuApp.__dataclass_fields__}
    kefu = KefuApp(**topics)  # type: ignore[arg-type]
    traced = telemetry.traced_app(kefu)
    assert isinstance(traced.events_out, telemetry.TracedTopic)
    assert isinstance(traced.deadletter, telemetry.TracedTopic)
    assert traced.events_in is kefu.events_in
    assert traced.events_out.get_topic_name() == "kefu.commands"  # delegates
    assert telemetry.traced_app(traced).events_out is traced.events_out  # idempotent


def test_jsonl_exporter_writes_one_object_per_span(tmp_path: Path) -> None:
    exporter = JsonlSpanExporter(tmp_path / "traces" / "test.jsonl")
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("parent"), tracer.start_as_current_span("child"):
        pass
    provider.shutdown()
    lines = [json.loads(line) for line in exporter.path.read_text().splitlines()]
    child, parent = lines
    assert (child["name"], parent["name"]) == ("child", "parent")
    assert child["trace_id"] == parent["trace_id"] and len(child["trace_id"]) == 32
    assert child["parent_id"] == parent["span_id"] and parent["parent_id"] == ""


def _run(coro: Any) -> Any:
    import asyncio

    return asyncio.new_event_loop().run_until_complete(coro)


def _span(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


def _parent(span: Any) -> int:
    parent = cast(ReadableSpan, span).parent
    assert parent is not None, f"{span.name} has no parent"
    return parent.span_id


def _id(span: Any) -> int:
    context = cast(ReadableSpan, span).get_span_context()
    assert context is not None
    return context.span_id


# ------------------------------------------------------------- the real stack


def read_spans(settings: Settings) -> list[dict[str, Any]]:
    directory = settings.observability.trace_dir or settings.state_dir / "traces"
    out = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


def test_one_rest_message_is_one_trace_across_every_hop(pipeline: Settings) -> None:
    assert pipeline.observability.trace_exporter == "jsonl"
    gateway = f"http://127.0.0.1:{pipeline.gateway.port}"
    key = pipeline.tenants["demo"].api_key.get_secret_value()
    message_id = f"trace-{time.time_ns()}"
    response = httpx.post(
        f"{gateway}/v1/messages",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "customer_id": f"tracer-{message_id}",
            "text": "Where is my order?",
            "message_id": message_id,
        },
        timeout=10,
    )
    assert response.status_code == 202, response.text
    conversation = response.json()["conversation_id"]

    def trace_of_conversation() -> list[dict[str, Any]] | None:
        mine = [
            s
            for s in read_spans(pipeline)
            if s["attributes"].get("kefu.conversation_id") == conversation
        ]
        publish = [s for s in mine if s["name"].startswith("publish ")]
        if len(publish) != 1:
            return None
        trace = [s for s in read_spans(pipeline) if s["trace_id"] == publish[0]["trace_id"]]
        names = {s["name"] for s in trace}
        # The reply was delivered and the delivery recorded (conversation, second time:
        # the offline FAQ's answer is given inline, with the message), and a projection
        # span was exported (the one hop can finish before the projection's batch).
        projected = {"projection.redis", "projection.clickhouse"} <= names
        if (
            {"conversation", "delivery"} <= names
            and projected
            and sum(s["name"] == "conversation" for s in trace) >= 2
        ):
            return trace
        return None

    trace = wait_for(trace_of_conversation, timeout=60, what="the message's spans")
    by_id = {s["span_id"]: s for s in trace}
    (publish,) = [s for s in trace if s["name"].startswith("publish ")]
    assert publish["service"] == "kefu-gateway" and publish["kind"] == "PRODUCER"

    def ancestors(span: dict[str, Any]) -> list[dict[str, Any]]:
        found = []
        while span["parent_id"]:
            span = by_id[span["parent_id"]]  # every parent is in the same trace
            found.append(span)
        return found

    def chain(span: dict[str, Any]) -> list[str]:
        return [s["name"] for s in ancestors(span) if s["service"] == "kefu-worker"]

    # Above the publish span: only the gateway's own request spans (FastAPI makes a
    # SERVER span per request once a tracer provider is installed).
    above = ancestors(publish)
    assert {s["service"] for s in above} <= {"kefu-gateway"}
    if above:
        assert above[-1]["kind"] == "SERVER" and above[-1]["name"] == "POST /v1/messages"

    (delivery,) = [s for s in trace if s["name"] == "delivery"]
    # publish → conversation (which answered inline) → delivery, parent-linked.
    assert chain(delivery) == ["conversation"]
    assert ancestors(delivery)[1] is publish
    assert delivery["service"] == "kefu-worker" and delivery["kind"] == "CONSUMER"
    assert "responder" not in {s["name"] for s in trace}
    hops = [s for s in trace if s["name"] in ("conversation", "delivery")]
    assert {s["attributes"].get("kefu.conversation_id") for s in hops} == {conversation}
    # Projections hang under the hop that produced each event: the workers' Redis
    # model, and the projector process's ClickHouse insert (when rows became queryable).
    stored = [s for s in trace if s["name"] == "projection.clickhouse"]
    assert stored and {s["service"] for s in stored} == {"kefu-projector"}
    for span in [*stored, *(s for s in trace if s["name"] == "projection.redis")]:
        assert by_id[span["parent_id"]]["service"] == "kefu-worker"
        assert span["kind"] == "CONSUMER"
