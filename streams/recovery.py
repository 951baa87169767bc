"""Table recovery with two faults of faust-streaming 0.15.3 handled.

A rebalance that lands while a recovery is finishing adds changelog partitions whose
start offset is not read yet (``None`` in Faust's offset counters). Faust then seeks
them to ``None``, aiokafka refuses ("Offset must be a positive integer"), and the
worker crashes (seen in the fault tests: a worker restarted after a SIGKILL died this
way when the other one rejoined). Such a partition is read from its beginning, as
Faust does for a partition with no offset (-1); the next recovery round reads the real
offsets anyway.

And a recovery could wait forever: when a worker left the group seconds after joining,
the one that took its changelog partitions back (read until then as a standby) sought
them to their beginning and never received their records ("No event received for
active tp", every few seconds, for good; a test in ``tests/test_routing.py`` makes a
worker leave so).
A partition still behind its highwater that has had no record for ``stall_after_s``
is sought again from the next offset recovery needs.
"""

from __future__ import annotations

import logging
from collections import Counter
from time import monotonic
from typing import Any

from faust.types import TP
from mode import Service

from streams import faust_private

log = logging.getLogger(__name__)


class Recovery(faust_private.HookedRecovery):
    stall_after_s: float = 10.0

    async def seek_offsets(
        self, consumer: Any, tps: set[TP], offsets: Counter[TP], title: str
    ) -> None:
        for tp in tps:
            if offsets.get(tp) is None:
                offsets[tp] = -1  # Faust seeks -1 to the partition's beginning
        await super().seek_offsets(consumer, tps, offsets, title)

    @Service.task
    async def _repair_stalls(self) -> None:
        async for _ in self.itertimer(self.stall_after_s / 2, name="Recovery.repair_stalls"):
            if self.in_recovery:
                await self.seek_stalled(monotonic())

    async def seek_stalled(self, now: float) -> dict[TP, int]:
        """Seek again the active changelog partitions that are behind and have had no
        record for ``stall_after_s``; returns what it sought."""
        started = faust_private.recovery_started_at(self)
        if started is None:
            return {}
        received = faust_private.active_events_received_at(self)
        stalled: dict[TP, int] = {}
        for tp, remaining in self.active_remaining().items():
            if remaining > 0 and now - received.get(tp, started) >= self.stall_after_s:
                offset = self.active_offsets[tp]
                stalled[tp] = offset + 1 if offset is not None and offset >= 0 else 0
        if stalled:
            log.warning(
                "Changelog partitions had no record for %.0f s of recovery: seeking them "
                "again from %s",
                self.stall_after_s,
                ", ".join(f"{tp.topic}-{tp.partition}@{o}" for tp, o in sorted(stalled.items())),
            )
            # Resumed as recovery resumes its partitions when it starts: records of a
            # partition the consumer counts as paused are fetched and then dropped.
            self.app.consumer.resume_partitions(stalled)
            await self.app.consumer.seek_wait(stalled)
            for tp in stalled:
                received[tp] = now  # the next try gets as long
        return stalled


class TableManager(faust_private.HookedTableManager):
    recovery_class = Recovery
