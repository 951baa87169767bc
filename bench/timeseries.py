"""Per-second time series for the pipeline benchmark, and the soak verdict.

Each second of a run (from the first publish) gets: messages published, replies
seen, the latency p50/p99 of the replies seen in that second, and each process's RSS
and CPU% (read from /proc by a sampling thread, so a busy event loop in the bench
does not skew the clock). ``soak`` compares a worker's RSS after the warm-up with its
RSS at the end: the "flat over a 10-minute soak (no growth beyond 10%)" check.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
# A worker's RSS at a point is the mean over this many seconds: one sample can catch a
# transient (a batch in flight, a GC cycle not yet run).
RSS_WINDOW_S = 5
SOAK_LIMIT_PCT = 10.0


# ------------------------------------------------------------------------ /proc


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (VmRSS in /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # kB
    return None


@dataclass(frozen=True, slots=True)
class ProcSample:
    at: float  # monotonic seconds
    rss: dict[str, int]  # bytes, by process name
    cpu: dict[str, float]  # cumulative CPU seconds, by process name


def sample(pids: Mapping[str, int]) -> ProcSample:
    at = time.monotonic()
    rss: dict[str, int] = {}
    cpu: dict[str, float] = {}
    for name, pid in pids.items():
        r, c = rss_bytes(pid), cpu_seconds(pid)
        if r is not None and c is not None:
            rss[name], cpu[name] = r, c
    return ProcSample(at, rss, cpu)


class ProcSampler:
    """Samples the processes' RSS and CPU once a second, on the tick of ``origin``,
    in a daemon thread, until ``stop``."""

    def __init__(self, pids: Mapping[str, int], interval: float = 1.0) -> None:
        self._pids = dict(pids)
        self._interval = interval
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.origin = 0.0
        self.samples: list[ProcSample] = []

    def start(self, origin: float) -> None:
        self.origin = origin
        self.samples.append(sample(self._pids))
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tick = 1
        while True:
            delay = self.origin + tick * self._interval - time.monotonic()
            if self._stopped.wait(max(0.0, delay)):
                return
            self.samples.append(sample(self._pids))
            tick += 1

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._thread is None:
            return  # never started: nothing was published
        self._thread.join(timeout=5)
        self.samples.append(sample(self._pids))


# ------------------------------------------------------------------------ buckets


@dataclass
class SecondBuckets:
    """Messages published and replies seen (with their latency), per whole second
    after ``origin``."""

    origin: float
    published: list[int] = field(default_factory=list)
    replies: list[int] = field(default_factory=list)
    latency_ms: list[list[float]] = field(default_factory=list)

    def _second(self, at: float) -> int:
        second = max(0, int(at - self.origin))
        while len(self.published) <= second:
            self.published.append(0)
            self.replies.append(0)
            self.latency_ms.append([])
        return second

    def add_published(self, at: float) -> None:
        self.published[self._second(at)] += 1

    def add_reply(self, at: float, latency_ms: float) -> None:
        second = self._second(at)
        self.replies[second] += 1
        self.latency_ms[second].append(latency_ms)


def _quantile(sorted_ms: Sequence[float], q: float) -> float | None:
    if not sorted_ms:
        return None
    if len(sorted_ms) == 1:
        return round(sorted_ms[0], 1)
    return round(statistics.quantiles(sorted_ms, n=100, method="inclusive")[round(q * 100) - 1], 1)


# ------------------------------------------------------------------------ series


@dataclass(frozen=True, slots=True)
class SecondRow:
    """Second ``t`` of the run: [t, t+1) after the first publish."""

    t: int
    published: int
    replies: int
    p50_ms: float | None  # of the replies seen in this second
    p99_ms: float | None
    rss_mib: dict[str, float]  # at the end of the second
    cpu_pct: dict[str, float]  # of one CPU, over the second


def build_series(buckets: SecondBuckets, samples: Sequence[ProcSample]) -> list[SecondRow]:
    """Join the buckets with the process samples (sample k is taken at ``origin + k``)."""
    origin = buckets.origin
    by_second: dict[int, ProcSample] = {}
    for s in samples:
        by_second.setdefault(max(0, round(s.at - origin)), s)
    seconds = max(len(buckets.published), max(by_second, default=0))
    rows = []
    previous: ProcSample | None = by_second.get(0)
    last = samples[-1] if samples else None
    for t in range(seconds):
        end = by_second.get(t + 1)
        if end is None and t == seconds - 1 and last is not None and last.at - origin > t:
            end = last  # the final sample, taken when the run stopped mid-second
        rss: dict[str, float] = {}
        cpu: dict[str, float] = {}
        if end is not None:
            rss = {name: round(v / MIB, 1) for name, v in end.rss.items()}
            if previous is not None and end.at > previous.at:
                span = end.at - previous.at
                cpu = {
                    name: round((v - previous.cpu[name]) / span * 100, 1)
                    for name, v in end.cpu.items()
                    if name in previous.cpu
                }
            previous = end
        latencies = sorted(buckets.latency_ms[t]) if t < len(buckets.latency_ms) else []
        rows.append(
            SecondRow(
                t=t,
                published=buckets.published[t] if t < len(buckets.published) else 0,
                replies=buckets.replies[t] if t < len(buckets.replies) else 0,
                p50_ms=_quantile(latencies, 0.50),
                p99_ms=_quantile(latencies, 0.99),
                rss_mib=rss,
                cpu_pct=cpu,
            )
        )
    return rows


def series_table(rows: Sequence[SecondRow], names: Sequence[str], every: int = 1) -> str:
    """The series as text, one line per ``every`` seconds (the last second always)."""

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    head = f"  {'t s':>5} {'pub/s':>7} {'reply/s':>7} {'p50 ms':>7} {'p99 ms':>7}"
    head += "".join(f" {n + ' MiB':>14} {n + ' %':>12}" for n in names)
    lines = [head]
    for row in rows:
        if row.t % every and row.t != rows[-1].t:
            continue
        line = (
            f"  {row.t:>5} {row.published:>7} {row.replies:>7} "
            f"{cell(row.p50_ms):>7} {cell(row.p99_ms):>7}"
        )
        line += "".join(
            f" {cell(row.rss_mib.get(n)):>14} {cell(row.cpu_pct.get(n)):>12}" for n in names
        )
        lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------------------ soak


@dataclass(frozen=True, slots=True)
class SoakResult:
    warmup_s: int  # RSS "at start" is taken here
    end_s: int  # and "at the end" here (last full second sampled)
    rss_start_mib: dict[str, float]
    rss_end_mib: dict[str, float]
    growth_pct: dict[str, float]
    limit_pct: float
    flat: bool

    def lines(self) -> list[str]:
        out = []
        for name, start in self.rss_start_mib.items():
            end, growth = self.rss_end_mib[name], self.growth_pct[name]
            verdict = "flat" if growth <= self.limit_pct else "NOT FLAT"
            out.append(
                f"    {name:<10} RSS {start:7.1f} MiB at {self.warmup_s} s → {end:7.1f} MiB "
                f"at {self.end_s} s: {growth:+.1f} %  {verdict} (limit +{self.limit_pct:g} %)"
            )
        return out


def _mean_rss(rows: Sequence[SecondRow], name: str) -> float | None:
    values = [r.rss_mib[name] for r in rows if name in r.rss_mib]
    return statistics.fmean(values) if values else None


def soak(
    rows: Sequence[SecondRow],
    names: Sequence[str],
    warmup_s: int,
    limit_pct: float = SOAK_LIMIT_PCT,
) -> SoakResult | None:
    """Each named process's RSS just after ``warmup_s`` against its RSS over the last
    seconds, each the mean over ``RSS_WINDOW_S`` seconds. None if the run is too short
    to have both windows apart."""
    sampled = [r for r in rows if r.rss_mib]
    if not sampled:
        return None
    start_rows = [r for r in sampled if warmup_s <= r.t < warmup_s + RSS_WINDOW_S]
    end_rows = sampled[-RSS_WINDOW_S:]
    if not start_rows or end_rows[0].t < start_rows[-1].t:
        return None
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    growth: dict[str, float] = {}
    for name in names:
        a, b = _mean_rss(start_rows, name), _mean_rss(end_rows, name)
        if a is None or b is None or a <= 0:
            continue
        start[name], end[name] = round(a, 1), round(b, 1)
        growth[name] = round((b - a) / a * 100, 2)
    if not growth:
        return None
    return SoakResult(
        warmup_s=start_rows[0].t,
        end_s=end_rows[-1].t,
        rss_start_mib=start,
        rss_end_mib=end,
        growth_pct=growth,
        limit_pct=limit_pct,
        flat=all(g <= limit_pct for g in growth.values()),
    )


def nan_array_value(value: float) -> float | None:
    """``None`` for a NaN slot (never set), else the value."""
    return None if math.isnan(value) else value
