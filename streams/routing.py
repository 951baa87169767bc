"""Routing, skeleton: a conversation goes to the AI when its tenant enables it, else to
the tenant's human queue. The routing issue adds agents, skills and capacity."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Route:
    assignee: str  # "ai", an agent id, or "" while queued
    queue: str
    priority: str
    reason: str


def router(ai_enabled: Callable[[str], bool]) -> Callable[[str, str], Route]:
    def route(tenant_id: str, channel: str) -> Route:
        queue = f"{tenant_id}:default"
        if ai_enabled(tenant_id):
            return Route("ai", queue, "normal", "ai-first")
        return Route("", queue, "normal", "no-ai")

    return route
