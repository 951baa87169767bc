"""The conversation agent: the single writer of every conversation's events.

Commands arrive keyed by conversation id, so one partition (and one actor) sees all of
a conversation's commands in order. For each: fold-decide-append, with the state in a
Faust table. A reply that needs no I/O (the FAQ, an intent's canned text) is decided in
the same step (``Policy.answer_now``), so it leaves with the message's own events.
Commands come in batches (``streams.inbox.batches``): Faust acks a batch once this loop
asks for the next one and flushes the producer before committing acked offsets, so the
events are on the log before the commands count as done; a redelivered command is
dropped by ``decide``. The table is written once per conversation per batch,
after its events were sent.
"""

from __future__ import annotations

import logging
from typing import Any

from schemas.records import Command
from streams import telemetry
from streams.app import KefuApp
from streams.inbox import batches, position, send_dead_letter, send_in_order
from streams.lifecycle import Conversation, Policy, Rejected, decide, evolve

log = logging.getLogger(__name__)
STAGE = "conversation"


class _States:
    """Decoded states by conversation id, valid while the table still holds the very
    object they were decoded from (a rebalance or a recovery replaces it)."""

    def __init__(self, table: Any, limit: int = 50_000) -> None:
        self._table = table
        self._limit = limit
        self._decoded: dict[str, tuple[Any, Conversation]] = {}

    def get(self, conversation_id: str) -> Conversation:
        stored = self._table.get(conversation_id)
        if not stored:
            return Conversation()
        cached = self._decoded.get(conversation_id)
        if cached is not None and cached[0] is stored:
            return cached[1]
        state = Conversation.from_json(stored)
        self._remember(conversation_id, stored, state)
        return state

    def put(self, conversation_id: str, state: Conversation, partition: int) -> None:
        """Store and changelog it. Not ``table[key] = ...``: that takes the partition
        from Faust's current event, which a batch does not set per record."""
        stored = state.to_json()
        self._table.data[conversation_id] = stored
        self._table.send_changelog(partition, conversation_id, stored)
        self._remember(conversation_id, stored, state)

    def _remember(self, conversation_id: str, stored: Any, state: Conversation) -> None:
        if len(self._decoded) >= self._limit:
            self._decoded.clear()  # a cache, not the truth: start over
        self._decoded[conversation_id] = (stored, state)


def install(kefu: KefuApp, policy: Policy) -> Any:
    states = _States(kefu.conversations)
    Changed = dict[str, tuple[Conversation, int]]  # id -> (state, its partition)

    async def apply(event: Any, command: Command, changed: Changed) -> None:
        conversation_id = command.conversation_id
        try:
            pending = changed.get(conversation_id)
            state = pending[0] if pending else states.get(conversation_id)
            events = decide(state, command, policy)
            if not events:
                log.debug("dropped applied command %s", position(event.message))
                return
            for appended in events:
                state = evolve(state, appended)
            sends = [(kefu.events_out, conversation_id, appended) for appended in events]
            await send_in_order(sends, f"{STAGE} {position(event.message)}")
            changed[conversation_id] = (state, event.message.partition)
        except Rejected as exc:
            await send_dead_letter(kefu.deadletter, event.message, str(exc), STAGE)
        except Exception as exc:  # a bug for one record must not stop the partition
            log.exception("conversation %s failed at %s", conversation_id, position(event.message))
            await send_dead_letter(kefu.deadletter, event.message, repr(exc), STAGE)

    async def conversation(stream: Any) -> None:
        async for batch in batches(stream, Command, kefu.deadletter, STAGE):
            changed: Changed = {}
            for event, command in batch:
                with telemetry.hop(STAGE, event.message, command):
                    await apply(event, command, changed)
            for conversation_id, (state, partition) in changed.items():
                states.put(conversation_id, state, partition)

    return kefu.app.agent(kefu.commands_in, name="kefu.conversation")(conversation)
