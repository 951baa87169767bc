"""The edge's Prometheus metrics and the operations endpoints every kefu HTTP process
serves: ``/metrics`` (Prometheus text), ``/healthz`` (alive) and ``/readyz`` (ready to
take work; 503 with the reason otherwise). None of them is authenticated: they carry
no customer data, and orchestrators and scrapers call them without credentials.

Also the producer side of tracing: ``publishing`` opens the root span of a customer
message and gives the Kafka headers that carry it (``schemas.tracing``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from schemas import tracing
from schemas.records import Command, ReceiveMessage, RoutingCommand

MESSAGES_IN = Counter(
    "kefu_messages_in_total", "Customer messages accepted onto the log", ["tenant", "channel"]
)
MESSAGES_OUT = Counter(
    "kefu_messages_out_total",
    "Replies handed to a channel, by outcome (delivered, failed)",
    ["tenant", "channel", "status"],
)
PUBLISH_SECONDS = Histogram(
    "kefu_publish_seconds",
    "From publish to the broker's ack (acks=all)",
    ["topic"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DELIVERY_SECONDS = Histogram(
    "kefu_delivery_seconds",
    "Time to hand one reply to its channel, retries included",
    ["channel"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

# Ready probe: (ready, details). Details go into the JSON body (no secrets, no text).
ReadyProbe = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


def metrics_text() -> bytes:
    return generate_latest()


async def metrics_endpoint(request: Request) -> Response:
    return Response(metrics_text(), media_type=CONTENT_TYPE_LATEST)


async def _always_ready() -> tuple[bool, dict[str, Any]]:
    return True, {}


def ops_routes(ready: ReadyProbe | None = None) -> list[Route]:
    """``/metrics``, ``/healthz`` and ``/readyz`` for a Starlette app."""
    probe = ready or _always_ready

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        return await ready_response(probe)

    return [
        Route("/metrics", metrics_endpoint),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
    ]


async def ready_response(probe: ReadyProbe) -> JSONResponse:
    try:
        ok, details = await probe()
    except Exception as exc:  # a probe that fails is a "not ready" with the reason
        ok, details = False, {"error": type(exc).__name__}
    return JSONResponse(
        {"status": "ready" if ok else "not ready", **details}, status_code=200 if ok else 503
    )


@contextmanager
def publishing(command: Command | RoutingCommand, topic: str) -> Iterator[tracing.Headers | None]:
    """Around one publish: a producer span (tracing on) and the headers to send; a
    customer message (``ReceiveMessage``) also starts the end-to-end clock and counts."""
    origin = command.issued_at if isinstance(command, ReceiveMessage) else None
    started = time.perf_counter()
    if tracing.enabled():
        attributes = {
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.destination.name": topic,
            "kefu.tenant": command.tenant_id,
            "kefu.conversation_id": str(getattr(command, "conversation_id", "")),
            "kefu.record_type": type(command).__name__,
        }
        span = tracing.tracer().start_span(
            f"publish {topic}", kind=SpanKind.PRODUCER, attributes=attributes
        )
        with trace.use_span(span, end_on_exit=True):
            headers = tracing.inject()
            if origin is not None:
                headers.append(tracing.origin_header(origin))
            yield headers
    else:
        yield [tracing.origin_header(origin)] if origin is not None else None
    PUBLISH_SECONDS.labels(topic).observe(time.perf_counter() - started)
    if isinstance(command, ReceiveMessage):
        MESSAGES_IN.labels(command.tenant_id, command.channel).inc()


@contextmanager
def delivering(tenant: str, channel: str) -> Iterator[Callable[[str], None]]:
    """Time one delivery; call the yielded function with the outcome's status."""
    started = time.perf_counter()
    status = "failed"

    def outcome(value: str) -> None:
        nonlocal status
        status = value

    try:
        yield outcome
    finally:
        DELIVERY_SECONDS.labels(channel).observe(time.perf_counter() - started)
        MESSAGES_OUT.labels(tenant, channel, status).inc()
