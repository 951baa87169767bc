"""What an agent does with a failure that is not the record's fault (Redis or Kafka
unreachable for a while): waits it out (``streams.inbox.outlasting``, ``send_in_order``)
instead of dead-lettering a valid record, and sends nothing twice."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    ProducerClosed,
)
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError

from schemas.codec import CODEC
from schemas.outcomes import DeliveryOutcome
from schemas.records import (
    Commit,
    ConversationEnqueued,
    DeadLetter,
    QueueConversation,
    RecordDelivery,
    RecordReply,
    ReplyProduced,
    ReplyRequested,
    RequestAssignment,
)
from streams import delivery, responder, router
from streams.inbox import outlasting, send_in_order, transient
from streams.responders import Answer
from tests.samples import SAMPLES


@dataclass
class Flaky:
    """Fails with ``error`` the first ``failures`` calls, then returns ``result``."""

    error: BaseException
    failures: int
    result: Any = "done"
    calls: int = 0

    async def __call__(self) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.result


async def test_a_transient_failure_is_tried_again_until_it_passes() -> None:
    flaky = Flaky(BusyLoadingError("Redis is loading the dataset in memory"), failures=3)
    assert await outlasting(flaky, "test") == "done"
    assert flaky.calls == 4


async def test_any_other_failure_is_raised_at_once() -> None:
    flaky = Flaky(ValueError("a bug"), failures=5)
    with pytest.raises(ValueError):
        await outlasting(flaky, "test")
    assert flaky.calls == 1


async def test_a_transient_failure_that_outlasts_the_budget_is_raised() -> None:
    flaky = Flaky(ConnectionRefusedError(), failures=1_000)
    with pytest.raises(ConnectionRefusedError):
        await outlasting(flaky, "test", budget_s=0.3)
    assert 1 < flaky.calls < 1_000


@dataclass
class Sent:
    records: list[Any] = field(default_factory=list)

    async def send(self, key: Any, value: Any) -> None:
        self.records.append(value)


def _kefu() -> Any:
    return SimpleNamespace(commands_out=Sent(), deadletter=Sent())


def _event(record: Any) -> Any:
    message = SimpleNamespace(topic="kefu.events", partition=0, offset=7, key=b"c", value=b"x")
    return SimpleNamespace(message=message, value=b"x")


REQUEST = next(r for r in SAMPLES if isinstance(r, ReplyRequested))
REPLY = next(r for r in SAMPLES if isinstance(r, ReplyProduced))


async def test_the_responder_waits_out_redis_instead_of_dead_lettering() -> None:
    answer = Flaky(RedisConnectionError("Connection refused"), 2, Answer("hello", "ai", 1.0, None))
    kefu = _kefu()
    flaky_responder = SimpleNamespace(answer=lambda r: answer())
    await responder.answer(kefu, flaky_responder, _event(REQUEST).message, REQUEST)
    assert [type(r) for r in kefu.commands_out.records] == [RecordReply]
    assert kefu.deadletter.records == []


async def test_delivery_waits_out_redis_then_records_the_outcome() -> None:
    outcome = DeliveryOutcome("delivered", 1, "outbox")
    deliver = Flaky(RedisConnectionError("Connection refused"), 2, outcome)
    kefu = _kefu()
    deliverer = SimpleNamespace(deliver=lambda r: deliver())
    items = [(_event(REPLY).message, REPLY)]
    (receipt,) = await delivery.deliver_batch(deliverer, items, kefu.deadletter, 4)
    command = receipt.command
    assert isinstance(command, RecordDelivery) and command.status == "delivered"
    assert command.reply_event_id == REPLY.event_id and receipt.message.offset == 7
    assert kefu.deadletter.records == []


async def test_delivery_dead_letters_what_is_not_transient() -> None:
    kefu = _kefu()
    deliverer = SimpleNamespace(deliver=lambda r: Flaky(KeyError("bug"), 1)())
    items = [(_event(REPLY).message, REPLY)]
    assert await delivery.deliver_batch(deliverer, items, kefu.deadletter, 4) == []
    (dead,) = kefu.deadletter.records
    assert isinstance(dead, DeadLetter) and "KeyError" in dead.reason
    # The reply alone is kept (a redrive must not repeat the other events of its record).
    assert dead.payload == CODEC.encode(REPLY) and dead.offset == 7


# ------------------------------------------------------------------ Kafka sends


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (KafkaTimeoutError(), True),  # no metadata or no buffer room in time
        (KafkaConnectionError("broker gone"), True),
        (NotLeaderForPartitionError(), True),  # a leader election
        (MessageSizeTooLargeError(), False),  # the record's own fault
        (ProducerClosed(), False),
        (RedisConnectionError("refused"), True),
        (ValueError("a bug"), False),
    ],
)
def test_what_counts_as_transient(error: BaseException, expected: bool) -> None:
    assert transient(error) is expected


@dataclass
class FlakyTopic:
    """A topic whose ``send`` fails with ``error`` on the listed call numbers."""

    error: BaseException
    failing: set[int] = field(default_factory=set)
    records: list[Any] = field(default_factory=list)
    calls: int = 0

    async def send(self, key: Any, value: Any) -> None:
        self.calls += 1
        if self.calls in self.failing:
            raise self.error
        self.records.append(value)


async def test_sends_wait_out_kafka_and_none_is_sent_twice() -> None:
    events, commands = (
        FlakyTopic(KafkaConnectionError(), {2, 3}),
        FlakyTopic(KafkaTimeoutError(), {1}),
    )
    sends = [(events, "q", 0), (events, "q", 1), (events, "q", 2), (commands, "c", "told")]
    await send_in_order(sends, "test")
    assert events.records == [0, 1, 2] and commands.records == ["told"]
    assert events.calls == 5 and commands.calls == 2  # the failed sends again, only those


async def test_a_send_that_cannot_succeed_is_raised_at_once() -> None:
    topic = FlakyTopic(MessageSizeTooLargeError(), {1})
    with pytest.raises(MessageSizeTooLargeError):
        await send_in_order([(topic, "k", "big")], "test")
    assert topic.calls == 1


REQUEST_ASSIGNMENT = next(r for r in SAMPLES if isinstance(r, RequestAssignment))


def _router_kefu(queue_events: Any) -> Any:
    return SimpleNamespace(queue_events_out=queue_events, commands_out=Sent(), deadletter=Sent())


async def test_the_router_waits_out_kafka_instead_of_dead_lettering() -> None:
    queue_events = FlakyTopic(KafkaConnectionError("broker gone"), {1, 2})
    kefu, table = _router_kefu(queue_events), dict[str, str]()
    command = REQUEST_ASSIGNMENT
    await router.route(kefu, table, True, _event(command), command)
    (commit,) = queue_events.records  # the decision as one record
    assert isinstance(commit, Commit) and commit.key == command.queue
    assert [type(CODEC.decode(e)) for e in commit.events] == [ConversationEnqueued]
    assert [type(c) for c in kefu.commands_out.records] == [QueueConversation]
    assert command.queue in table and kefu.deadletter.records == []


async def test_the_router_dead_letters_what_kafka_refuses_and_keeps_its_state() -> None:
    kefu, table = _router_kefu(FlakyTopic(MessageSizeTooLargeError(), {1})), dict[str, str]()
    await router.route(kefu, table, True, _event(REQUEST_ASSIGNMENT), REQUEST_ASSIGNMENT)
    (dead,) = kefu.deadletter.records
    assert "MessageSizeTooLarge" in dead.reason
    assert table == {} and kefu.commands_out.records == []
