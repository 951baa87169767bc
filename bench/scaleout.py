"""Per-worker figures for a scale-out run: what each worker process did.

Read from each worker's Prometheus ``/metrics`` (the Faust web server, port
``worker.web_port + index``) before and after the measured window: records each stage
processed (``kefu_records_processed_total``), and the partitions it held at the end
(``kefu_consumer_lag`` has one series per assigned topic-partition). Together with the
CPU seconds per process, this gives the arithmetic for N workers: each record costs
``cpu_ms_per_message`` of one core, spread over the partitions the workers share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kefu.processes import LOOPBACK

RECORDS_METRIC = "kefu_records_processed"  # the parser drops the counter's _total


@dataclass(frozen=True, slots=True)
class WorkerMetrics:
    records: dict[str, float]  # stage -> records processed (cumulative)
    partitions: list[str]  # "topic[partition]" assigned now


def parse_metrics(text: str) -> WorkerMetrics:
    records: dict[str, float] = {}
    partitions: set[str] = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if family.name == RECORDS_METRIC and s.name.endswith("_total"):
                stage = s.labels.get("stage", "?")
                records[stage] = records.get(stage, 0.0) + s.value
            elif family.name == "kefu_consumer_lag":
                partitions.add(f"{s.labels.get('topic')}[{s.labels.get('partition')}]")
    return WorkerMetrics(records, sorted(partitions))


def scrape(port: int, timeout: float = 5.0) -> WorkerMetrics | None:
    """None when the worker does not answer (stopped, or no web server)."""
    try:
        response = httpx.get(f"http://{LOOPBACK}:{port}/metrics", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse_metrics(response.text)


def scrape_all(ports: Mapping[str, int]) -> dict[str, WorkerMetrics]:
    out = {}
    for name, port in ports.items():
        metrics = scrape(port)
        if metrics is not None:
            out[name] = metrics
    return out


def compact_partitions(partitions: Sequence[str]) -> str:
    """``["t[0]", "t[1]", "u[3]"]`` -> ``"t[0,1] u[3]"``."""
    by_topic: dict[str, list[int]] = {}
    for tp in partitions:
        topic, _, rest = tp.partition("[")
        with contextlib.suppress(ValueError):
            by_topic.setdefault(topic, []).append(int(rest.rstrip("]")))
    return " ".join(
        f"{topic}[{','.join(map(str, sorted(ps)))}]" for topic, ps in sorted(by_topic.items())
    )


@dataclass(frozen=True, slots=True)
class WorkerFigures:
    name: str
    records: dict[str, int]  # stage -> records processed in the window
    records_total: int
    share: float  # of all workers' records
    partitions: list[str]
    cpu_s: float | None
    cpu_ms_per_record: float | None


def worker_figures(
    before: Mapping[str, WorkerMetrics],
    after: Mapping[str, WorkerMetrics],
    cpu_s: Mapping[str, float],
) -> list[WorkerFigures]:
    deltas: dict[str, dict[str, int]] = {}
    for name, end in after.items():
        start = before.get(name, WorkerMetrics({}, []))
        deltas[name] = {
            stage: round(value - start.records.get(stage, 0.0))
            for stage, value in sorted(end.records.items())
            if round(value - start.records.get(stage, 0.0)) > 0
        }
    everything = sum(sum(d.values()) for d in deltas.values())
    out = []
    for name in sorted(set(after) | set(cpu_s)):
        records = deltas.get(name, {})
        total = sum(records.values())
        cpu = cpu_s.get(name)
        out.append(
            WorkerFigures(
                name=name,
                records=records,
                records_total=total,
                share=total / everything if everything else 0.0,
                partitions=after[name].partitions if name in after else [],
                cpu_s=cpu,
                cpu_ms_per_record=cpu / total * 1000 if cpu is not None and total else None,
            )
        )
    return out


def figures_lines(
    figures: Sequence[WorkerFigures], replies: int, elapsed_s: float, msgs_per_s: float
) -> list[str]:
    """The per-worker table and the per-message cost the N-machine arithmetic needs."""
    lines = ["  per worker    (records each stage processed in the window, from /metrics)"]
    for f in figures:
        stages = ", ".join(f"{stage} {n}" for stage, n in f.records.items()) or "no metrics"
        cpu = f"{f.cpu_s:.2f} CPU-s" if f.cpu_s is not None else "CPU n/a"
        per = f", {f.cpu_ms_per_record:.3f} CPU-ms/record" if f.cpu_ms_per_record else ""
        lines.append(
            f"    {f.name:<10}{f.records_total:>9} records ({f.share * 100:.0f} %), {cpu}{per}"
        )
        lines.append(f"      stages    {stages}")
        lines.append(f"      holds     {compact_partitions(f.partitions) or 'unknown'}")
    worker_cpu = sum(f.cpu_s for f in figures if f.cpu_s is not None)
    if replies and elapsed_s > 0:
        per_message = worker_cpu / replies * 1000
        lines.append(
            f"    total     {worker_cpu:.2f} worker CPU-s for {replies} messages = "
            f"{per_message:.3f} CPU-ms per message → one core ≈ "
            f"{1000 / per_message if per_message else 0:.0f} msg/s of worker work; "
            f"measured {msgs_per_s:.0f} msg/s with {len(figures)} worker(s)"
        )
    return lines
