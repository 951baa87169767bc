"""``kefu bench``: the standard benchmark set, each step bounded in time (registered
in kefu/cli.py).

1. throughput: ``bench/pipeline.py`` unpaced (capacity, with the Kafka baseline);
2. latency: ``bench/pipeline.py`` paced at half the rate step 1 measured, for a fixed
   duration (also reports worker RSS after the warm-up against the end);
3. replay: ``bench/replay.py`` (rebuild Redis and ClickHouse from the log);
4. moderation: ``bench/moderation.py`` (µs per message, no stack);
5. attachments: ``bench/attachments.py`` (text-only against 20 % photo messages at the
   gateway; upload → visible at 20 photos/s).

The scripts live in ``bench/`` next to the package (a source checkout), so they run as
subprocesses of this interpreter; each step's output goes to the terminal and to a log
in the output directory, the pipeline steps also write a JSON result and an SVG plot.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import click

import kefu

# Beyond its own --timeout, a step gets this long to stop its stack before it is killed.
TEARDOWN_S = 180.0


def bench_dir() -> Path:
    return Path(kefu.__file__).resolve().parent.parent / "bench"


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    script: str
    args: list[str]
    timeout_s: float  # the step's own bound; we kill it TEARDOWN_S later at the latest


@dataclass(frozen=True, slots=True)
class Outcome:
    name: str
    code: int | None  # None: skipped
    seconds: float
    log: Path | None
    figure: str


def run_step(step: Step, out: Path) -> Outcome:
    """Run one script, its output shown and kept; terminated if it overruns."""
    script = bench_dir() / step.script
    log = out / f"{step.name}.log"
    argv = [sys.executable, str(script), *step.args]
    click.echo(f"\n== {step.name}: {' '.join(argv[1:])}")
    started = time.monotonic()
    with (
        log.open("w", encoding="utf-8") as sink,
        subprocess.Popen(
            argv,
            cwd=script.parent.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        ) as proc,
    ):
        # SIGTERM first: the scripts unwind through their finally and stop their stack.
        stop = threading.Timer(step.timeout_s + TEARDOWN_S, proc.terminate)
        kill = threading.Timer(step.timeout_s + TEARDOWN_S + 60.0, proc.kill)
        stop.start()
        kill.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                click.echo(line, nl=False)
                sink.write(line)
            code = proc.wait()
        finally:
            stop.cancel()
            kill.cancel()
    return Outcome(step.name, code, time.monotonic() - started, log, "")


def _pipeline_figures(path: Path) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = json.loads(path.read_text("utf-8"))["pipeline"]
    except (OSError, ValueError, KeyError):
        return None
    return result


def _describe(figures: dict[str, Any] | None) -> str:
    if figures is None:
        return "no result"
    lat = figures["latency_ms"]
    text = (
        f"{figures['msgs_per_s']:.0f} msg/s, p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, "
        f"missing {figures['missing']}, dup {figures['duplicates']}"
    )
    if figures.get("soak") is not None:
        growth = max(figures["soak"]["growth_pct"].values(), default=0.0)
        text += f", worker RSS {growth:+.1f} %"
    return text


@click.command("bench")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="results directory (default bench/out/<date-time>)",
)
@click.option("--messages", default=20_000, show_default=True, help="throughput step: messages")
@click.option("--conversations", default=200, show_default=True)
@click.option("--workers", default=1, show_default=True, help="worker processes (pipeline)")
@click.option(
    "--latency-duration",
    default=60.0,
    show_default=True,
    help="latency step: seconds at half the measured rate",
)
@click.option("--replay-events", default=200_000, show_default=True, help="replay step: events")
@click.option("--step-timeout", default=900.0, show_default=True, help="seconds each step may run")
@click.option(
    "--only",
    type=click.Choice(["throughput", "latency", "replay", "moderation", "attachments"]),
    multiple=True,
    help="run only these steps (repeatable); latency needs throughput's rate or --rate",
)
@click.option("--rate", default=0.0, help="latency step: msg/s (default: half of throughput)")
@click.option("--record", is_flag=True, help="each script appends its row to bench/RESULTS.md")
def bench(
    out: Path | None,
    messages: int,
    conversations: int,
    workers: int,
    latency_duration: float,
    replay_events: int,
    step_timeout: float,
    only: tuple[str, ...],
    rate: float,
    record: bool,
) -> None:
    """Run the standard benchmarks (each bounded) and say where the results went."""
    if not (bench_dir() / "pipeline.py").exists():
        raise click.ClickException(f"no {bench_dir()}/pipeline.py: kefu bench needs a checkout")
    steps = set(only) or {"throughput", "latency", "replay", "moderation", "attachments"}
    out = out or bench_dir() / "out" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    recording = ["--record"] if record else []
    timeout = ["--timeout", f"{step_timeout:g}"]
    common = ["--conversations", str(conversations), "--workers", str(workers)]
    outcomes: list[Outcome] = []

    full = out / "pipeline-full.json"
    if "throughput" in steps:
        args = ["--messages", str(messages), *common, "--json", str(full), *timeout]
        done = run_step(Step("throughput", "pipeline.py", [*args, *recording], step_timeout), out)
        outcomes.append(_with_figure(done, _describe(_pipeline_figures(full))))

    if "latency" in steps:
        measured = _pipeline_figures(full)
        half = rate or (measured["msgs_per_s"] / 2 if measured else 0.0)
        if half <= 0:
            outcomes.append(Outcome("latency", None, 0.0, None, "skipped: no rate measured"))
        else:
            paced = out / "pipeline-half.json"
            bound = max(step_timeout, latency_duration + 300)
            args = [
                "--rate",
                f"{half:.0f}",
                "--duration",
                f"{latency_duration:g}",
                *common,
                "--json",
                str(paced),
                "--timeout",
                f"{bound:g}",
            ]
            done = run_step(Step("latency", "pipeline.py", [*args, *recording], bound), out)
            outcomes.append(_with_figure(done, _describe(_pipeline_figures(paced))))

    if "replay" in steps:
        args = ["--events", str(replay_events), *timeout, *recording]
        done = run_step(Step("replay", "replay.py", args, step_timeout), out)
        outcomes.append(_with_figure(done, _log_line(done.log, "replay into all")))

    if "moderation" in steps:
        done = run_step(Step("moderation", "moderation.py", recording, step_timeout), out)
        outcomes.append(_with_figure(done, _log_line(done.log, "by CPU time: check")))

    if "attachments" in steps:
        args = ["--timeout", f"{step_timeout:g}", *recording]
        done = run_step(Step("attachments", "attachments.py", args, step_timeout), out)
        outcomes.append(_with_figure(done, _log_line(done.log, "attachments: mixed")))

    click.echo(f"\nkefu bench: results in {out}")
    for o in outcomes:
        status = "skipped" if o.code is None else ("ok" if o.code == 0 else f"exit {o.code}")
        click.echo(f"  {o.name:<11}{status:<9}{o.seconds:7.0f} s  {o.figure}")
    for path in sorted(out.iterdir()):
        click.echo(f"    {path}")
    if record:
        click.echo(f"  rows appended to {bench_dir() / 'RESULTS.md'}")
    if any(o.code not in (0, None) for o in outcomes):
        raise SystemExit(1)


def _log_line(log: Path | None, containing: str) -> str:
    """The last line of a step's log with ``containing``: its headline figure."""
    if log is None or not log.exists():
        return ""
    lines = [x.strip() for x in log.read_text("utf-8").splitlines() if containing in x]
    return lines[-1] if lines else ""


def _with_figure(outcome: Outcome, figure: str) -> Outcome:
    return Outcome(outcome.name, outcome.code, outcome.seconds, outcome.log, figure)
