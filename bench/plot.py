"""A small SVG line chart for the pipeline benchmark's time series, no plotting library.

``pipeline.py --json out.json`` writes ``out.svg`` next to it: throughput (published and
replied per second), reply latency (p50/p99 per second), worker RSS and CPU over time.
Re-render from a saved result with ``.venv/bin/python bench/plot.py out.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

WIDTH = 900
PANEL_HEIGHT = 220
TOP = 40  # room for the title
LEFT, RIGHT = 70, 170  # y-axis labels; legend
PAD_TOP, PAD_BOTTOM = 28, 34  # per panel: its title; x-axis labels
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f"]


@dataclass(frozen=True, slots=True)
class Line:
    label: str
    values: Sequence[float | None]  # one per second; None = no value (a gap)


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    unit: str
    lines: Sequence[Line]


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k at or above ``value`` (1 for nothing)."""
    if not value > 0 or not math.isfinite(value):
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if step * power >= value:
            return step * power
    return 10 * power


def _num(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def _segments(values: Sequence[float | None]) -> list[list[tuple[int, float]]]:
    """Runs of consecutive known values: a gap breaks the line."""
    out: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    for x, v in enumerate(values):
        if v is None or not math.isfinite(v):
            if current:
                out.append(current)
            current = []
        else:
            current.append((x, v))
    if current:
        out.append(current)
    return out


def _panel(panel: Panel, top: float, seconds: int) -> list[str]:
    x0, x1 = LEFT, WIDTH - RIGHT
    y0, y1 = top + PAD_TOP, top + PANEL_HEIGHT - PAD_BOTTOM  # plot area, y grows down
    peak = max((v for line in panel.lines for v in line.values if v is not None), default=0.0)
    y_max = nice_ceiling(peak)
    x_max = max(seconds - 1, 1)

    def sx(x: float) -> float:
        return x0 + (x1 - x0) * x / x_max

    def sy(y: float) -> float:
        return y1 - (y1 - y0) * min(y, y_max) / y_max

    out = [
        f'<text x="{x0}" y="{top + 18:.0f}" class="title">'
        f"{escape(panel.title)} ({escape(panel.unit)})</text>",
        f'<rect x="{x0}" y="{y0:.0f}" width="{x1 - x0}" height="{y1 - y0:.0f}" class="frame"/>',
    ]
    for i in range(5):  # horizontal grid and y labels
        value = y_max * i / 4
        y = sy(value)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" class="ylabel">{_num(value)}</text>')
    step = nice_ceiling(x_max / 8)
    tick = 0.0
    while tick <= x_max:  # x labels, in whole seconds
        x = sx(tick)
        out.append(
            f'<line x1="{x:.1f}" y1="{y1:.0f}" x2="{x:.1f}" y2="{y1 + 4:.0f}" class="axis"/>'
        )
        out.append(f'<text x="{x:.1f}" y="{y1 + 16:.0f}" class="xlabel">{_num(tick)}</text>')
        tick += step
    for index, line in enumerate(panel.lines):
        color = COLORS[index % len(COLORS)]
        for segment in _segments(line.values):
            if len(segment) == 1:
                x, v = segment[0]
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(v):.1f}" r="2" fill="{color}"/>')
                continue
            points = " ".join(f"{sx(x):.1f},{sy(v):.1f}" for x, v in segment)
            out.append(f'<polyline points="{points}" stroke="{color}" class="series"/>')
        ly = y0 + 14 + index * 18
        out.append(
            f'<line x1="{x1 + 12}" y1="{ly - 4:.0f}" x2="{x1 + 32}" y2="{ly - 4:.0f}" '
            f'stroke="{color}" stroke-width="2"/>'
        )
        out.append(f'<text x="{x1 + 38}" y="{ly:.0f}" class="legend">{escape(line.label)}</text>')
    return out


def render_svg(
    panels: Sequence[Panel], title: str, x_label: str = "seconds since the first publish"
) -> str:
    seconds = max((len(line.values) for p in panels for line in p.lines), default=0)
    height = TOP + PANEL_HEIGHT * len(panels) + 20
    body: list[str] = []
    for i, panel in enumerate(panels):
        body += _panel(panel, TOP + i * PANEL_HEIGHT, seconds)
    style = (
        "text{font-family:sans-serif;font-size:11px;fill:#333}"
        ".title{font-size:13px;font-weight:bold}.heading{font-size:14px;font-weight:bold}"
        ".ylabel{text-anchor:end}.xlabel{text-anchor:middle}"
        ".frame{fill:none;stroke:#999}.grid{stroke:#e4e4e4}.axis{stroke:#999}"
        ".series{fill:none;stroke-width:1.5;stroke-linejoin:round}"
    )
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}">',
            f"<style>{style}</style>",
            f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
            f'<text x="{LEFT}" y="22" class="heading">{escape(title)}</text>',
            *body,
            f'<text x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" y="{height - 6}" class="xlabel">'
            f"{escape(x_label)}</text>",
            "</svg>",
            "",
        ]
    )


def pipeline_panels(rows: Sequence[Mapping[str, Any]]) -> list[Panel]:
    """Panels from ``pipeline.timeseries`` rows of the JSON result."""
    workers = sorted({n for r in rows for n in r.get("rss_mib", {}) if n.startswith("worker")})
    # Processes that used at least 5 % of a core at some point: the rest is clutter.
    busy = sorted(
        {n for r in rows for n, v in r.get("cpu_pct", {}).items() if n != "bench" and v >= 5}
    )

    def column(key: str) -> list[float | None]:
        return [r.get(key) for r in rows]

    def per_process(key: str, name: str) -> list[float | None]:
        return [r.get(key, {}).get(name) for r in rows]

    return [
        Panel(
            "Throughput",
            "messages per second",
            [Line("published", column("published")), Line("replied", column("replies"))],
        ),
        Panel(
            "Latency of the replies seen each second",
            "ms, publish → ReplyProduced",
            [Line("p50", column("p50_ms")), Line("p99", column("p99_ms"))],
        ),
        Panel("Worker RSS", "MiB", [Line(n, per_process("rss_mib", n)) for n in workers]),
        Panel("CPU", "% of one core", [Line(n, per_process("cpu_pct", n)) for n in busy]),
    ]


def plot_result(result: Mapping[str, Any], path: Path) -> Path:
    """Write the SVG of a ``pipeline.py`` JSON result to ``path``."""
    p = result["pipeline"]
    rate = f"rate {p['rate']:g} msg/s" if p["rate"] else "unlimited rate"
    title = (
        f"kefu pipeline: {p['messages']} messages, {p['workers']} worker(s), {rate} — "
        f"measured {p['msgs_per_s']:.0f} msg/s, p99 {p['latency_ms']['p99']:.0f} ms "
        f"({result['date']})"
    )
    path.write_text(render_svg(pipeline_panels(p["timeseries"]), title), "utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot a bench/pipeline.py JSON result as SVG")
    parser.add_argument("result", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=None, help="default: next to it")
    args = parser.parse_args(argv)
    result = json.loads(args.result.read_text("utf-8"))
    out = plot_result(result, args.output or args.result.with_suffix(".svg"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
