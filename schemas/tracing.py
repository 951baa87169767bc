"""Trace context in Kafka record headers: the W3C ``traceparent`` (and ``tracestate``)
of the span that produced a record, plus ``kefu-origin-ms``, the time the customer
message at the root of the chain was accepted (its command's ``issued_at``), so every
stage can measure end-to-end latency without a lookup.

Pure helpers on the OpenTelemetry API (no SDK, no I/O): the process shell
(``kefu.telemetry``) installs an SDK tracer provider and calls ``set_enabled`` when an
exporter is configured; until then nothing here creates or parses spans.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER_NAME = "kefu"
ORIGIN_HEADER = "kefu-origin-ms"
Headers = list[tuple[str, bytes]]
# What aiokafka and Faust hand over: a list of (name, bytes) pairs, or a mapping.
HeadersIn = Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = frozenset(_PROPAGATOR.fields)
_enabled = False
_provider: trace.TracerProvider | None = None


def set_enabled(enabled: bool, provider: trace.TracerProvider | None = None) -> None:
    """Turn tracing on or off; ``provider`` (tests) instead of the global one."""
    global _enabled, _provider
    _enabled = enabled
    _provider = provider


def enabled() -> bool:
    """Is a tracer provider with an exporter installed in this process?"""
    return _enabled


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME, tracer_provider=_provider)


def pairs(headers: HeadersIn) -> Iterable[tuple[str, bytes]]:
    """A record's headers as ``(name, value)`` pairs, whichever form they came in."""
    if not headers:
        return ()
    if isinstance(headers, Mapping):
        return headers.items()
    return headers


def merged(headers: Any, extra: Headers) -> Any:
    """``headers`` (None, a list of pairs or a mapping, as aiokafka and Faust take them)
    plus ``extra``, in the same form; ``headers`` itself when there is nothing to add."""
    if not extra:
        return headers
    if headers is None:
        return extra
    if isinstance(headers, Mapping):
        return {**headers, **dict(extra)}
    return [*headers, *extra]


def extract(headers: HeadersIn) -> Context:
    """The parent context carried by a record (empty when it carries none)."""
    carrier = {
        name: value.decode("latin-1")
        for name, value in pairs(headers)
        if name in _TRACE_HEADERS and isinstance(value, bytes | bytearray)
    }
    return _PROPAGATOR.extract(carrier)


def inject(context: Context | None = None) -> Headers:
    """Headers for a record produced under ``context`` (default: the current one)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return [(name, value.encode("latin-1")) for name, value in carrier.items()]


def kafka_attributes(topic: str, partition: object, offset: int) -> dict[str, str | int]:
    """OpenTelemetry's messaging attributes of a Kafka record being processed."""
    return {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": topic,
        "messaging.destination.partition.id": str(partition),
        "messaging.kafka.offset": offset,
    }


def finished_span_under(
    headers: HeadersIn, name: str, attributes: Mapping[str, Any], start_ns: int, end_ns: int
) -> None:
    """A CONSUMER span from ``start_ns`` to ``end_ns`` under the trace context a record
    carries; none for a record that carries none (replayed, or from before tracing),
    which would otherwise start a trace of its own per record."""
    parent = extract(headers)
    if not trace.get_current_span(parent).get_span_context().is_valid:
        return
    span = tracer().start_span(
        name,
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        start_time=start_ns,
    )
    span.end(end_time=end_ns)


def origin_ms(headers: HeadersIn) -> int | None:
    for name, value in pairs(headers):
        if name == ORIGIN_HEADER:
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None


def origin_header(ms: int) -> tuple[str, bytes]:
    return (ORIGIN_HEADER, str(ms).encode())
