"""The worker's Prometheus metrics (served at the Faust web server's ``/metrics``).

Labels stay low-cardinality: stage, topic, partition, model, tenant, consumer and a
reason *kind* (the leading words of a dead-letter reason), never a conversation id.
Gauges that mirror live objects (consumer lag, breaker state) are computed at scrape
time by collectors, so the hot path pays nothing for them.
"""

from __future__ import annotations

import logging
import re
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# From a fast in-memory fold (~1 ms) to a slow model call (~30 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

STAGE_SECONDS = Histogram(
    "kefu_stage_seconds",
    "Time an agent spent on one record that produced output (a projection: one batch)",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
END_TO_END_SECONDS = Histogram(
    "kefu_end_to_end_seconds",
    "From the customer message's acceptance (its command's issued_at) to the end of "
    "this stage (delivery: the reply handed to the channel)",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
RECORDS = Counter(
    "kefu_records_processed_total", "Records an agent processed that produced output", ["stage"]
)
DEAD_LETTERS = Counter(
    "kefu_dead_letters_total", "Records sent to the dead-letter topic", ["consumer", "reason"]
)
LLM_CALLS = Counter(
    "kefu_llm_calls_total",
    "Model calls by outcome (ok, error; refused: the breaker was open)",
    ["model", "outcome"],
)
LLM_SECONDS = Histogram(
    "kefu_llm_call_seconds",
    "Model call latency, failures included",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
CACHE_LOOKUPS = Counter(
    "kefu_semantic_cache_lookups_total", "Semantic cache lookups (hit, miss)", ["tenant", "result"]
)

_REASON = re.compile(r"[A-Za-z_][A-Za-z_ ]*")


def reason_kind(reason: str) -> str:
    """A bounded label for a free-text reason: ``ValueError('x')`` -> ``ValueError``,
    ``unknown schema fingerprint 0a1b`` -> ``unknown schema fingerprint``."""
    match = _REASON.match(reason.strip())
    if match is None:
        return "other"
    return " ".join(match.group(0).split()[:4])[:48] or "other"


@contextmanager
def llm_call(model: str) -> Iterator[None]:
    """Count and time one model call (a raised exception counts as an error)."""
    started = time.perf_counter()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    finally:
        LLM_CALLS.labels(model, outcome).inc()
        LLM_SECONDS.labels(model).observe(time.perf_counter() - started)


def cache_lookup(tenant: str, hit: bool) -> None:
    CACHE_LOOKUPS.labels(tenant, "hit" if hit else "miss").inc()


# --- scrape-time collectors ---------------------------------------------------------

_BREAKER_STATES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


class _LiveCollector(Collector):
    """Breaker states and Faust consumer lag, read from the live objects at scrape time.
    Objects are held weakly: a test that builds many responders leaks nothing."""

    def __init__(self) -> None:
        self.breakers: weakref.WeakSet[Any] = weakref.WeakSet()
        self.apps: weakref.WeakSet[Any] = weakref.WeakSet()
        self.readers: weakref.WeakSet[Any] = weakref.WeakSet()  # streams.event_reader

    def collect(self) -> Iterable[Any]:
        state = GaugeMetricFamily(
            "kefu_llm_breaker_state",
            "Circuit breaker per model: 0 closed, 1 half-open, 2 open",
            labels=["model"],
        )
        opened = CounterMetricFamily(
            "kefu_llm_breaker_opened", "Times a model's breaker opened", labels=["model"]
        )
        for breaker in list(self.breakers):
            state.add_metric([breaker.name], _BREAKER_STATES.get(breaker.state, 2.0))
            opened.add_metric([breaker.name], float(breaker.opened))
        yield state
        yield opened
        yield from self._consumer_metrics()

    def _consumer_metrics(self) -> Iterable[Any]:
        lag = GaugeMetricFamily(
            "kefu_consumer_lag",
            "Records not yet processed: highwater minus the committed (else read) offset",
            labels=["topic", "partition"],
        )
        assigned = GaugeMetricFamily(
            "kefu_worker_assigned_partitions", "Partitions assigned to this worker"
        )
        rebalancing = GaugeMetricFamily("kefu_worker_rebalancing", "1 while the group rebalances")
        total = 0
        busy = 0.0
        for app in list(self.apps):
            busy = max(busy, 1.0 if app.rebalancing else 0.0)
            for topic, partition, value in consumer_lag(app):
                lag.add_metric([topic, str(partition)], float(value))
            try:
                total += len(app.consumer.assignment())
            except Exception:  # not started yet
                log.debug("assignment unavailable", exc_info=True)
        for reader in list(self.readers):
            for topic, partition, value in reader.lag():
                lag.add_metric([topic, str(partition)], float(value))
        assigned.add_metric([], float(total))
        rebalancing.add_metric([], busy)
        yield lag
        yield assigned
        yield rebalancing


def consumer_lag(app: Any) -> list[tuple[str, int, int]]:
    """``(topic, partition, lag)`` for each assigned partition whose highwater is known."""
    # Imported here: it imports Faust, which processes that count LLM calls (kefu.ai's
    # CLI) need not load. Python caches it after the first scrape.
    from streams import faust_private

    try:
        consumer = app.consumer
        committed_offsets = faust_private.committed_offsets(consumer)
        read_offsets = faust_private.read_offsets(consumer)
        out = []
        for tp in sorted(consumer.assignment()):
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            committed = committed_offsets.get(tp)  # next offset to read
            if committed is None:
                read = read_offsets.get(tp)
                committed = read + 1 if read is not None else None
            if committed is None:
                continue
            out.append((tp.topic, tp.partition, max(0, int(highwater) - int(committed))))
        return out
    except Exception:  # not started, stopping, or a Faust internal moved: no lag figures
        log.debug("consumer lag unavailable", exc_info=True)
        return []


_LIVE = _LiveCollector()
REGISTRY.register(_LIVE)


def watch_breakers(breakers: Iterable[Any]) -> None:
    for breaker in breakers:
        _LIVE.breakers.add(breaker)


def watch_app(app: Any) -> None:
    """Report this Faust app's consumer lag and assignment."""
    _LIVE.apps.add(app)


def watch_reader(reader: Any) -> None:
    """Report an events reader's lag (``streams.event_reader``) with the app's."""
    _LIVE.readers.add(reader)
