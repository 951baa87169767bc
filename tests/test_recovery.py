"""streams.recovery: a changelog partition assigned while a recovery finished has no
start offset yet; Faust sought it to None and the worker crashed."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest
from faust.types import TP

from schemas.topics import TopicNames
from streams import faust_private
from streams.app import StreamsConfig, build_app
from streams.recovery import Recovery

KNOWN = TP("kefu-conversations-changelog", 1)
LATE = TP("kefu-conversations-changelog", 3)  # assigned by a rebalance mid-recovery


class SeekingConsumer:
    """Checks each seek as aiokafka's consumer does."""

    def __init__(self) -> None:
        self.sought: dict[TP, int] = {}
        self.resumed: set[TP] = set()

    def resume_partitions(self, tps: Any) -> None:
        self.resumed.update(tps)

    async def seek_wait(self, offsets: dict[TP, Any]) -> None:
        for tp, offset in offsets.items():
            if not isinstance(offset, int) or offset < 0:
                raise ValueError("Offset must be a positive integer")  # aiokafka's check
            self.sought[tp] = offset


def _seek(
    recovery_class: type[faust_private.HookedRecovery], offsets: Counter[TP]
) -> SeekingConsumer:
    consumer = SeekingConsumer()
    recovery = recovery_class.__new__(recovery_class)  # seek_offsets needs no state

    async def run() -> None:
        await recovery.seek_offsets(cast(Any, consumer), {KNOWN, LATE}, offsets, "standby")

    asyncio.run(run())
    return consumer


def _offsets() -> Counter[TP]:
    offsets: Counter[TP] = Counter()
    offsets[KNOWN] = 87
    offsets.setdefault(LATE, None)  # type: ignore[arg-type]  # as Faust's Recovery leaves it
    return offsets


def test_faust_seeks_a_partition_without_an_offset_to_none_and_fails() -> None:
    with pytest.raises(ValueError, match="positive integer"):
        _seek(faust_private.HookedRecovery, _offsets())  # the hook's default: Faust's


def test_ours_reads_such_a_partition_from_its_beginning() -> None:
    consumer = _seek(Recovery, _offsets())
    assert consumer.sought == {KNOWN: 87, LATE: 0}


def test_the_app_recovers_its_tables_with_ours(tmp_path: Path) -> None:
    kefu = build_app(
        StreamsConfig(
            app_id="test-recovery",
            broker="127.0.0.1:9",  # never connected
            partitions=4,
            datadir=tmp_path,
            topics=TopicNames(""),
            web_enabled=False,
        )
    )
    assert isinstance(cast(Any, kefu.app.tables).recovery, Recovery)


class FakeApp:
    def __init__(self, consumer: SeekingConsumer) -> None:
        self.consumer = consumer


def test_a_stalled_partition_is_sought_again_from_the_offset_recovery_needs() -> None:
    consumer = SeekingConsumer()
    recovery = Recovery.__new__(Recovery)
    recovery.app = cast(Any, FakeApp(consumer))
    # Faust's private state, as a recovery started at 100 s leaves it.
    recovery._recovery_started_at = 100.0
    recovery.active_highwaters = Counter({KNOWN: 63, LATE: 7, TP("t-changelog", 0): 5})
    recovery.active_offsets = Counter({KNOWN: 40, LATE: -1, TP("t-changelog", 0): 5})
    # KNOWN had a record at 105; LATE none since the start; the third is done.
    recovery._active_events_received_at = {KNOWN: 105.0}

    assert asyncio.run(recovery.seek_stalled(now=108.0)) == {}  # not 10 s yet
    assert asyncio.run(recovery.seek_stalled(now=111.0)) == {LATE: 0}
    assert consumer.sought == {LATE: 0} and consumer.resumed == {LATE}
    assert asyncio.run(recovery.seek_stalled(now=116.0)) == {KNOWN: 41}
    # Each seek gives the partition another stall_after_s.
    assert asyncio.run(recovery.seek_stalled(now=118.0)) == {}
