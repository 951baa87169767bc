"""Prometheus metrics and health endpoints: the pure parts (reason kinds, LLM call
counting, breaker and consumer-lag collectors, the ops routes), then every process of
the real stack answering /metrics with the expected families after traffic, and
/healthz and /readyz."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.testclient import TestClient

from connectors.metrics import ops_routes
from kefu.settings import Settings
from schemas.topics import TopicNames
from streams import metrics
from streams.breaker import CircuitBreaker
from tests.conftest import wait_for

# ------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("ValueError('secret text')", "ValueError"),
        ("unknown schema fingerprint 0011223344556677", "unknown schema fingerprint"),
        ("expected a Command, got MessageReceived", "expected a Command"),
        ("command of tenant 'x' for another tenant's conversation", "command of tenant"),
        ("", "other"),
        ("12345", "other"),
    ],
)
def test_dead_letter_reasons_become_bounded_labels(reason: str, kind: str) -> None:
    assert metrics.reason_kind(reason) == kind


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_llm_calls_are_counted_and_timed_with_failures() -> None:
    ok = _value("kefu_llm_calls_total", model="m-test", outcome="ok")
    error = _value("kefu_llm_calls_total", model="m-test", outcome="error")
    timed = _value("kefu_llm_call_seconds_count", model="m-test")
    with metrics.llm_call("m-test"):
        pass
    with pytest.raises(RuntimeError), metrics.llm_call("m-test"):
        raise RuntimeError("endpoint down")
    assert _value("kefu_llm_calls_total", model="m-test", outcome="ok") == ok + 1
    assert _value("kefu_llm_calls_total", model="m-test", outcome="error") == error + 1
    assert _value("kefu_llm_call_seconds_count", model="m-test") == timed + 2


def test_breaker_state_is_read_at_scrape_time() -> None:
    now = [0.0]
    breaker = CircuitBreaker("m-breaker", failures=2, reset_after=10.0, clock=lambda: now[0])
    metrics.watch_breakers([breaker])
    assert _value("kefu_llm_breaker_state", model="m-breaker") == 0.0
    breaker.failure()
    breaker.failure()
    assert _value("kefu_llm_breaker_state", model="m-breaker") == 2.0
    assert _value("kefu_llm_breaker_opened_total", model="m-breaker") == 1.0
    now[0] = 11.0
    assert _value("kefu_llm_breaker_state", model="m-breaker") == 1.0


def test_semantic_cache_hits_and_misses() -> None:
    hits = _value("kefu_semantic_cache_lookups_total", tenant="t-cache", result="hit")
    misses = _value("kefu_semantic_cache_lookups_total", tenant="t-cache", result="miss")
    metrics.cache_lookup("t-cache", True)
    metrics.cache_lookup("t-cache", False)
    metrics.cache_lookup("t-cache", False)
    assert _value("kefu_semantic_cache_lookups_total", tenant="t-cache", result="hit") == hits + 1
    assert (
        _value("kefu_semantic_cache_lookups_total", tenant="t-cache", result="miss") == misses + 2
    )


@dataclass(frozen=True, order=True)
class TP:
    topic: str
    partition: int


@dataclass
class FakeConsumer:
    highwaters: dict[TP, int | None]
    _committed_offset: dict[TP, int | None] = field(default_factory=dict)
    _read_offset: dict[TP, int | None] = field(default_factory=dict)

    def assignment(self) -> set[TP]:
        return set(self.highwaters)

    def highwater(self, tp: TP) -> int | None:
        return self.highwaters[tp]


@dataclass(eq=False)
class FakeApp:
    consumer: FakeConsumer
    rebalancing: bool = False


def test_consumer_lag_is_highwater_minus_committed_else_read() -> None:
    a, b, c, d = (TP("t-lag", p) for p in range(4))
    consumer = FakeConsumer(
        {a: 100, b: 50, c: 10, d: None},
        _committed_offset={a: 90, b: None},
        _read_offset={b: 44},  # last read 44: next is 45
    )
    app = FakeApp(consumer)
    assert metrics.consumer_lag(app) == [("t-lag", 0, 10), ("t-lag", 1, 5)]
    metrics.watch_app(app)
    assert _value("kefu_consumer_lag", topic="t-lag", partition="0") == 10.0
    assert _value("kefu_worker_assigned_partitions") >= 4.0
    assert metrics.consumer_lag(object()) == []  # no consumer: no figures, no error


def test_ops_routes_answer_without_credentials() -> None:
    ready = [False]

    async def probe() -> tuple[bool, dict[str, Any]]:
        if ready[0]:
            return True, {"partitions": 4}
        raise ConnectionError("redis down")

    client = TestClient(Starlette(routes=ops_routes(probe)))
    assert client.get("/healthz").json() == {"status": "ok"}
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json() == {"status": "not ready", "error": "ConnectionError"}
    ready[0] = True
    assert client.get("/readyz").json() == {"status": "ready", "partitions": 4}
    scraped = client.get("/metrics")
    assert scraped.headers["content-type"].startswith("text/plain")
    assert "kefu_messages_in_total" in scraped.text


# ------------------------------------------------------------- the real stack


def families(url: str) -> dict[str, Any]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, f"{url}: {response.status_code}"
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def samples(family: Any, **labels: str) -> list[Any]:
    return [s for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items())]


def total(family: Any, suffix: str = "", **labels: str) -> float:
    matching = samples(family, **labels)
    return float(sum(s.value for s in matching if s.name == family.name + suffix))


def _http(port: int, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port}"


def endpoints(settings: Settings) -> dict[str, str]:
    """Every kefu process of the test stack -> its ops base URL."""
    return {
        "gateway": _http(settings.gateway.port, settings.gateway.host),
        "worker": _http(settings.worker.web_port),
        "projector": _http(settings.clickhouse.query_port),
        "webhook-sink": _http(settings.dev.webhook_sink_port),
        "smtp": _http(settings.observability.smtp_port),
    }


@pytest.fixture(scope="module")
def traffic(pipeline: Settings) -> str:
    """One REST message answered and delivered, and one poison record dead-lettered."""
    g = pipeline.gateway
    key = pipeline.tenants["demo"].api_key.get_secret_value()
    who = f"metrics-{uuid.uuid4().hex[:8]}"
    response = httpx.post(
        f"http://{g.host}:{g.port}/v1/messages",
        headers={"Authorization": f"Bearer {key}"},
        json={"customer_id": who, "text": "Where is my order?", "message_id": who},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    conversation = str(response.json()["conversation_id"])
    sink = f"{_http(pipeline.dev.webhook_sink_port)}/received"
    wait_for(
        lambda: [
            r for r in httpx.get(sink).json()["received"] if r["conversation_id"] == conversation
        ],
        timeout=60,
        what="the webhook delivery",
    )

    async def poison() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=pipeline.kafka.servers, acks="all")
        await producer.start()
        try:
            topic = TopicNames(pipeline.topic_prefix).commands
            await producer.send_and_wait(topic, b"not avro", key=f"poison-{who}".encode())
        finally:
            await producer.stop()

    asyncio.run(poison())
    return conversation


@pytest.mark.parametrize("process", ["gateway", "worker", "projector", "webhook-sink", "smtp"])
def test_every_process_answers_healthz_readyz_and_metrics(
    pipeline: Settings, traffic: str, process: str
) -> None:
    base = endpoints(pipeline)[process]
    assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
    ready = wait_for(
        lambda: httpx.get(f"{base}/readyz", timeout=10).status_code == 200,
        what=f"{process} ready",
    )
    assert ready
    found = families(f"{base}/metrics")
    assert "process_cpu_seconds" in found  # the client's default process collector


def test_gateway_counts_messages_in_and_publish_latency(pipeline: Settings, traffic: str) -> None:
    found = families(f"{endpoints(pipeline)['gateway']}/metrics")
    assert total(found["kefu_messages_in"], "_total", tenant="demo", channel="api") >= 1
    assert total(found["kefu_publish_seconds"], "_count", topic="kefu.commands") >= 1


def _worker_has(settings: Settings, check: Iterable[tuple[str, str, dict[str, str]]]) -> bool:
    found = families(f"{endpoints(settings)['worker']}/metrics")
    return all(
        name in found and total(found[name], suffix, **labels) >= 1
        for name, suffix, labels in check
    )


def test_worker_reports_stages_delivery_lag_and_dead_letters(
    pipeline: Settings, traffic: str
) -> None:
    expected = [
        # No "responder" stage: the offline FAQ's answers are given inline.
        ("kefu_stage_seconds", "_count", {"stage": "conversation"}),
        ("kefu_stage_seconds", "_count", {"stage": "delivery"}),
        ("kefu_stage_seconds", "_count", {"stage": "projection.redis"}),
        ("kefu_end_to_end_seconds", "_count", {"stage": "delivery"}),
        (
            "kefu_messages_out",
            "_total",
            {"tenant": "demo", "channel": "api", "status": "delivered"},
        ),
        ("kefu_delivery_seconds", "_count", {"channel": "api"}),
        ("kefu_dead_letters", "_total", {"consumer": "conversation"}),
        ("kefu_worker_assigned_partitions", "", {}),
    ]
    wait_for(lambda: _worker_has(pipeline, expected), timeout=60, what="the worker's metrics")
    found = families(f"{endpoints(pipeline)['worker']}/metrics")
    # Families that exist before their first sample, with their label names.
    for name in (
        "kefu_llm_calls",
        "kefu_llm_call_seconds",
        "kefu_semantic_cache_lookups",
        "kefu_llm_breaker_state",
        "kefu_consumer_lag",
    ):
        assert name in found, name
    lag = found["kefu_consumer_lag"].samples
    assert lag and all(s.value >= 0 for s in lag)
    assert {s.labels["topic"] for s in lag} >= {"kefu.commands", "kefu.events"}
    # No conversation id in any label of any family.
    for family in found.values():
        for sample in family.samples:
            assert traffic not in sample.labels.values()


def test_projector_counts_stored_rows(pipeline: Settings, traffic: str) -> None:
    base = endpoints(pipeline)["projector"]
    wait_for(
        lambda: total(families(f"{base}/metrics")["kefu_projector_rows_stored"], "_total") > 0,
        what="rows stored",
    )
    # Lag per partition it holds; the events topic's partitions are all there.
    lag = families(f"{base}/metrics")["kefu_projector_lag"]
    partitions = {
        s.labels["partition"] for s in lag.samples if s.labels["topic"].endswith("events")
    }
    assert len(partitions) == pipeline.kafka.partitions
    assert all(s.value >= 0 for s in lag.samples)
