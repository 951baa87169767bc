"""Configuration as events, in the application shell: the sealing key, the first-run
seed from the environment, and the worker's follower (a Faust app dependency)."""

from __future__ import annotations

from typing import Any

from mode import Service

from connectors.config_log import ConfigFollower, config_record
from kefu.files import machine_secret
from kefu.settings import Settings
from schemas.config import SINGLE, ConfigState
from schemas.records import ConfigChanged
from schemas.topics import TopicNames


def config_key(settings: Settings) -> bytes:
    configured = settings.security.config_key.get_secret_value()
    return configured.encode() if configured else machine_secret(settings, "config")


def seed_records(settings: Settings) -> tuple[ConfigChanged, ...]:
    """What the environment says about each tenant, as config records: written by the
    gateway on a first run for every entity the topic does not have yet, so a change
    made in /admin afterwards is never overwritten by a restart. (Secrets and API keys
    stay in the environment and Redis: they are not copied onto the topic.)"""
    out = []
    for tenant, t in sorted(settings.tenants.items()):
        out.append(
            config_record(
                tenant, "tenant", SINGLE, {"name": tenant, "ai_enabled": t.ai_enabled}, "seed"
            )
        )
        teams = sorted({a.team for a in t.agents.values()} | {"default"})
        out += [config_record(tenant, "team", team, {"name": team}, "seed") for team in teams]
        for agent_id, a in sorted(t.agents.items()):
            data = {
                "name": a.name or agent_id,
                "role": "agent",
                "teams": [a.team],
                "skills": list(a.skills),
                "capacity": a.capacity,
                "disabled": False,
            }
            out.append(config_record(tenant, "agent", agent_id, data, "seed"))
    return tuple(out)


class ConfigService(Service):
    """The worker's config follower: started before the agents (a dependency of the
    Faust app), so no decision is made with a half-read configuration."""

    def __init__(self, settings: Settings, state: ConfigState, **kwargs: Any) -> None:
        self.follower = ConfigFollower(
            settings.kafka.servers,
            TopicNames(settings.topic_prefix).config,
            state,
            settings.kafka.client_options(),
        )
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        await self.follower.start()

    async def on_stop(self) -> None:
        await self.follower.stop()
