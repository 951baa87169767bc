"""The console's agent directory, live: the environment's accounts (token hashes) with
what the config topic says about each agent on top (name, teams, skills, capacity,
disabled), and agents created in /admin. Read at each login and presence change, so an
administrator's change applies to the agent's next one without a restart."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from connectors.console import AgentAccount, AgentDirectory
from schemas.config import ConfigState


class LiveAgentDirectory(Mapping[str, Mapping[str, AgentAccount]]):
    def __init__(self, config: ConfigState, seed: AgentDirectory) -> None:
        self._config = config
        self._seed = seed

    def __getitem__(self, tenant: str) -> Mapping[str, AgentAccount]:
        accounts = dict(self._seed.get(tenant, {}))
        for agent_id, data in self._config.agents(tenant).items():
            if data.get("disabled"):
                accounts.pop(agent_id, None)  # a disabled agent cannot log in
                continue
            accounts[agent_id] = _account(accounts.get(agent_id), data)
        if not accounts and tenant not in self._seed and tenant not in self._config.tenants():
            raise KeyError(tenant)
        return accounts

    def __iter__(self) -> Iterator[str]:
        known = set(self._seed) | set(self._config.tenants())
        return iter(sorted(known))

    def __len__(self) -> int:
        return len(set(self._seed) | set(self._config.tenants()))


def _account(seeded: AgentAccount | None, data: Mapping[str, Any]) -> AgentAccount:
    teams = [str(t) for t in data.get("teams") or []]
    return AgentAccount(
        # A token hash only from the environment (kefu agents token): the config topic
        # signs agents in by password (connectors/accounts.py), not by token.
        token_sha256=seeded.token_sha256 if seeded is not None else "",
        team=teams[0] if teams else (seeded.team if seeded else "default"),
        skills=tuple(str(s) for s in data.get("skills") or (seeded.skills if seeded else ())),
        capacity=int(data.get("capacity") or (seeded.capacity if seeded else 3)),
        name=str(data.get("name") or (seeded.name if seeded else "")),
    )
