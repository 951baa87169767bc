"""A fault run: customers keep talking while the stack is broken piece by piece.

On a private stack (tests/fault_stack.py: Kafka, Redis, the ClickHouse projector,
two workers, gateway, webhook sink), customers send waves of messages through the
REST API, one per conversation, and each fault is injected while a wave is in
flight: a worker SIGKILLed and restarted (``--kills`` times, alternating workers),
the broker restarted, Redis restarted, Redis flushed, the ClickHouse projector
SIGKILLed (started again after a wave without it). Then every reply, the log, Redis
and ClickHouse are checked (no message lost, none duplicated, each conversation in
order) and the figures printed:

- **sent / delivered / duplicates**: messages, distinct replies at the webhook, and
  two different replies to one message (must be 0); **redelivered** counts the same
  reply POSTed again under its idempotency key (the tenant's endpoint drops it);
- per fault, **progress** (from the fault to the first reply of a conversation that
  was waiting when it hit) and **caught up** (to the last of them); for ClickHouse,
  from its restart to the read model matching the log.

``--guarantee`` runs it with Faust's ``processing_guarantee`` at_least_once,
exactly_once or both (one stack each). ``--record`` appends a row per run to
bench/RESULTS.md.

    .venv/bin/python bench/faults.py --record
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline import machine
from kefu.processes import wait_until
from tests.fake_openai import FakeOpenAI
from tests.fault_stack import (
    Customers,
    FaultStack,
    Report,
    clickhouse_matches,
    decode_events,
    fault_settings,
    read_log,
    verify,
)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Faults"


@dataclass(slots=True)
class FaultFigure:
    fault: str
    progress_s: float | None
    caught_up_s: float | None
    action_s: float  # how long the fault itself took (kill + restart, broker restart)


@dataclass(slots=True)
class FaultRun:
    guarantee: str
    report: Report
    figures: list[FaultFigure] = field(default_factory=list)
    seconds: float = 0.0
    load_start: float = 0.0
    load_end: float = 0.0
    error: str = ""

    def max_caught_up(self) -> float:
        return max((f.caught_up_s or 0.0 for f in self.figures), default=0.0)


def _load() -> float:
    return os.getloadavg()[0]


def run_faults(guarantee: str, conversations: int, kills: int, keep: Path | None) -> FaultRun:
    state_dir = Path(tempfile.mkdtemp(prefix="kefu-faults-"))
    fake = FakeOpenAI().start()
    settings = fault_settings(
        state_dir, fake.base_url, exactly_once=guarantee == "exactly_once", log_level="WARNING"
    )
    stack = FaultStack(settings)
    customers = Customers(settings, conversations)
    run = FaultRun(guarantee, Report(), load_start=_load())
    started = time.monotonic()
    try:
        print(f"[{guarantee}] private stack in {state_dir} ...", flush=True)
        print(f"  ready after {stack.up():.1f} s", flush=True)

        def wave(name: str, fault: Callable[[], None] | None = None) -> None:
            result = asyncio.run(customers.wave(fault, at=0.3, limit_s=180.0))
            if fault is not None:
                figure = FaultFigure(
                    name, result.progress_s, result.caught_up_s, result.fault_seconds
                )
                run.figures.append(figure)
                print(
                    f"  {name:<22} progress {_s(figure.progress_s)}  caught up "
                    f"{_s(figure.caught_up_s)}  (fault took {figure.action_s:.1f} s)",
                    flush=True,
                )

        wave("warm-up")
        for k in range(kills):
            index = k % 2

            def kill(index: int = index) -> None:
                stack.kill_worker(index)
                stack.start_worker(index)

            wave(f"SIGKILL worker-{index} #{k + 1}", kill)
        wave("Kafka restarted", stack.restart_kafka)
        wave("Redis restarted", stack.restart_redis)
        wave("Redis flushed", stack.flush_redis)
        wave("ClickHouse killed", stack.kill_clickhouse)
        wave("(ClickHouse down)")
        restarted = time.monotonic()
        stack.start_clickhouse()
        events = decode_events(asyncio.run(read_log(settings, [stack.names.events])))
        last: dict[str, int] = {}
        for e in events:
            last[e.conversation_id] = max(last.get(e.conversation_id, 0), e.seq)
        wait_until(lambda: clickhouse_matches(stack, last), timeout=180.0, what="ClickHouse")
        caught = time.monotonic() - restarted
        run.figures.append(FaultFigure("ClickHouse back", None, caught, 0.0))
        print(f"  ClickHouse caught up {caught:.1f} s after its restart", flush=True)
        wave("final")
        run.report = verify(stack, customers)
    except Exception as exc:  # reported, not raised: the row says what broke
        run.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(f"  FAILED: {run.error}", flush=True)
        try:  # what did get through, for the record
            run.report = verify(stack, customers, timeout=20.0)
        except Exception:
            run.report = Report(messages=len(customers.sent))
        run.report.problems.insert(0, run.error)
        crashes = sorted(
            {
                f"{log.stem} crashed: {m.group(1)}"
                for log in stack.log_dir().glob("worker-*.log")
                for m in re.finditer(r"Crashed reason=(\w+)", log.read_text("utf-8", "replace"))
            }
        )
        if crashes:
            run.error += " (" + "; ".join(crashes) + ")"
    finally:
        run.seconds = time.monotonic() - started
        run.load_end = _load()
        try:
            stack.down()
            if keep is not None:
                target = keep / guarantee
                target.mkdir(parents=True, exist_ok=True)
                for log in state_dir.glob("*/*.log"):
                    shutil.copy2(log, target / log.name)
        finally:
            fake.stop()
            shutil.rmtree(state_dir, ignore_errors=True)
    return run


def _s(value: float | None) -> str:
    return "   -  " if value is None else f"{value:5.1f}s"


def summary(run: FaultRun) -> str:
    r = run.report
    kills = [f.caught_up_s or 0.0 for f in run.figures if f.fault.startswith("SIGKILL")]
    lines = [
        f"processing_guarantee={run.guarantee}: "
        + ("HOLDS" if r.ok() else f"FAILS ({len(r.problems)} problems)"),
        f"  sent {r.messages}, delivered {r.delivered}, duplicate replies "
        f"{r.duplicate_replies}, redelivered (same key) {r.redelivered}, "
        f"event copies on the log {r.log_duplicates}",
        f"  max caught-up after a SIGKILL {max(kills, default=0.0):.1f} s; "
        f"max after any fault {run.max_caught_up():.1f} s; run {run.seconds:.0f} s; "
        f"load {run.load_start:.1f} → {run.load_end:.1f}",
    ]
    lines += [f"  ! {p}" for p in r.problems[:10]]
    return "\n".join(lines)


def _note(run: FaultRun) -> str:
    if not run.error:
        return ""
    return run.error.replace("|", "/")[:160]


def _figure(run: FaultRun, prefix: str) -> str:
    values = [f.caught_up_s or 0.0 for f in run.figures if f.fault.startswith(prefix)]
    return f"{max(values):.1f}" if values else "-"


def record(runs: Sequence[FaultRun], command: str, machine_line: str) -> None:
    header = (
        f"{SECTION}\n\n"
        "Recorded by `bench/faults.py --record`: customers send waves of messages "
        "(one per conversation, REST API, retried under the same message id until "
        "accepted) while a fault hits mid-wave: a worker of two SIGKILLed and restarted "
        "(5×, alternating), the broker restarted, Redis restarted, Redis flushed (the "
        "model rebuilt from the log), the ClickHouse projector SIGKILLed for a wave. "
        "**dup** = two different replies to one message; **redeliv** = the same reply "
        "POSTed again under its idempotency key (dropped by the endpoint). Recovery = "
        "from the fault to the last reply that was waiting when it hit (ClickHouse: "
        "from its restart to matching the log). **load** = 1-minute load average at "
        "start → end (2 = both cores busy).\n\n"
        "| date | machine | command | guarantee | holds | sent | delivered | dup | "
        "redeliv | log copies | max SIGKILL s | Kafka s | Redis restart s | Redis flush s "
        "| ClickHouse s | load | note |\n"
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n"
    )
    text = RESULTS.read_text("utf-8")
    if SECTION not in text:
        text = text.rstrip("\n") + "\n\n" + header
    rows = ""
    for run in runs:
        r = run.report
        rows += (
            f"| {date.today().isoformat()} | {machine_line} | `{command}` | {run.guarantee} "
            f"| {'yes' if r.ok() else 'NO'} | {r.messages} | {r.delivered} | "
            f"{r.duplicate_replies} | {r.redelivered} | {r.log_duplicates} | "
            f"{_figure(run, 'SIGKILL')} | {_figure(run, 'Kafka')} | "
            f"{_figure(run, 'Redis restarted')} | {_figure(run, 'Redis flushed')} | "
            f"{_figure(run, 'ClickHouse back')} | {run.load_start:.1f} → {run.load_end:.1f} "
            f"| {_note(run)} |\n"
        )
    # Rows go at the end of this section's table.
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    end = len(text) if end == -1 else end
    section = text[start:end].rstrip("\n") + "\n" + rows
    rest = text[end:].lstrip("\n")
    RESULTS.write_text(text[:start] + section + ("\n" + rest if rest else ""), "utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=40)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument(
        "--guarantee", choices=["at_least_once", "exactly_once", "both"], default="both"
    )
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the logs here")
    args = parser.parse_args(argv)
    modes = ["at_least_once", "exactly_once"] if args.guarantee == "both" else [args.guarantee]
    runs = [run_faults(mode, args.conversations, args.kills, args.keep_logs) for mode in modes]
    print()
    for run in runs:
        print(summary(run))
    if args.record:
        from kefu.settings import Settings

        m = machine(Settings())
        cpu = " ".join(m.cpu_model.split()[:2])
        given = sys.argv[1:] if argv is None else list(argv)
        command = " ".join([".venv/bin/python bench/faults.py", *given])
        record(runs, command, f"{m.cpus}× {cpu}, Python {m.python}, faust {m.faust}")
        print(f"recorded in {RESULTS}")
    return 0 if all(run.report.ok() for run in runs if run.guarantee == "at_least_once") else 1


if __name__ == "__main__":
    sys.exit(main())
