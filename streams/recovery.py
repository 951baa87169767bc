"""Table recovery with one race of faust-streaming 0.15.3 closed.

A rebalance that lands while a recovery is finishing adds changelog partitions whose
start offset is not read yet (``None`` in Faust's offset counters). Faust then seeks
them to ``None``, aiokafka refuses ("Offset must be a positive integer"), and the
worker crashes (seen in the fault tests: a worker restarted after a SIGKILL died this
way when the other one rejoined). Such a partition is read from its beginning, as
Faust does for a partition with no offset (-1); the next recovery round reads the real
offsets anyway.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from faust.tables.manager import TableManager as FaustTableManager
from faust.tables.recovery import Recovery as FaustRecovery
from faust.types import TP


class Recovery(FaustRecovery):
    async def _seek_offsets(
        self, consumer: Any, tps: Any, offsets: Counter[TP], title: str
    ) -> None:
        for tp in tps:
            if offsets.get(tp) is None:
                offsets[tp] = -1  # Faust seeks -1 to the partition's beginning
        await super()._seek_offsets(consumer, tps, offsets, title)


class TableManager(FaustTableManager):
    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = Recovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery  # type: ignore[return-value]
