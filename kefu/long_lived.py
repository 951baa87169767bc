"""Keeping a long-running process's long-lived objects out of the cyclic GC's scans.

CPython's full collection walks every tracked object. A worker holds its modules,
Faust's machinery and a table of conversation states (hundreds of thousands of
objects), and each full collection walked them all: perf put the collector at ~10 %
of the worker's CPU at full speed, ~5.6 % with this (bench/RESULTS.md "Hot path"). The
gateway's held sockets are the same problem (a 2.2 s stall with 20,000 sockets).

What has lived ``freeze_s`` is frozen (``gc.freeze``: never scanned again, still
freed by reference counting when it is dropped); every ``full_s`` it is thawed and
collected once, so garbage cycles among frozen objects cannot pile up.
"""

from __future__ import annotations

import asyncio
import gc
import time


async def keep_long_lived_out_of_gc(freeze_s: float, full_s: float) -> None:
    """Runs until cancelled; ``freeze_s`` <= 0 does nothing."""
    if freeze_s <= 0:
        return
    last_full = time.monotonic()
    while True:
        await asyncio.sleep(freeze_s)
        if time.monotonic() - last_full >= full_s:
            gc.unfreeze()
            gc.collect()
            last_full = time.monotonic()
        gc.freeze()
