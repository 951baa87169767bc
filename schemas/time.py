"""Clock helpers: kefu timestamps are epoch milliseconds (Avro ``long``)."""

import datetime
import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso_ms(ms: int) -> str:
    """An epoch-milliseconds time as ISO 8601 UTC (``2026-11-21T17:19:05.254Z``)."""
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
