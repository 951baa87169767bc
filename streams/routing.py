"""Where a new conversation starts: with the AI when its tenant enables it, else in
line for the tenant's human team (``streams.queueing`` decides which agent)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_TEAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$")  # as /admin's ids


def _team_id(team: str) -> bool:
    return bool(team) and _TEAM.match(team) is not None


@dataclass(frozen=True, slots=True)
class Route:
    assignee: str  # "ai", an agent id, or "" while queued
    queue: str
    priority: str
    reason: str


@dataclass(frozen=True, slots=True)
class TenantRouting:
    ai_enabled: bool = True
    vip_customers: frozenset[str] = frozenset()
    urgent_channels: frozenset[str] = frozenset()


def router(tenant: Callable[[str], TenantRouting]) -> Callable[[str, str, str, str], Route]:
    """``route(tenant, channel, customer, team)``: AI first where enabled, else the
    team's line: ``team`` (the message asked for one: the web chat's team or pre-chat
    topic, checked against the tenant's teams by the gateway), else the tenant's
    default team. The queue is that team's either way, so a hand-off from the AI goes
    there. VIP customers and urgent channels go ahead of normal ones."""

    def route(tenant_id: str, channel: str, customer_id: str, team: str = "") -> Route:
        config = tenant(tenant_id)
        queue = f"{tenant_id}:{team if _team_id(team) else 'default'}"
        priority = "normal"
        if channel in config.urgent_channels:
            priority = "urgent"
        elif customer_id in config.vip_customers:
            priority = "vip"
        if config.ai_enabled:
            return Route("ai", queue, priority, "ai-first")
        return Route("", queue, priority, "no-ai")

    return route
