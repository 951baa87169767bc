"""REST ingest: accepted POST /v1/messages per second by one gateway process.

Starts a private stack on free ports and drives the gateway with wrk (Debian's
package; installed if missing by scripts/ensure-system.sh's apt path, or by hand)
from loopback, bounded in time. Each request carries a unique message id (so every
one is a new command, durable in Kafka before the 202).

    .venv/bin/python bench/rest_ingest.py [--seconds 15] [--connections 64] [--record]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from kefu.cli import stack_down_all, stack_up_all
from kefu.local import private_settings
from kefu.services import Services

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# wrk's Lua: a new message id per request, so none is a resend.
SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Api-Key"] = "demo-key"
counter = 0
request = function()
  counter = counter + 1
  local body = string.format(
    '{"customer_id": "c%d", "text": "where is my order?", "message_id": "%s-%d"}',
    counter % 1000, tostring({}):sub(8), counter)
  return wrk.format(nil, "/v1/messages", nil, body)
end
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    state = Path(tempfile.mkdtemp(prefix="kefu-bench-rest-"))
    settings = private_settings(state)
    services = Services(settings)
    script = state / "post.lua"
    try:
        stack_up_all(settings)
        # Only the gateway: ingest is measured, not the pipeline behind it.
        services.start([services.gateway()])
        script.write_text(SCRIPT)
        out = subprocess.run(
            [
                wrk,
                "-t2",
                f"-c{args.connections}",
                f"-d{args.seconds}s",
                "--latency",
                "-s",
                str(script),
                f"http://127.0.0.1:{settings.gateway.port}",
            ],
            capture_output=True,
            text=True,
            timeout=args.seconds + 60,
            check=True,
        ).stdout
    finally:
        stack_down_all(settings)
        shutil.rmtree(state, ignore_errors=True)
    print(out)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+\w+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    load = os.getloadavg()[0]
    print(f"{rate:,.0f} requests/s accepted; p99 {p99.group(1) if p99 else '?'}; load {load:.1f}")
    if args.record:
        text = RESULTS.read_text("utf-8")
        if "## REST ingest" not in text:
            text += (
                "\n## REST ingest\n\nRecorded by `bench/rest_ingest.py --record`: wrk (2 "
                "threads) against one gateway process, POST /v1/messages with a new message "
                "id each, 202 only once the command is durable in Kafka (acks=all). The "
                "gateway, Kafka and wrk share the 2 cores.\n\n"
                "| date | command | connections | requests/s | p99 | non-2xx | load |\n"
                "|---|---|---:|---:|---:|---:|---:|\n"
            )
        text += (
            f"| 2026-11-21 | `.venv/bin/python bench/rest_ingest.py --seconds {args.seconds} "
            f"--connections {args.connections} --record` | {args.connections} | {rate:,.0f} | "
            f"{p99.group(1) if p99 else '?'} | {non2xx.group(1) if non2xx else 0} | {load:.1f} |\n"
        )
        RESULTS.write_text(text, "utf-8")


if __name__ == "__main__":
    main()
