"""streams.recovery: a changelog partition assigned while a recovery finished has no
start offset yet; Faust sought it to None and the worker crashed."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest
from faust.tables.recovery import Recovery as FaustRecovery
from faust.types import TP

from schemas.topics import TopicNames
from streams.app import StreamsConfig, build_app
from streams.recovery import Recovery

KNOWN = TP("kefu-conversations-changelog", 1)
LATE = TP("kefu-conversations-changelog", 3)  # assigned by a rebalance mid-recovery


class SeekingConsumer:
    """Checks each seek as aiokafka's consumer does."""

    def __init__(self) -> None:
        self.sought: dict[TP, int] = {}

    async def seek_wait(self, offsets: dict[TP, Any]) -> None:
        for tp, offset in offsets.items():
            if not isinstance(offset, int) or offset < 0:
                raise ValueError("Offset must be a positive integer")  # aiokafka's check
            self.sought[tp] = offset


def _seek(recovery_class: type[FaustRecovery], offsets: Counter[TP]) -> SeekingConsumer:
    consumer = SeekingConsumer()
    recovery = recovery_class.__new__(recovery_class)  # _seek_offsets needs no state

    async def run() -> None:
        await recovery._seek_offsets(cast(Any, consumer), {KNOWN, LATE}, offsets, "standby")

    asyncio.run(run())
    return consumer


def _offsets() -> Counter[TP]:
    offsets: Counter[TP] = Counter()
    offsets[KNOWN] = 87
    offsets.setdefault(LATE, None)  # type: ignore[arg-type]  # as Recovery._add leaves it
    return offsets


def test_faust_seeks_a_partition_without_an_offset_to_none_and_fails() -> None:
    with pytest.raises(ValueError, match="positive integer"):
        _seek(FaustRecovery, _offsets())


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
