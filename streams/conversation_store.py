"""The conversation agent's table: each conversation's state, by partition, changelogged.

The states of the partitions a worker holds live in memory; every change is written
to a compacted changelog topic (``<app id>-conversations-changelog``, the topic and
the record format of the Faust table it replaces: key the conversation id, value the
state as JSON), once per conversation per batch, before the batch's offsets are
committed. A partition gained in a rebalance is recovered from its changelog partition
before any of its commands is decided (``recover``). A state the changelog lost (a
crash between the events and the changelog write) is safe: the command comes again
and ``decide`` gives the same events, which every reader drops by seq.

Standby replicas (Faust's warm copies) are not kept: a partition moves with a full
read of its changelog partition, which compaction keeps to one record per
conversation.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.lifecycle import Conversation

log = logging.getLogger(__name__)
Stored = dict[str, Any]  # a state as its JSON object (``Conversation.to_json``)


class ConversationStore:
    def __init__(
        self,
        changelog: str,
        bootstrap: str,
        app: Any,  # the Faust app: its producer writes the changelog
        kafka_options: Mapping[str, Any] | None = None,
        cache_limit: int = 50_000,
    ) -> None:
        self.changelog = changelog
        self._bootstrap = bootstrap
        self._app = app
        # The worker's hot producer once set (``write_with``): the changelog goes out
        # with the events it follows, and the same checkpoint flushes both.
        self._producer: Any = None
        self._kafka_options = dict(kafka_options or {})
        self._partitions: dict[int, dict[str, Stored]] = {}
        self._owner: dict[str, int] = {}  # conversation id -> its partition
        self._dirty: dict[str, int] = {}  # changed since the last changelog write
        # Decoded states, valid while the store holds the very object they came from.
        self._decoded: dict[str, tuple[Stored, Conversation]] = {}
        self._cache_limit = cache_limit

    def write_with(self, producer: Any) -> None:
        self._producer = producer

    # --- reads -----------------------------------------------------------------------

    def get(self, conversation_id: str) -> Conversation:
        partition = self._owner.get(conversation_id)
        if partition is None:
            return Conversation()
        stored = self._partitions[partition][conversation_id]
        cached = self._decoded.get(conversation_id)
        if cached is not None and cached[0] is stored:
            return cached[1]
        state = Conversation.from_json(stored)
        self._remember(conversation_id, stored, state)
        return state

    def items(self) -> Iterator[tuple[str, Stored]]:
        """Every state this worker holds (the deadline timers scan them)."""
        for states in list(self._partitions.values()):
            yield from list(states.items())

    def partitions(self) -> set[int]:
        return set(self._partitions)

    # --- writes ----------------------------------------------------------------------

    def put(self, conversation_id: str, state: Conversation, partition: int) -> None:
        stored = state.to_json()
        self._partitions.setdefault(partition, {})[conversation_id] = stored
        self._owner[conversation_id] = partition
        self._dirty[conversation_id] = partition
        self._remember(conversation_id, stored, state)

    def changelog_writes(self) -> Callable[[], Awaitable[list[Any]]]:
        """The states changed since the last call (once each, however often they
        changed), as they are now, and what sends them later: a checkpoint captures
        them between two batches and writes them after the flush of their events,
        while the next batches change the table. Its result: the send futures."""
        dirty, self._dirty = self._dirty, {}
        states = []
        for conversation_id, partition in dirty.items():
            stored = self._partitions.get(partition, {}).get(conversation_id)
            if stored is not None:  # else the partition moved on meanwhile
                states.append((conversation_id, partition, stored))  # never mutated: put replaces

        async def write() -> list[Any]:
            send = (self._producer if self._producer is not None else self._app.producer).send
            return [
                await send(
                    self.changelog, key.encode(), orjson.dumps(stored), partition, None, None
                )
                for key, partition, stored in states
            ]

        return write

    async def write_changelog(self) -> list[Any]:
        """Send every state changed since the last call, now; the send futures."""
        return await self.changelog_writes()()

    # --- partitions come and go ------------------------------------------------------

    async def recover(self, partitions: set[int]) -> None:
        """Read each partition's changelog from its beginning to its end (as it is now:
        this worker is its only writer from here on)."""
        wanted = sorted(p for p in partitions if p not in self._partitions)
        if not wanted:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap, enable_auto_commit=False, **self._kafka_options
        )
        await consumer.start()
        try:
            tps = [TopicPartition(self.changelog, p) for p in wanted]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            found: dict[int, dict[str, Stored]] = {p: {} for p in wanted}
            pending = {tp for tp in tps if ends[tp] > 0}
            while pending:
                for tp in list(pending):  # already at the end (a compacted tail)
                    if await consumer.position(tp) >= ends[tp]:
                        pending.discard(tp)
                if not pending:
                    break
                batch = await consumer.getmany(*pending, timeout_ms=500, max_records=10_000)
                for tp, records in batch.items():
                    states = found[tp.partition]
                    for record in records:
                        if record.offset >= ends[tp]:
                            continue
                        key = (record.key or b"").decode()
                        if record.value is None:
                            states.pop(key, None)
                        else:
                            states[key] = orjson.loads(record.value)
        finally:
            await consumer.stop()
        for partition, states in found.items():
            self._partitions[partition] = states
            for conversation_id in states:
                self._owner[conversation_id] = partition
        log.info(
            "conversations recovered: partitions %s, %d states",
            wanted,
            sum(len(s) for s in found.values()),
        )

    def forget(self, partitions: set[int]) -> None:
        for partition in partitions:
            for conversation_id in self._partitions.pop(partition, {}):
                self._owner.pop(conversation_id, None)
                self._decoded.pop(conversation_id, None)
                self._dirty.pop(conversation_id, None)

    def _remember(self, conversation_id: str, stored: Stored, state: Conversation) -> None:
        if len(self._decoded) >= self._cache_limit:
            self._decoded.clear()  # a cache, not the truth: start over
        self._decoded[conversation_id] = (stored, state)
