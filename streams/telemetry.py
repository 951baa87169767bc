"""One span and one latency sample per hop, with no code in the agents.

``streams.inbox.records`` opens a *hop* for each record it yields (``begin``) and
closes it when the agent asks for the next one (``end``). The out-topics are wrapped in
``TracedTopic`` (``traced_app``), so whatever an agent sends while a hop is open carries
the hop's trace context and the origin timestamp in its Kafka headers. The span itself
is created lazily, on the first send: a record an agent only looks at (the responder
skips every event but ``ReplyRequested``) costs no span and no sample. Stage latency and
end-to-end latency are observed for hops that produced output.

Tracing is off unless the process shell installed an exporter (``schemas.tracing``);
the metrics are always on.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from schemas import tracing
from schemas.headers import tenant_headers
from schemas.time import now_ms
from streams import metrics
from streams.app import KefuApp


@dataclass(slots=True)
class Hop:
    stage: str
    message: Any  # the Faust message (topic, partition, offset, headers)
    record: Any
    started: float  # perf_counter
    start_ns: int  # wall clock, for the span
    parent: Context | None
    origin: int | None  # ms: when the customer message at the root was accepted
    sent: bool = False
    error: str = ""
    span: trace.Span | None = None


_HOP: ContextVar[Hop | None] = ContextVar("kefu_hop", default=None)


def begin(stage: str, message: Any, record: Any) -> Hop:
    headers = getattr(message, "headers", None)
    on = tracing.enabled()
    hop = Hop(
        stage,
        message,
        record,
        time.perf_counter(),
        time.time_ns() if on else 0,
        tracing.extract(headers) if on else None,
        tracing.origin_ms(headers),
    )
    _HOP.set(hop)
    return hop


def end(hop: Hop) -> None:
    if _HOP.get() is hop:
        _HOP.set(None)
    if not hop.sent:
        return
    metrics.STAGE_SECONDS.labels(hop.stage).observe(time.perf_counter() - hop.started)
    metrics.RECORDS.labels(hop.stage).inc()
    if hop.origin is not None:
        since = max(0, now_ms() - hop.origin) / 1000
        metrics.END_TO_END_SECONDS.labels(hop.stage).observe(since)
    if hop.span is not None:
        if hop.error:
            hop.span.set_status(Status(StatusCode.ERROR, hop.error))
        hop.span.end()


@contextmanager
def hop(stage: str, message: Any, record: Any) -> Iterator[Hop]:
    """``begin`` … ``end`` around the handling of one record of a batch."""
    opened = begin(stage, message, record)
    try:
        yield opened
    finally:
        end(opened)


def dead_lettered(consumer: str, reason: str) -> None:
    """Count it, and mark the open hop's span as failed."""
    kind = metrics.reason_kind(reason)
    metrics.DEAD_LETTERS.labels(consumer, kind).inc()
    hop = _HOP.get()
    if hop is not None:
        hop.error = kind


def _message_attributes(message: Any) -> dict[str, str | int]:
    return tracing.kafka_attributes(
        str(getattr(message, "topic", "")),
        getattr(message, "partition", ""),
        int(getattr(message, "offset", -1) or 0),
    )


def _attributes(hop: Hop) -> dict[str, str | int]:
    record = hop.record
    return {
        **_message_attributes(hop.message),
        "kefu.tenant": str(getattr(record, "tenant_id", "")),
        "kefu.conversation_id": str(getattr(record, "conversation_id", "")),
        "kefu.record_type": type(record).__name__,
    }


def _span(hop: Hop) -> trace.Span:
    if hop.span is None:
        hop.span = tracing.tracer().start_span(
            hop.stage,
            context=hop.parent,
            kind=SpanKind.CONSUMER,
            attributes=_attributes(hop),
            start_time=hop.start_ns,
        )
    return hop.span


def outgoing(headers: Any, tenant_id: str | None = None) -> Any:
    """The headers of a record sent now: the caller's plus the trace context of the
    open hop (or of the current span), the origin timestamp and the record's tenant."""
    hop = _HOP.get()
    extra: tracing.Headers = []
    if hop is not None:
        extra = carried()
    elif tracing.enabled():
        extra = tracing.inject()
    return tracing.merged(headers, extra + tenant_headers(tenant_id))


def carried() -> tracing.Headers:
    """The open hop's trace context and origin timestamp as headers: for a record sent
    under it, or later on its behalf (a batch's delivery receipts go out together)."""
    hop = _HOP.get()
    if hop is None:
        return []
    hop.sent = True
    extra: tracing.Headers = []
    if tracing.enabled():
        extra = tracing.inject(trace.set_span_in_context(_span(hop), hop.parent))
    if hop.origin is not None:
        extra.append(tracing.origin_header(hop.origin))
    return extra


def _headers(send_kwargs: dict[str, Any]) -> Any:
    tenant_id = getattr(send_kwargs.get("value"), "tenant_id", None)
    return outgoing(send_kwargs.get("headers"), tenant_id)


class TracedTopic:
    """A Faust topic whose sends carry the hop's headers; everything else delegates."""

    def __init__(self, topic: Any) -> None:
        self._topic = topic

    async def send(self, **kwargs: Any) -> Any:
        kwargs["headers"] = _headers(kwargs)
        return await self._topic.send(**kwargs)

    def send_soon(self, **kwargs: Any) -> Any:
        kwargs["headers"] = _headers(kwargs)
        return self._topic.send_soon(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._topic, name)


def traced_app(kefu: KefuApp) -> KefuApp:
    """The same ``KefuApp`` with every topic it sends to (``*_out``, the dead-letter
    topic) wrapped in ``TracedTopic``."""
    wrapped: dict[str, Any] = {
        f.name: TracedTopic(getattr(kefu, f.name))
        for f in dataclasses.fields(kefu)
        if (f.name.endswith("_out") or f.name == "deadletter")
        and not isinstance(getattr(kefu, f.name), TracedTopic)
    }
    return dataclasses.replace(kefu, **wrapped)


def projected(stage: str, events: Sequence[Any], started: float) -> None:
    """A projection applied a batch: one latency sample for the batch; per event, the
    end-to-end latency and (tracing on) a span under the event's producer
    (``tracing.finished_span_under``, as the ClickHouse projector's)."""
    metrics.STAGE_SECONDS.labels(stage).observe(time.perf_counter() - started)
    metrics.RECORDS.labels(stage).inc(len(events))
    on = tracing.enabled()
    now = now_ms()
    end_ns = time.time_ns()
    start_ns = end_ns - int((time.perf_counter() - started) * 1e9)
    for event in events:  # Faust events, or the Kafka messages themselves
        message = getattr(event, "message", event)
        headers = getattr(message, "headers", None)
        origin = tracing.origin_ms(headers)
        if origin is not None:
            metrics.END_TO_END_SECONDS.labels(stage).observe(max(0, now - origin) / 1000)
        if on:
            attributes = _message_attributes(message)
            tracing.finished_span_under(headers, stage, attributes, start_ns, end_ns)
