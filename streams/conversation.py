"""The conversation agent: the single writer of every conversation's events.

Commands arrive keyed by conversation id, so one partition (and one actor) sees all of
a conversation's commands in order. For each: fold-decide-append, with the state in a
Faust table. Faust acks a command once this loop moves past it and flushes the
producer before committing acked offsets, so the events are on the log before the
command counts as done; a redelivered command is dropped by ``decide``.
"""

from __future__ import annotations

import logging
from typing import Any

from schemas.records import Command
from streams.app import KefuApp
from streams.inbox import position, records, send_dead_letter
from streams.lifecycle import Conversation, Policy, Rejected, decide, evolve

log = logging.getLogger(__name__)


def install(kefu: KefuApp, policy: Policy) -> Any:
    table = kefu.conversations

    async def conversation(stream: Any) -> None:
        async for event, command in records(stream, Command, kefu.deadletter, "conversation"):
            try:
                stored = table.get(command.conversation_id)
                state = Conversation.from_json(stored) if stored else Conversation()
                events = decide(state, command, policy)
                if not events:
                    log.debug("dropped applied command %s", position(event.message))
                    continue
                for appended in events:
                    state = evolve(state, appended)
                    await kefu.events_out.send(key=command.conversation_id, value=appended)
                table[command.conversation_id] = state.to_json()
            except Rejected as exc:
                await send_dead_letter(kefu.deadletter, event.message, str(exc), "conversation")
            except Exception as exc:  # a bug for one record must not stop the partition
                log.exception(
                    "conversation %s failed at %s", command.conversation_id, position(event.message)
                )
                await send_dead_letter(kefu.deadletter, event.message, repr(exc), "conversation")

    return kefu.app.agent(kefu.commands_in, name="kefu.conversation")(conversation)
