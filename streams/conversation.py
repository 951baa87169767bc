"""The conversation agent: the single writer of every conversation's events.

Commands arrive keyed by conversation id, so one partition (and one worker) sees all
of a conversation's commands in order. For each record: fold-decide-append, with the
states in ``streams.conversation_store``; the events of one command record go out as
ONE record (a ``Commit``): a decision is atomic on the log. A reply that needs no I/O
(the FAQ, an intent's canned text) is decided in the same step
(``Policy.answer_now``), so it leaves with the message's own events.

It is a ``streams.batch_consumer.BatchConsumer`` (group ``<app id>-commands``): the
commands of a fetched batch are decided in log order, then the changed states are
changelogged once each, the producer flushed and the offsets committed, in that
order. A redelivered command is dropped by ``decide`` (its id is in the state).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import TopicPartition

from schemas.codec import CODEC, DecodeError
from schemas.records import Command, Event
from schemas.sealing import KeySource, seal_events
from streams import telemetry
from streams.app import KefuApp
from streams.batch_consumer import (
    BatchConfig,
    BatchConsumer,
    CommitWrites,
    TopicSender,
    hot_producer_of,
)
from streams.conversation_store import ConversationStore
from streams.inbox import decode_commands, position, send_dead_letter, send_in_order
from streams.lifecycle import Conversation, Policy, Rejected, decide, evolve

log = logging.getLogger(__name__)
STAGE = "conversation"


def agent_config(kefu: KefuApp, app_id: str) -> BatchConfig:
    return BatchConfig(
        group_id=f"{app_id}-commands",
        topics=(kefu.config.topics.commands,),
        legacy_group_id=app_id,
    )


class ConversationAgent(BatchConsumer):
    def __init__(
        self,
        kefu: KefuApp,
        policy: Policy,
        config: BatchConfig,
        keys: KeySource | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(kefu.config, config, kefu.app, kefu.hot_producer, **kwargs)
        self._kefu = kefu
        # Crypto-shredding (schemas/sealing.py): personal fields sealed with the
        # customer's key as the events go on the log; None: written in clear.
        self._keys = keys
        self._policy = policy
        self._store: ConversationStore = kefu.conversations
        self._events = TopicSender(hot_producer_of(kefu), kefu.config.topics.events)

    async def on_assigned(self, tps: set[TopicPartition]) -> None:
        await self._store.recover({tp.partition for tp in tps})

    def on_revoked(self, tps: set[TopicPartition]) -> None:
        self._store.forget({tp.partition for tp in tps})

    def commit_writes(self) -> CommitWrites:
        return self._store.changelog_writes()

    async def apply(self, batch: Mapping[TopicPartition, Sequence[Any]]) -> None:
        for records in batch.values():
            for message in records:
                try:
                    commands = decode_commands(message.value or b"")
                except DecodeError as exc:
                    await send_dead_letter(self._kefu.deadletter, message, exc.reason, STAGE)
                    continue
                with telemetry.hop(STAGE, message, commands[0][1]):
                    await self._decide(message, commands)
                await self.fair_turn()

    async def _decide(self, message: Any, commands: list[tuple[bytes, Command]]) -> None:
        """One Kafka record (one command, or a ``Commit`` of several: a batch of
        delivery receipts of one partition) becomes ONE record of events. A command
        that must not apply is dead-lettered alone, with its own bytes; the others
        still apply. States change only once their events are handed to the producer."""
        kefu, store = self._kefu, self._store
        pending: dict[str, Conversation] = {}
        appended: list[Event] = []
        for raw, command in commands:
            conversation_id = command.conversation_id
            try:
                state = pending.get(conversation_id) or store.get(conversation_id)
                events = decide(state, command, self._policy)
                for decided in events:
                    state = evolve(state, decided)
                if events:
                    appended += events
                    pending[conversation_id] = state
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
            if self._keys is not None:  # the states above keep the clear text
                customers = {c: s.customer_id for c, s in pending.items()}
                appended = await seal_events(appended, customers, self._keys)
                self.track(self._keys.drain_sent())  # keys on the log before the commit
            commit = CODEC.commit(appended, key)
            sends = [(self._events, key, commit)]
            self.track(await send_in_order(sends, f"{STAGE} {position(message)}"))
        except Exception as exc:  # not on the log: the states stay as they were
            log.exception("events of %s not appended", position(message))
            await send_dead_letter(kefu.deadletter, message, repr(exc), STAGE)
            return
        for conversation_id, state in pending.items():
            store.put(conversation_id, state, message.partition)
