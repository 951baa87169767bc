"""The consumer's offset bookkeeping (streams/consumer.py): a committed offset never
moves over a record no agent processed in the current generation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message

from schemas.topics import TopicNames
from streams import faust_private
from streams.app import StreamsConfig, build_app
from streams.consumer import Consumer, HoleWatch, InOrder, take_committable

COMMANDS = TP("kefu.commands", 3)


def test_the_run_from_the_committed_offset_is_taken() -> None:
    acked = [93, 90, 91, 92, 97]
    assert list(take_committable(90, acked)) == [90, 91, 92, 93]
    assert acked == [97]  # left for later: 94..96 are not acked yet


def test_nothing_is_committable_while_the_record_at_the_committed_offset_is_missing() -> None:
    # Faust 0.15.3 commits 109 here: one missing record at the head is tolerated.
    acked = list(range(91, 109))
    assert take_committable(90, acked) == ()
    assert acked == list(range(91, 109))  # kept until 90 is acked


def test_without_a_committed_offset_the_first_run_counts() -> None:
    acked = [5, 6, 8]
    assert list(take_committable(None, acked)) == [5, 6]
    assert take_committable(0, []) == ()


def test_a_hole_nobody_holds_is_due_before_one_an_agent_holds() -> None:
    watch = HoleWatch(lost_after=0.0, stuck_after=3600.0)
    other = TP("kefu.events", 0)
    watch.seen(COMMANDS, 90)
    watch.seen(other, 7)
    assert watch.due(in_flight={(other, 7)}) == [(COMMANDS, 90)]
    assert watch  # the held one is still watched
    watch.closed(other)
    assert not watch


def test_a_moving_hole_starts_its_clock_again() -> None:
    watch = HoleWatch(lost_after=3600.0, stuck_after=3600.0)
    watch.seen(COMMANDS, 90)
    watch.seen(COMMANDS, 95)
    assert watch.due(in_flight=set()) == []
    watch.forget([COMMANDS])
    assert not watch


@pytest.fixture
def consumer(tmp_path: Path) -> Iterator[Any]:
    kefu = build_app(
        StreamsConfig(
            app_id="test-consumer",
            broker="127.0.0.1:9",  # never connected: bookkeeping only
            partitions=4,
            datadir=tmp_path,
            topics=TopicNames(""),
            web_enabled=False,
        )
    )
    app = kefu.app
    app.consumer_generation_id = 7
    consumer = app.consumer
    assert isinstance(consumer, Consumer)
    yield consumer


def _message(offset: int, generation_id: int) -> Message:
    return Message(
        COMMANDS.topic,
        COMMANDS.partition,
        offset,
        timestamp=0.0,
        timestamp_type=0,
        headers=None,
        key=b"k",
        value=b"v",
        checksum=None,
        tp=COMMANDS,
        generation_id=generation_id,
    )


def test_the_consumer_holds_its_commit_at_a_missing_record(consumer: Any) -> None:
    faust_private.committed_offsets(consumer)[COMMANDS] = 90
    faust_private.acked(consumer)[COMMANDS] = list(range(91, 109))
    faust_private.acked_index(consumer)[COMMANDS] = set(range(91, 109))
    assert consumer.next_commit_offset(COMMANDS) is None
    assert consumer._holes  # watched, to be delivered again if it stays missing
    # Faust's own rule commits over offset 90: the loss this consumer prevents.
    assert faust_private.HookedConsumer.next_commit_offset(consumer, COMMANDS) == 109


def test_the_consumer_commits_once_the_missing_record_is_acked(consumer: Any) -> None:
    faust_private.committed_offsets(consumer)[COMMANDS] = 90
    faust_private.acked(consumer)[COMMANDS] = [*range(91, 109), 90]
    faust_private.acked_index(consumer)[COMMANDS] = set(range(90, 109))
    assert consumer.next_commit_offset(COMMANDS) == 109
    assert not faust_private.acked_index(consumer)[COMMANDS]
    assert not consumer._holes


def test_acks_from_an_earlier_generation_do_not_count(consumer: Any) -> None:
    stale = _message(90, generation_id=6)
    faust_private.unacked_messages(consumer).add(stale)
    assert consumer.ack(stale) is False
    assert stale.acked
    assert stale not in faust_private.unacked_messages(consumer)
    assert not faust_private.acked(consumer)[COMMANDS]


async def test_skipped_offsets_are_not_counted_as_processed(consumer: Any) -> None:
    await consumer.record_gap(COMMANDS, 91, 120)
    assert not faust_private.gaps(consumer)[COMMANDS]


class _Committed:
    """What a gate reads of Faust's consumer (its private layout)."""

    def __init__(self, offsets: dict[TP, int], in_transaction: bool = False) -> None:
        self._committed_offset = offsets
        self.in_transaction = in_transaction


