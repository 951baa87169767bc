"""``kefu agents``: console logins for human agents.

Settings keep only the SHA-256 of each agent's token (``tenants.<t>.agents.<id>.
token_sha256``); ``kefu agents token`` makes a new token and prints both, once."""

from __future__ import annotations

import json
import secrets

import click

from connectors.console import AgentAccount, AgentDirectory, token_hash
from kefu.settings import Settings, load_settings


def agent_directory(settings: Settings) -> AgentDirectory:
    """What the gateway needs to log agents in: hashes, teams, skills, capacities."""
    return {
        tenant: {
            agent: AgentAccount(
                token_sha256=a.token_sha256.get_secret_value(),
                team=a.team,
                skills=tuple(a.skills),
                capacity=a.capacity,
                name=a.name,
            )
            for agent, a in t.agents.items()
        }
        for tenant, t in settings.tenants.items()
    }


@click.group()
def agents() -> None:
    """Human agents who log in to the console (/console)."""


@agents.command("token")
@click.option("--tenant", default="demo", show_default=True)
@click.option("--agent", "agent_id", required=True, help="the agent's id, e.g. alice")
@click.option("--team", default="default", show_default=True)
@click.option("--capacity", default=3, show_default=True, type=click.IntRange(0, 100))
def token(tenant: str, agent_id: str, team: str, capacity: int) -> None:
    """Print a new login token for an agent and the settings that accept it."""
    value = secrets.token_urlsafe(24)
    digest = token_hash(value)
    click.echo(f"token:  {value}")
    click.echo(f"sha256: {digest}")
    click.echo("Give the agent the token; put only the hash in the settings, e.g.")
    setting = {agent_id: {"token_sha256": digest, "team": team, "capacity": capacity}}
    click.echo(f"  tenants.{tenant}.agents = {json.dumps(setting)}")


@agents.command("list")
def list_agents() -> None:
    """The configured agents per tenant (never their token hashes)."""
    settings = load_settings()
    for tenant, t in settings.tenants.items():
        for agent_id, a in t.agents.items():
            login = "yes" if a.token_sha256.get_secret_value() else "no token"
            skills = ",".join(a.skills) or "-"
            click.echo(
                f"{tenant:<12} {agent_id:<16} team={a.team} capacity={a.capacity} "
                f"skills={skills} login={login}"
            )
