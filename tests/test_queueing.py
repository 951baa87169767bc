"""The router's decision function: pure, so it is tested exhaustively here; the
integration tests check the same behaviour through Kafka."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.records import (
    AgentAssigned,
    QueueEvent,
    ReleaseAssignment,
    RequestAssignment,
    RoutingCommand,
    SetAgentPresence,
)
from streams.queueing import Queue, RoutingRejected, decide_queue, evolve_queue, rank

QUEUE = "t1:default"
_ids = itertools.count()


def presence(
    agent: str, state: str = "online", capacity: int = 2, skills: list[str] | None = None
) -> SetAgentPresence:
    return SetAgentPresence(
        command_id=f"p{next(_ids)}",
        tenant_id="t1",
        queue=QUEUE,
        issued_at=0,
        agent_id=agent,
        presence=state,
        capacity=capacity,
        skills=skills or [],
    )


def request(
    conversation: str, at: int, priority: str = "normal", skill: str = ""
) -> RequestAssignment:
    return RequestAssignment(
        command_id=f"r{next(_ids)}",
        tenant_id="t1",
        queue=QUEUE,
        issued_at=at,
        conversation_id=conversation,
        priority=priority,
        requested_at=at,
        skill=skill,
    )


def release(conversation: str) -> ReleaseAssignment:
    return ReleaseAssignment(
        command_id=f"x{next(_ids)}",
        tenant_id="t1",
        queue=QUEUE,
        issued_at=0,
        conversation_id=conversation,
        reason="closed",
    )


def run(
    commands: list[RoutingCommand], state: Queue | None = None, sticky: bool = True
) -> tuple[Queue, list[QueueEvent]]:
    state = state or Queue()
    log: list[QueueEvent] = []
    for command in commands:
        events = decide_queue(state, command, sticky)
        for event in events:
            state = evolve_queue(state, event)
        log.extend(events)
    return state, log


def test_three_agents_of_capacity_two_and_ten_conversations() -> None:
    agents = [presence(a) for a in ("a", "b", "c")]
    priorities = [
        "normal",
        "normal",
        "vip",
        "normal",
        "urgent",
        "normal",
        "normal",
        "vip",
        "normal",
        "normal",
    ]
    requests = [request(f"c{i}", at=100 + i, priority=p) for i, p in enumerate(priorities)]
    state, log = run([*agents, *requests])

    assert len(state.assigned) == 6
    assert {len(a.conversations) for a in state.agents.values()} == {2}
    # Served first come first, within priority; the rest wait by priority, then age.
    assert [w.conversation_id for w in state.waiting] == ["c7", "c6", "c8", "c9"]
    assert state.position("c7") == 1 and state.position("c9") == 4

    # Capacity frees up: the head of the line is assigned at once, to the freed agent.
    freed_agent = state.assigned["c0"][0]
    state, log = run([release("c0")], state)
    assigned = [e for e in log if isinstance(e, AgentAssigned)]
    assert [(e.conversation_id, e.agent_id) for e in assigned] == [("c7", freed_agent)]


def test_least_loaded_then_round_robin() -> None:
    _state, log = run(
        [presence("a"), presence("b"), request("c1", 1), request("c2", 2), request("c3", 3)]
    )
    order = [e.agent_id for e in log if isinstance(e, AgentAssigned)]
    assert order == ["a", "b", "a"]


def test_offline_agent_requeues_open_conversations_ahead_of_newer_ones() -> None:
    state, _ = run(
        [presence("a", capacity=2), request("c1", 1), request("c2", 2), request("c3", 3)]
    )
    assert [w.conversation_id for w in state.waiting] == ["c3"]
    state, _ = run([presence("a", "offline")], state)
    assert [w.conversation_id for w in state.waiting] == ["c1", "c2", "c3"]
    assert state.assigned == {}
    state, log = run([presence("b", capacity=1)], state)
    assert [e.conversation_id for e in log if isinstance(e, AgentAssigned)] == ["c1"]


def test_away_agents_keep_their_conversations_but_get_no_new_ones() -> None:
    state, _ = run([presence("a"), request("c1", 1), presence("a", "away"), request("c2", 2)])
    assert state.assigned["c1"][0] == "a"
    assert state.position("c2") == 1


def test_sticky_returns_to_the_last_agent_when_free() -> None:
    state, _ = run(
        [presence("a"), presence("b"), request("c1", 1), release("c1"), request("c2", 2)]
    )
    # c2 went to b (least loaded, a was assigned more recently); c1 comes back to a.
    state, log = run([request("c1", 3)], state)
    assert [e.agent_id for e in log if isinstance(e, AgentAssigned)] == ["a"]


def test_skills_are_respected() -> None:
    state, _ = run(
        [presence("a", skills=["zh"]), request("c1", 1, skill="en"), request("c2", 2, skill="zh")]
    )
    assert state.assigned["c2"][0] == "a"
    assert state.position("c1") == 1


def test_repeated_commands_change_nothing() -> None:
    state, _ = run([presence("a", capacity=1), request("c1", 1), request("c2", 2)])
    assert decide_queue(state, request("c1", 1)) == []
    assert decide_queue(state, request("c2", 2)) == []
    gone, _ = run([release("c1")], state)
    assert decide_queue(gone, release("c1")) == []


def test_another_tenants_queue_is_rejected() -> None:
    command = SetAgentPresence(
        command_id="p",
        tenant_id="intruder",
        queue=QUEUE,
        issued_at=0,
        agent_id="a",
        presence="online",
        capacity=1,
    )
    with pytest.raises(RoutingRejected):
        decide_queue(Queue(), command)


def test_state_survives_json() -> None:
    state, _ = run(
        [presence("a", skills=["en"]), request("c1", 1, "vip"), request("c2", 2), release("c1")]
    )
    assert Queue.from_json(state.to_json()) == state


AGENTS = ["a", "b", "c"]
commands = st.one_of(
    st.builds(
        presence,
        st.sampled_from(AGENTS),
        st.sampled_from(["online", "online", "away", "offline"]),
        st.integers(0, 3),
        st.lists(st.sampled_from(["en", "zh"]), max_size=2, unique=True),
    ),
    st.builds(
        request,
        st.sampled_from([f"c{i}" for i in range(8)]),
        st.integers(0, 1000),
        st.sampled_from(["urgent", "vip", "normal", "low"]),
        st.sampled_from(["", "", "en", "zh"]),
    ),
    st.builds(release, st.sampled_from([f"c{i}" for i in range(8)])),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(commands, max_size=40), st.booleans())
def test_never_over_capacity_and_never_skipped(script: list[RoutingCommand], sticky: bool) -> None:
    state = Queue()
    for command in script:
        for event in decide_queue(state, command, sticky):
            if isinstance(event, AgentAssigned):
                agent = state.agents[event.agent_id]
                assert agent.presence == "online"
                assert len(agent.conversations) < agent.capacity, "assigned above capacity"
                chosen = next(
                    w for w in state.waiting if w.conversation_id == event.conversation_id
                )
                for earlier in state.waiting:
                    if earlier is chosen:
                        break
                    # An earlier entry of higher or equal priority that this agent could
                    # have taken must not be passed over.
                    assert not (
                        rank(earlier.priority) <= rank(chosen.priority)
                        and agent.can_take(earlier.skill)
                    ), f"{chosen.conversation_id} skipped {earlier.conversation_id}"
            state = evolve_queue(state, event)
        # No one waits while an agent could take them.
        for waiting in state.waiting:
            assert not any(a.can_take(waiting.skill) for a in state.agents.values())
        assert set(state.assigned).isdisjoint(w.conversation_id for w in state.waiting)


def test_transfer_to_a_specific_agent_when_they_can_take_it() -> None:
    state, _ = run([presence("a"), presence("b"), request("c1", 1)])
    holder = state.assigned["c1"][0]
    other = "b" if holder == "a" else "a"
    transfer = RequestAssignment(
        command_id="t1",
        tenant_id="t1",
        queue=QUEUE,
        issued_at=5,
        conversation_id="c1",
        priority="normal",
        requested_at=5,
        preferred_agent=other,
    )
    state, log = run([release("c1"), transfer], state)
    assert [e.agent_id for e in log if isinstance(e, AgentAssigned)] == [other]