def test_a_gate_admits_each_record_once_in_order() -> None:
    gate = InOrder(_Committed({COMMANDS: 90}))
    offsets = [90, 91, 91, 92, 90, 93]
    assert [gate.admit(_message(o, 7)) for o in offsets] == [True, True, False, True, False, True]


def test_a_gate_refuses_records_past_a_hole_until_it_is_filled() -> None:
    gate = InOrder(_Committed({COMMANDS: 90}))
    assert gate.admit(_message(90, 7))
    # 91 went missing: 92 and 93 wait for the seek back rather than overtaking it.
    assert not gate.admit(_message(92, 7)) and not gate.admit(_message(93, 7))
    assert gate.holes == 2
    assert [gate.admit(_message(o, 7)) for o in (91, 92, 93)] == [True, True, True]


def test_a_new_generation_starts_at_the_committed_offset() -> None:
    committed = {COMMANDS: 90}
    gate = InOrder(_Committed(committed))
    assert [gate.admit(_message(o, 7)) for o in (90, 91, 92)] == [True, True, True]
    committed[COMMANDS] = 91  # a rebalance: the partition is read again from 91
    assert not gate.admit(_message(93, 8))  # 91 and 92 come first
    assert [gate.admit(_message(o, 8)) for o in (91, 92, 93)] == [True, True, True]


def test_without_a_committed_offset_the_first_record_starts_the_gate() -> None:
    gate = InOrder(_Committed({}))
    assert gate.admit(_message(0, 1)) and gate.admit(_message(1, 1))


def test_inside_transactions_a_jump_is_a_marker_not_a_hole() -> None:
    gate = InOrder(_Committed({COMMANDS: 90}, in_transaction=True))
    assert [gate.admit(_message(o, 7)) for o in (90, 92, 92, 93)] == [True, True, False, True]


CHANGELOG = TP("kefu-conversations-changelog", 1)


def _seek_wait(consumer: Any, seek_wait: Any, offset: int) -> None:
    async def seek_in_thread(partitions: Any) -> None:  # the aiokafka consumer never runs
        pass

    cast(Any, faust_private.consumer_thread(consumer)).seek_wait = seek_in_thread
    # On the app's own loop: asyncio.run would orphan the loop the app was built with.
    consumer.loop.run_until_complete(seek_wait(consumer, {CHANGELOG: offset}))


def test_recovery_seek_forgets_how_far_the_partition_was_read(consumer: Any) -> None:
    # Read to offset 62 as a standby, then recovered as active from the beginning.
    faust_private.read_offsets(consumer)[CHANGELOG] = 62
    _seek_wait(consumer, faust_aiokafka.Consumer.seek_wait, 0)
    # Faust's keeps the mark: the fetch loop drops offsets 0-61 as already seen.
    assert faust_private.read_offsets(consumer)[CHANGELOG] == 62
    _seek_wait(consumer, Consumer.seek_wait, 0)
    assert faust_private.read_offsets(consumer)[CHANGELOG] is None
    faust_private.read_offsets(consumer)[CHANGELOG] = 62
    _seek_wait(consumer, Consumer.seek_wait, 40)
    assert faust_private.read_offsets(consumer)[CHANGELOG] == 40


def _tail(consumer: Any, monkeypatch: pytest.MonkeyPatch, highwater: int) -> None:
    monkeypatch.setattr(consumer, "assignment", lambda: {COMMANDS})
    monkeypatch.setattr(consumer, "highwater", lambda tp: highwater)
    # (The app's table manager, which knows the changelogs, would start services.)
    monkeypatch.setattr(faust_private, "is_changelog_tp", lambda consumer, tp: False)
    faust_private.committed_offsets(consumer)[COMMANDS] = 167
    consumer._watch_tails({m.tp for m in faust_private.unacked_messages(consumer)})


def test_a_lost_last_record_is_watched_although_nothing_after_it_is_acked(
    consumer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offsets 167-169 were fetched and lost: nothing in flight, nothing acked.
    _tail(consumer, monkeypatch, highwater=170)
    assert consumer._holes  # due after lost_after, then sought back to 167
    consumer._holes.forget([COMMANDS])


def test_a_partition_at_its_highwater_or_busy_is_not_a_tail(
    consumer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tail(consumer, monkeypatch, highwater=167)  # all processed
    assert not consumer._holes
    held = _message(167, generation_id=7)  # an agent holds it (a weak set: keep a reference)
    faust_private.unacked_messages(consumer).add(held)
    _tail(consumer, monkeypatch, highwater=170)
    assert not consumer._holes
    faust_private.unacked_messages(consumer).clear()
    faust_private.acked(consumer)[COMMANDS] = [
        168
    ]  # acked past it: _new_offset's hole rule applies
    _tail(consumer, monkeypatch, highwater=170)
    assert not consumer._holes
