"""Observability wiring for a kefu process: the span exporter chosen in settings
(``observability.trace_exporter``) and the small operations HTTP server for processes
that have none of their own (``/metrics``, ``/healthz``, ``/readyz``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import uvicorn
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette

from connectors.metrics import ReadyProbe, ops_routes
from kefu.settings import Settings
from schemas import tracing

log = logging.getLogger(__name__)


class JsonlSpanExporter(SpanExporter):
    """One JSON object per finished span, one line each: for tests and for operators
    without a tracing backend (``jq`` reads it)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: TextIO | None = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_dict(span), separators=(",", ":")) + "\n" for span in spans]
        with self._lock:
            if self._file is None:
                return SpanExportResult.FAILURE
            self._file.writelines(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_dict(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    parent = span.parent
    return {
        "trace_id": format(context.trace_id, "032x") if context else "",
        "span_id": format(context.span_id, "016x") if context else "",
        "parent_id": format(parent.span_id, "016x") if parent else "",
        "name": span.name,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name", ""),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }


def _exporter(settings: Settings, service: str) -> SpanExporter | None:
    o = settings.observability
    if o.trace_exporter == "console":
        return ConsoleSpanExporter(service_name=f"kefu-{service}")
    if o.trace_exporter == "jsonl":
        directory = o.trace_dir or settings.state_dir.absolute() / "traces"
        return JsonlSpanExporter(directory / f"{service}-{os.getpid()}.jsonl")
    if o.trace_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=o.otlp_endpoint)
    return None


def setup_tracing(settings: Settings, service: str) -> TracerProvider | None:
    """Install the configured exporter for this process (``service``: gateway, worker,
    ...). With ``none`` (the default) nothing is installed and no span is made."""
    exporter = _exporter(settings, service)
    if exporter is None:
        return None
    o = settings.observability
    provider = TracerProvider(
        resource=Resource.create(
            {
                "service.name": f"kefu-{service}",
                "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
            }
        ),
        sampler=ParentBasedTraceIdRatio(o.sample_ratio),
    )
    # Spans leave on a background thread, off the event loop; the provider flushes
    # them at interpreter exit.
    provider.add_span_processor(
        BatchSpanProcessor(exporter, schedule_delay_millis=o.export_delay_ms)
    )
    trace.set_tracer_provider(provider)
    tracing.set_enabled(True)
    log.info("tracing: %s exporter for kefu-%s", o.trace_exporter, service)
    return provider


class CallbackCounter(Collector):
    """A counter whose value another object keeps (e.g. the projector's row count)."""

    def __init__(self, name: str, documentation: str, value: Callable[[], float]) -> None:
        self._name, self._doc, self._value = name, documentation, value

    def collect(self) -> Iterable[Any]:
        family = CounterMetricFamily(self._name, self._doc)
        family.add_metric([], self._value())
        yield family


def register_counter(name: str, documentation: str, value: Callable[[], float]) -> None:
    with contextlib.suppress(ValueError):  # registered already (the same process twice)
        REGISTRY.register(CallbackCounter(name, documentation, value))


class CallbackGauge(Collector):
    """A gauge per label set, read from another object at scrape time (e.g. the
    projector's lag per partition)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        values: Callable[[], Mapping[tuple[str, ...], float]],
    ) -> None:
        self._name, self._doc, self._labels, self._values = name, documentation, labels, values

    def collect(self) -> Iterable[Any]:
        family = GaugeMetricFamily(self._name, self._doc, labels=list(self._labels))
        for labels, value in self._values().items():
            family.add_metric(list(labels), value)
        yield family


def register_gauge(
    name: str,
    documentation: str,
    labels: Sequence[str],
    values: Callable[[], Mapping[tuple[str, ...], float]],
) -> None:
    with contextlib.suppress(ValueError):  # registered already (the same process twice)
        REGISTRY.register(CallbackGauge(name, documentation, labels, values))


def ops_app(ready: ReadyProbe | None = None) -> Starlette:
    return Starlette(routes=ops_routes(ready))


def ops_server(app: Any, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server to run inside an existing event loop; the process handles
    signals itself."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    return server


async def serve_ops(app: Any, host: str, port: int, name: str) -> uvicorn.Server | None:
    """Start ``app`` on host:port in the background; a port in use costs the metrics
    endpoint, never the process it observes."""
    if not port:
        return None
    server = ops_server(app, host, port)

    async def run() -> None:
        try:
            await server.serve()
        except (OSError, SystemExit) as exc:  # uvicorn exits on a bind error
            log.warning("%s ops endpoint on %s:%d unavailable: %r", name, host, port, exc)

    task = asyncio.get_running_loop().create_task(run(), name=f"{name}-ops")
    _background.add(task)
    task.add_done_callback(_background.discard)
    return server


_background: set[asyncio.Task[None]] = set()
