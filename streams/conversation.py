"""The conversation agent: the single writer of every conversation's events.

Commands arrive keyed by conversation id, so one partition (and one actor) sees all of
a conversation's commands in order. For each: fold-decide-append, with the state in a
Faust table; the events of one command record go out as ONE record (a ``Commit``). A
reply that needs no I/O (the FAQ, an intent's canned text) is decided in the same step
(``Policy.answer_now``), so it leaves with the message's own events. Commands come in
batches (``streams.inbox.command_batches``): Faust acks a batch once this loop
asks for the next one and flushes the producer before committing acked offsets, so the
events are on the log before the commands count as done; a redelivered command is
dropped by ``decide``. The table is written once per conversation per batch,
after its events were sent.
"""

from __future__ import annotations

import logging
from typing import Any

from schemas.codec import CODEC
from schemas.records import Command, Event
from streams import telemetry
from streams.app import KefuApp
from streams.inbox import command_batches, position, send_dead_letter, send_in_order
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

    async def apply(event: Any, commands: list[tuple[bytes, Command]], changed: Changed) -> None:
        """One Kafka record (one command, or a ``Commit`` of several: a batch of
        delivery receipts of one partition) becomes ONE record of events: the decision
        is atomic on the log. A command that must not apply is dead-lettered alone,
        with its own bytes; the others still apply."""
        message = event.message
        pending: Changed = {}
        appended: list[Event] = []
        for raw, command in commands:
            conversation_id = command.conversation_id
            try:
                known = pending.get(conversation_id) or changed.get(conversation_id)
                state = known[0] if known else states.get(conversation_id)
                events = decide(state, command, policy)
                for decided in events:
                    state = evolve(state, decided)
                if events:
                    appended += events
                    pending[conversation_id] = (state, message.partition)
            except Rejected as exc:
                await send_dead_letter(kefu.deadletter, message, str(exc), STAGE, payload=raw)
            except Exception as exc:  # a bug for one command must not stop the partition
                log.exception("conversation %s failed at %s", conversation_id, position(message))
                await send_dead_letter(kefu.deadletter, message, repr(exc), STAGE, payload=raw)
        if not appended:
            log.debug("dropped applied command(s) %s", position(message))
            return
        # Every conversation of one record is in this partition: any of their ids is a
        # key that lands the events record there.
        key = appended[0].conversation_id
        try:
            commit = CODEC.commit(appended, key)
            await send_in_order([(kefu.events_out, key, commit)], f"{STAGE} {position(message)}")
        except Exception as exc:  # not on the log: the states stay as they were
            log.exception("events of %s not appended", position(message))
            await send_dead_letter(kefu.deadletter, message, repr(exc), STAGE)
            return
        changed.update(pending)

    async def conversation(stream: Any) -> None:
        async for batch in command_batches(stream, kefu.deadletter, STAGE):
            changed: Changed = {}
            for event, commands in batch:
                with telemetry.hop(STAGE, event.message, commands[0][1]):
                    await apply(event, commands, changed)
            for conversation_id, (state, partition) in changed.items():
                states.put(conversation_id, state, partition)

    return kefu.app.agent(kefu.commands_in, name="kefu.conversation")(conversation)
