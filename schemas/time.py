"""Clock helpers: kefu timestamps are epoch milliseconds (Avro ``long``)."""

import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000
