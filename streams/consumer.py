"""Faust's Kafka consumer, made to neither skip nor commit past a record.

faust-streaming 0.15.3 lost records around rebalances in three ways (issue 9,
docs/faults.md "Records skipped around a rebalance"), each handled here:

- a partition without a committed offset keeps whatever position the fetcher had after
  "seek to committed offsets" (a successor was seen starting at the end of the log):
  ``Consumer.perform_seek`` seeks such partitions to their beginning;
- the committed offset could move over a record no agent processed: Faust's
  ``_new_offset`` tolerated one missing offset at the head of the acks, its ``_add_gap``
  counted offsets the fetch loop did not see as processed, and acks of records from an
  earlier generation landed in the new generation's bookkeeping. Here the committed
  offset only moves over an unbroken run acked in the current generation (the hooks
  ``next_commit_offset`` and ``record_gap`` of ``streams.faust_private.HookedConsumer``);
- a record cleared from one agent's queue let later ones reach that agent first:
  ``InOrder`` gates each single-actor agent, and ``HoleWatch`` makes the consumer seek a
  partition back to its committed offset when a record stays missing, so it comes
  again, in order. Every agent absorbs the repeats (command ids, event seqs).

Table recovery had a fourth way, in the same fetch loop: its seek kept the partition's
read mark, so records below it were dropped; ``Consumer.seek_wait`` resets the mark.

Our topics have no holes of their own (no transactional producers in
``at_least_once``, no compaction on consumed topics); inside Kafka transactions the
markers' offsets count as gaps, as in Faust.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, MutableSequence, Sequence
from typing import Any, cast

from aiokafka import AIOKafkaConsumer
from faust.types import TP, Message
from faust.utils.functional import consecutive_numbers

from streams import faust_private


def take_committable(committed: int | None, acked: MutableSequence[int]) -> Sequence[int]:
    """The acked offsets the committed offset can move over: the run from ``committed``
    (Kafka's committed offset, the next record to read) without a hole, taken off
    ``acked`` (sorted in place). Empty while the record at ``committed`` is missing."""
    if not acked:
        return ()
    acked[:] = sorted(set(acked))
    if committed is not None and acked[0] > committed:
        return ()  # the record at `committed` was not processed (yet)
    run = next(consecutive_numbers(acked))
    del acked[: len(run)]
    return run


class HoleWatch:
    """When a partition's committed offset has been held back by a missing record for
    too long, it is due to be sought back: the record was lost, not slow.

    A hole whose record no agent is working on (not in the consumer's unacked set) is
    lost as soon as it is seen for ``lost_after`` seconds; one that an agent holds
    (tracked but never acked, e.g. acked by some agents and dropped from another's
    queue, or a slow LLM call) gets ``stuck_after``."""

    def __init__(self, lost_after: float, stuck_after: float) -> None:
        self.lost_after = lost_after
        self.stuck_after = stuck_after
        self._since: dict[TP, tuple[int, float]] = {}

    def seen(self, tp: TP, offset: int) -> None:
        known = self._since.get(tp)
        if known is None or known[0] != offset:
            self._since[tp] = (offset, time.monotonic())

    def closed(self, tp: TP) -> None:
        self._since.pop(tp, None)

    def due(self, in_flight: set[tuple[TP, int]]) -> list[tuple[TP, int]]:
        now = time.monotonic()
        due = []
        for tp, (offset, since) in list(self._since.items()):
            limit = self.stuck_after if (tp, offset) in in_flight else self.lost_after
            if now - since >= limit:
                due.append((tp, offset))
                del self._since[tp]
        return due

    def __bool__(self) -> bool:
        return bool(self._since)

    def forget(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self._since.pop(tp, None)


class InOrder:
    """One agent's gate: each partition's records are admitted once and in offset
    order, from the committed offset on. A repeat (after a seek back) is dropped; a
    record past a hole (records this agent never got, e.g. cleared from its queue when
    the flow resumed after a rebalance) is dropped too, so a read model guarded by
    sequence numbers never applies a later event first and then refuses the missing
    one. The hole is not acked, so the consumer holds its commit there and seeks the
    partition back (``HoleWatch``): the records come again, in order.

    For an agent with one actor: several actors take records in turn and would each
    see holes that are only their siblings' records."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer
        self._next: dict[TP, tuple[int | None, int]] = {}
        self.holes = 0  # records refused past a hole (tests, metrics)

    def admit(self, message: Any) -> bool:
        tp, offset = message.tp, message.offset
        known = self._next.get(tp)
        if known is None or known[0] != message.generation_id:
            committed = faust_private.committed_offsets(self._consumer).get(tp)
            expected = offset if committed is None else committed
        else:
            expected = known[1]
        if offset < expected:
            return False
        if offset > expected and not self._consumer.in_transaction:
            # Inside Kafka transactions markers take offsets: a jump is not a hole.
            self.holes += 1
            return False
        self._next[tp] = (message.generation_id, offset + 1)
        return True


class Consumer(faust_private.HookedConsumer):
    """Faust's aiokafka consumer with strict commits and hole repair (module docstring),
    and the broker fetch wait from the app (``fetch_max_wait_ms``; Faust hard-codes
    1,500 ms). Faust's private state and methods are reached through
    ``streams.faust_private`` only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        app = cast(Any, self.app)  # streams.app._App: its settings, set before this runs
        self._holes = HoleWatch(app.redeliver_lost_after_s, app.redeliver_stuck_after_s)

    def worker_client_created(self, client: AIOKafkaConsumer) -> None:
        app = cast(Any, self.app)  # streams.app._App
        faust_private.set_fetch_wait(client, app.fetch_max_wait_ms, app.fetch_min_bytes)

    def ack(self, message: Message) -> bool:
        if message.generation_id != self.app.consumer_generation_id:
            # Fetched before the last rebalance: the partition was sought back to its
            # committed offset since, and the record comes again in this generation.
            message.acked = True
            faust_private.unacked_messages(self).discard(message)
            return False
        return bool(super().ack(message))

    def next_commit_offset(self, tp: TP) -> int | None:
        acked = faust_private.acked(self)[tp]
        committed = faust_private.committed_offsets(self)[tp]
        gaps = faust_private.gaps(self)[tp]
        if acked and gaps:  # transaction markers below the highest ack count as done
            top = max(acked)
            for gap in gaps.overlap(0, top + 1):
                acked.extend(range(gap.begin, min(gap.end, top + 1)))
            gaps.chop(0, top + 1)
        run = take_committable(committed, acked)
        if run:
            faust_private.acked_index(self)[tp].difference_update(run)
            self._holes.closed(tp)
            return run[-1] + 1
        if acked and committed is not None:
            self._holes.seen(tp, committed)
        else:
            self._holes.closed(tp)
        return None

    async def record_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        """Offsets the fetch loop skipped are not processed records (module docstring)."""
        if self.in_transaction:  # transaction markers do take offsets
            await super().record_gap(tp, offset_from, offset_to)

    def _watch_tails(self, in_flight: set[TP]) -> None:
        """A hole with nothing after it: a partition whose committed offset is behind
        its highwater while no record of it is in flight or acked. The records it
        fetched after the commit went missing (if it has not fetched them yet, the
        seek back is a no-op). Found when the last records of a wave were lost: no
        later ack revealed the hole, and the replies waited for the next traffic."""
        app = cast(Any, self.app)
        if app.rebalancing or getattr(app, "in_recovery", False):
            return  # stream partitions are paused then: their records wait, not lost
        acked = faust_private.acked(self)
        committed_offsets = faust_private.committed_offsets(self)
        for tp in self.assignment():
            if tp in in_flight or acked.get(tp) or faust_private.is_changelog_tp(self, tp):
                continue
            committed = committed_offsets.get(tp)
            if committed is None:
                continue
            try:
                highwater = self.highwater(tp)
            except Exception:  # not fetched yet: nothing known
                continue
            if highwater is not None and highwater > committed:
                self._holes.seen(tp, committed)

    async def commit_partitions(self, tps: Iterable[TP], start_new_transaction: bool) -> bool:
        committed = await super().commit_partitions(tps, start_new_transaction)
        in_flight = {(m.tp, m.offset) for m in faust_private.unacked_messages(self)}
        self._watch_tails({tp for tp, _ in in_flight})
        if not self._holes:
            return committed
        for tp, offset in self._holes.due(in_flight):
            if tp in self.assignment() and faust_private.committed_offsets(self)[tp] == offset:
                self.log.warning(
                    "Offset %r of %r was fetched but not processed: "
                    "seeking back to deliver it again",
                    offset,
                    tp,
                )
                faust_private.acked(self)[tp].clear()
                faust_private.acked_index(self)[tp].clear()
                await self.seek(tp, offset)
        return committed

    async def seek_wait(self, partitions: Mapping[TP, int]) -> None:
        """Table recovery's seek, which also forgets how far each partition was read, as
        ``seek`` does. Without that, the fetch loop dropped every record below the old
        mark as already seen: a changelog partition read as a standby and then
        recovered as active from an earlier offset never got its records, and the
        worker hung in recovery ("No event received for active tp", seen in the
        two-worker routing test of a clean-clone CI run)."""
        read = faust_private.read_offsets(self)
        for tp, offset in partitions.items():
            # Lowered before the seek, so no record from the new position is dropped.
            read[tp] = offset if offset else None
        await super().seek_wait(partitions)

    async def perform_seek(self) -> None:
        """Seek to the committed offsets, and a partition without one to its beginning:
        left alone, its position is whatever the fetcher holds (a new owner was seen
        starting at the end of a partition whose dead owner had processed part of it
        and committed nothing), and ``consumer_auto_offset_reset`` does not apply."""
        await super().perform_seek()
        committed = faust_private.committed_offsets(self)
        fresh = [
            tp
            for tp in self.assignment()
            if not committed[tp] and not faust_private.is_changelog_tp(self, tp)
        ]
        if fresh:
            await faust_private.seek_to_beginning(self, fresh)
            read = faust_private.read_offsets(self)
            for tp in fresh:
                read[tp] = None
            names = ", ".join(sorted(f"{tp.topic}-{tp.partition}" for tp in fresh))
            self.log.info("No committed offset: reading %s from the beginning", names)

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        # Acks recorded between the revocation and this assignment belong to records of
        # the old generation; this generation starts from the committed offsets.
        acked = faust_private.acked(self)
        acked_index = faust_private.acked_index(self)
        gaps = faust_private.gaps(self)
        for tp in assigned:
            acked.pop(tp, None)
            acked_index.pop(tp, None)
            gaps.pop(tp, None)
        self._holes.forget(assigned)
        await super().on_partitions_assigned(assigned, generation_id)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self._holes.forget(revoked)
        await super().on_partitions_revoked(revoked)
