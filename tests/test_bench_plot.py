"""The benchmark's instruments, without a stack: the SVG plot, the per-second series,
the soak verdict and the per-worker figures."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from bench.plot import Line, Panel, nice_ceiling, pipeline_panels, render_svg
from bench.scaleout import WorkerMetrics, compact_partitions, parse_metrics, worker_figures
from bench.timeseries import MIB, ProcSample, SecondBuckets, SecondRow, build_series, soak

SVG = "{http://www.w3.org/2000/svg}"


def _row(t: int, rss: float, p50: float | None = 5.0) -> dict[str, object]:
    return {
        "t": t,
        "published": 10,
        "replies": 9 if p50 is not None else 0,
        "p50_ms": p50,
        "p99_ms": None if p50 is None else p50 * 3,
        "rss_mib": {"worker-0": rss},
        "cpu_pct": {"worker-0": 40.0, "kafka": 20.0, "smtp": 0.0},
    }


def test_renders_valid_svg_for_a_tiny_series() -> None:
    rows = [_row(0, 100.0), _row(1, 101.0, p50=None), _row(2, 102.5)]
    svg = render_svg(pipeline_panels(rows), "tiny <run> & co")
    root = ET.fromstring(svg)  # well-formed XML, title escaped
    assert root.tag == f"{SVG}svg"
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "tiny <run> & co" in texts
    assert {"published", "replied", "p50", "p99", "worker-0", "kafka"} <= set(texts)
    assert "smtp" not in texts  # idle processes stay off the CPU panel
    lines = list(root.iter(f"{SVG}polyline"))
    assert lines, "no series drawn"
    for line in lines:
        points = [tuple(map(float, p.split(","))) for p in line.attrib["points"].split()]
        assert all(0 <= x <= float(root.attrib["width"]) for x, _ in points)
        assert all(0 <= y <= float(root.attrib["height"]) for _, y in points)
    # The latency gap at t=1 splits the line: isolated points become dots.
    assert list(root.iter(f"{SVG}circle"))


def test_renders_empty_and_single_point_series() -> None:
    svg = render_svg([Panel("Nothing", "units", [Line("none", []), Line("one", [3.0])])], "x")
    ET.fromstring(svg)


def test_nice_ceiling() -> None:
    assert [nice_ceiling(v) for v in (0, 0.7, 1, 3, 7, 130, 2400)] == [
        1,
        1,
        1,
        5,
        10,
        200,
        2500,
    ]


def test_series_joins_buckets_and_process_samples() -> None:
    buckets = SecondBuckets(origin=100.0)
    for at in (100.1, 100.2, 101.5):
        buckets.add_published(at)
    buckets.add_reply(100.9, 10.0)
    buckets.add_reply(101.2, 30.0)
    buckets.add_reply(101.3, 50.0)
    samples = [
        ProcSample(100.0 + k, {"worker-0": (100 + k) * MIB}, {"worker-0": 0.5 * k})
        for k in range(3)
    ]
    rows = build_series(buckets, samples)
    assert [(r.t, r.published, r.replies) for r in rows] == [(0, 2, 1), (1, 1, 2)]
    assert rows[0].p50_ms == 10.0
    assert rows[1].p50_ms == 40.0
    assert rows[1].rss_mib == {"worker-0": 102.0}
    assert rows[0].cpu_pct == {"worker-0": 50.0}


def _rss_rows(values: list[float]) -> list[SecondRow]:
    return [SecondRow(t, 0, 0, None, None, {"worker-0": v}, {}) for t, v in enumerate(values)]


def test_soak_flat_and_growing() -> None:
    flat = soak(_rss_rows([50.0] * 10 + [100.0] * 100 + [105.0] * 10), ["worker-0"], 10)
    assert flat is not None and flat.flat
    assert flat.rss_start_mib == {"worker-0": 100.0}
    assert flat.growth_pct == {"worker-0": 5.0}
    growing = soak(_rss_rows([100.0 + t for t in range(120)]), ["worker-0"], 10)
    assert growing is not None and not growing.flat
    assert soak(_rss_rows([100.0] * 8), ["worker-0"], 10) is None  # ends before warm-up


def test_per_worker_figures_from_metrics() -> None:
    text = (
        "# TYPE kefu_records_processed_total counter\n"
        'kefu_records_processed_total{stage="conversation"} 30.0\n'
        'kefu_records_processed_total{stage="responder"} 10.0\n'
        "# TYPE kefu_consumer_lag gauge\n"
        'kefu_consumer_lag{partition="1",topic="kefu.commands"} 0.0\n'
        'kefu_consumer_lag{partition="0",topic="kefu.commands"} 2.0\n'
    )
    after = parse_metrics(text)
    assert after.records == {"conversation": 30.0, "responder": 10.0}
    assert compact_partitions(after.partitions) == "kefu.commands[0,1]"
    before = WorkerMetrics({"conversation": 10.0}, [])
    figures = worker_figures(
        {"worker-0": before}, {"worker-0": after, "worker-1": after}, {"worker-0": 0.3}
    )
    first, second = figures
    assert first.records == {"conversation": 20, "responder": 10}
    assert first.records_total == 30 and second.records_total == 40
    assert round(first.share, 3) == round(30 / 70, 3)
    assert first.cpu_ms_per_record == 10.0
    assert second.cpu_s is None
