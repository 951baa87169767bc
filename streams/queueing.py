"""A queue (tenant + team) as a pure fold over its events, and the router's decisions.

One router actor owns a queue (its commands are keyed by queue), so assignment
decisions for a queue are serialised without locks. ``decide_queue`` assigns the
waiting conversation that comes first by priority then age to the least-loaded
eligible agent (ties: the one assigned longest ago, i.e. round-robin), never above
capacity; with ``sticky`` a conversation goes back to its last agent if that agent is
eligible. Every change is an event, so the queue state is rebuilt by ``fold_queue``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from schemas.records import (
    AgentAssigned,
    AgentPresenceChanged,
    AssignmentReleased,
    ConversationEnqueued,
    QueueEvent,
    ReleaseAssignment,
    RequestAssignment,
    RoutingCommand,
    SetAgentPresence,
    event_id_for,
)

# Smaller rank goes first.
PRIORITY_RANK = {"urgent": 0, "vip": 1, "high": 1, "normal": 2, "low": 3}
PRESENCES = ("online", "away", "offline")


def rank(priority: str) -> int:
    return PRIORITY_RANK.get(priority, PRIORITY_RANK["normal"])


@dataclass(frozen=True, slots=True)
class Agent:
    agent_id: str
    presence: str = "offline"
    capacity: int = 0
    skills: tuple[str, ...] = ()
    conversations: tuple[str, ...] = ()
    last_assigned: int = 0  # queue seq of this agent's latest assignment (round-robin)

    def can_take(self, skill: str) -> bool:
        return (
            self.presence == "online"
            and len(self.conversations) < self.capacity
            and (not skill or skill in self.skills)
        )


@dataclass(frozen=True, slots=True)
class Waiting:
    conversation_id: str
    priority: str
    order: int
    skill: str = ""
    preferred: str = ""  # a transfer to this agent

    @property
    def sort_key(self) -> tuple[int, int]:
        return (rank(self.priority), self.order)


@dataclass(frozen=True, slots=True)
class Queue:
    queue: str = ""
    tenant_id: str = ""
    seq: int = 0
    agents: dict[str, Agent] = field(default_factory=dict)
    waiting: tuple[Waiting, ...] = ()  # kept sorted by (priority, order)
    assigned: dict[str, tuple[str, Waiting]] = field(default_factory=dict)  # conv -> agent
    last_agent: dict[str, str] = field(default_factory=dict)  # conv -> agent, for sticky

    def position(self, conversation_id: str) -> int:
        for index, waiting in enumerate(self.waiting):
            if waiting.conversation_id == conversation_id:
                return index + 1
        return 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Queue:
        def waiting(w: dict[str, Any]) -> Waiting:
            return Waiting(**w)

        return cls(
            queue=data["queue"],
            tenant_id=data["tenant_id"],
            seq=data["seq"],
            agents={
                k: Agent(
                    **{
                        **a,
                        "skills": tuple(a["skills"]),
                        "conversations": tuple(a["conversations"]),
                    }
                )
                for k, a in data["agents"].items()
            },
            waiting=tuple(waiting(w) for w in data["waiting"]),
            assigned={k: (v[0], waiting(v[1])) for k, v in data["assigned"].items()},
            last_agent=dict(data["last_agent"]),
        )


def evolve_queue(state: Queue, event: QueueEvent) -> Queue:
    base = dataclasses.replace(state, queue=event.queue, tenant_id=event.tenant_id, seq=event.seq)
    match event:
        case AgentPresenceChanged():
            old = state.agents.get(event.agent_id, Agent(event.agent_id))
            agent = dataclasses.replace(
                old, presence=event.presence, capacity=event.capacity, skills=tuple(event.skills)
            )
            return dataclasses.replace(base, agents={**state.agents, event.agent_id: agent})
        case ConversationEnqueued():
            entry = Waiting(
                event.conversation_id,
                event.priority,
                event.order,
                event.skill,
                event.preferred_agent,
            )
            waiting = tuple(sorted((*state.waiting, entry), key=lambda w: w.sort_key))
            return dataclasses.replace(base, waiting=waiting)
        case AgentAssigned():
            entry = next(w for w in state.waiting if w.conversation_id == event.conversation_id)
            agent = state.agents[event.agent_id]
            agent = dataclasses.replace(
                agent,
                conversations=(*agent.conversations, event.conversation_id),
                last_assigned=event.seq,
            )
            return dataclasses.replace(
                base,
                agents={**state.agents, event.agent_id: agent},
                waiting=_without(state.waiting, event.conversation_id),
                assigned={**state.assigned, event.conversation_id: (event.agent_id, entry)},
                last_agent={**state.last_agent, event.conversation_id: event.agent_id},
            )
        case AssignmentReleased():
            agents = state.agents
            if event.agent_id and event.agent_id in agents:
                agent = agents[event.agent_id]
                remaining = tuple(c for c in agent.conversations if c != event.conversation_id)
                agent = dataclasses.replace(agent, conversations=remaining)
                agents = {**agents, event.agent_id: agent}
            return dataclasses.replace(
                base,
                agents=agents,
                waiting=_without(state.waiting, event.conversation_id),
                assigned={k: v for k, v in state.assigned.items() if k != event.conversation_id},
            )
        case _:
            return base


def _without(waiting: tuple[Waiting, ...], conversation_id: str) -> tuple[Waiting, ...]:
    return tuple(w for w in waiting if w.conversation_id != conversation_id)


def fold_queue(events: Iterable[QueueEvent], state: Queue | None = None) -> Queue:
    current = state or Queue()
    for event in events:
        current = evolve_queue(current, event)
    return current


class RoutingRejected(ValueError):
    """A routing command that must not be applied (it goes to the dead-letter topic)."""


class _QueueDraft:
    """Appends events and folds them as it goes, so later decisions see earlier ones."""

    def __init__(self, state: Queue, command: RoutingCommand) -> None:
        self.state = state
        self.command = command
        self.events: list[QueueEvent] = []

    def add(self, cls: type[QueueEvent], **fields: Any) -> QueueEvent:
        event = cls(
            event_id=event_id_for(self.command.command_id, len(self.events)),
            tenant_id=self.command.tenant_id,
            queue=self.command.queue,
            seq=self.state.seq + 1,
            occurred_at=self.command.issued_at,
            **fields,
        )
        self.state = evolve_queue(self.state, event)
        self.events.append(event)
        return event


def decide_queue(state: Queue, command: RoutingCommand, sticky: bool = True) -> list[QueueEvent]:
    if not command.queue.startswith(f"{command.tenant_id}:"):
        raise RoutingRejected(f"queue {command.queue!r} is not tenant {command.tenant_id!r}'s")
    # Every command is idempotent in the domain (a request already in line or served, a
    # release of what is gone, a presence already set), so redeliveries change nothing.
    draft = _QueueDraft(state, command)
    match command:
        case SetAgentPresence():
            _presence(draft, command)
        case RequestAssignment():
            if command.conversation_id in state.assigned or state.position(command.conversation_id):
                return []  # already served or in line: a repeated request
            draft.add(
                ConversationEnqueued,
                conversation_id=command.conversation_id,
                priority=command.priority,
                skill=command.skill,
                order=command.requested_at,
                preferred_agent=command.preferred_agent,
            )
        case ReleaseAssignment():
            held = state.assigned.get(command.conversation_id)
            if held is None and not state.position(command.conversation_id):
                return []  # nothing to release: it was never here, or released already
            draft.add(
                AssignmentReleased,
                conversation_id=command.conversation_id,
                agent_id=held[0] if held else "",
                reason=command.reason,
            )
    fill(draft, sticky)
    return draft.events


def _presence(draft: _QueueDraft, command: SetAgentPresence) -> None:
    if command.presence not in PRESENCES:
        raise RoutingRejected(f"presence must be one of {PRESENCES}, not {command.presence!r}")
    if command.capacity < 0:
        raise RoutingRejected("capacity must be >= 0")
    previous = draft.state.agents.get(command.agent_id)
    draft.add(
        AgentPresenceChanged,
        agent_id=command.agent_id,
        presence=command.presence,
        capacity=command.capacity,
        skills=list(command.skills),
    )
    if command.presence == "offline" and previous is not None:
        # Their open conversations go back in line, ahead of newer ones of equal priority.
        for conversation_id in previous.conversations:
            _agent_id, entry = draft.state.assigned[conversation_id]
            draft.add(
                AssignmentReleased,
                conversation_id=conversation_id,
                agent_id=command.agent_id,
                reason="agent offline",
            )
            draft.add(
                ConversationEnqueued,
                conversation_id=conversation_id,
                priority=entry.priority,
                skill=entry.skill,
                order=entry.order,
            )


def fill(draft: _QueueDraft, sticky: bool) -> None:
    """Assign while someone waits and someone can take them: first in line first."""
    while True:
        choice = _next_assignment(draft.state, sticky)
        if choice is None:
            return
        entry, agent_id = choice
        draft.add(
            AgentAssigned,
            conversation_id=entry.conversation_id,
            agent_id=agent_id,
            priority=entry.priority,
            order=entry.order,
        )


def _next_assignment(state: Queue, sticky: bool) -> tuple[Waiting, str] | None:
    for entry in state.waiting:  # sorted: priority, then age
        eligible = [a for a in state.agents.values() if a.can_take(entry.skill)]
        if not eligible:
            continue  # a skill nobody free has: later entries may still be served
        if entry.preferred and any(a.agent_id == entry.preferred for a in eligible):
            return entry, entry.preferred  # a transfer to this agent
        last = state.last_agent.get(entry.conversation_id)
        if sticky and last is not None and any(a.agent_id == last for a in eligible):
            return entry, last
        best = min(eligible, key=lambda a: (len(a.conversations), a.last_assigned, a.agent_id))
        return entry, best.agent_id
    return None
