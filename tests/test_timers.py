"""The deadline timer's pure parts: what is due, and when it will next be due."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from streams.lifecycle import Conversation
from streams.timers import Deadlines, due, next_due

DEADLINES = Deadlines(idle_close_ms=600_000, first_response_ms=120_000, next_response_ms=300_000)
times = st.integers(min_value=0, max_value=10_000_000)


def state(**fields: Any) -> Conversation:
    return dataclasses.replace(
        Conversation(conversation_id="c1", tenant_id="t1", status="open"), **fields
    )


@given(
    status=st.sampled_from(["open", "closed"]),
    unanswered=times,
    breached=times,
    same_breach=st.booleans(),
    replies=st.integers(min_value=0, max_value=3),
    activity=times,
    now=st.integers(min_value=0, max_value=12_000_000),
)
def test_next_due_says_exactly_when_due_has_something(
    status: str,
    unanswered: int,
    breached: int,
    same_breach: bool,
    replies: int,
    activity: int,
    now: int,
) -> None:
    conversation = state(
        status=status,
        unanswered_since=unanswered,
        breached_since=unanswered if same_breach else breached,
        replies=replies,
        last_activity_at=activity,
    )
    when = next_due(conversation, DEADLINES)
    assert bool(due(conversation, DEADLINES, now)) == (when is not None and now >= when)


def test_first_response_breach_then_idle_close() -> None:
    waiting = state(unanswered_since=1_000, last_activity_at=1_000, replies=0)
    assert next_due(waiting, DEADLINES) == 121_000
    assert [type(c).__name__ for c in due(waiting, DEADLINES, 121_000)] == ["FlagSlaBreach"]
    breached = dataclasses.replace(waiting, breached_since=1_000)
    assert next_due(breached, DEADLINES) == 601_000
    assert [type(c).__name__ for c in due(breached, DEADLINES, 601_000)] == ["CloseConversation"]
    assert next_due(dataclasses.replace(breached, status="closed"), DEADLINES) is None
