"""``kefu accounts``: the accounts no one can create from /admin.

The first operator (role ``operator`` in the operators' tenant ``_ops``) signs in at
/login and manages every tenant from /admin; before there is one, no page can make one,
so ``kefu accounts create-operator`` writes it onto the config topic, sealed as the
gateway seals an invited agent's password (the same ``security.config_key``). The
password comes from a prompt (asked twice, never echoed) or from ``--password-file``,
never from the command line (argv is visible to every user of the machine)."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import click
from aiokafka import AIOKafkaProducer

from connectors.accounts import OPERATOR_TENANT, hash_password, secret_context
from connectors.config_log import ConfigFollower, SecretBox, config_record, publish_config
from kefu.config import config_key
from kefu.settings import Settings, load_settings
from schemas.config import ConfigState
from schemas.records import ConfigChanged
from schemas.topics import TopicNames

MIN_PASSWORD = 10  # as /admin's password reset
MAX_PASSWORD = 200
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s.]+(\.[^@\s.]+)+$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$")


def operator_id(email: str) -> str:
    """An account id from the address's local part (letters, digits, ``_ . -``)."""
    local = email.partition("@")[0]
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]+", "-", local).strip("-.") or "operator"
    return cleaned if cleaned[0].isalnum() else f"op{cleaned}"[:64]


def password_problem(password: str) -> str | None:
    if len(password) < MIN_PASSWORD:
        return f"the password needs at least {MIN_PASSWORD} characters"
    if len(password) > MAX_PASSWORD:
        return f"the password has at most {MAX_PASSWORD} characters"
    return None


def read_password_file(path: Path) -> str:
    """The file's first line (a trailing newline is not part of the password)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    return lines[0] if lines else ""


def operator_record(
    settings: Settings,
    state: ConfigState,
    agent_id: str,
    email: str,
    password: str,
    name: str,
    reset: bool,
) -> ConfigChanged:
    """The account's record, or ValueError saying why not (taken email or id)."""
    email = email.strip().lower()
    existing = state.get(OPERATOR_TENANT, "agent", agent_id)
    same_email = next(
        (
            other
            for other, data in state.agents(OPERATOR_TENANT).items()
            if str(data.get("email", "")).strip().lower() == email
        ),
        None,
    )
    if same_email is not None and same_email != agent_id:
        raise ValueError(f"{email} is operator {same_email!r} already (--id {same_email})")
    if existing is not None and not reset:
        raise ValueError(
            f"operator {agent_id!r} exists: --reset-password sets a new password for it"
        )
    data: dict[str, Any] = dict(existing or {})
    data.update(
        {
            "name": name or str(data.get("name") or "") or agent_id,
            "email": email,
            "role": "operator",
            "teams": list(data.get("teams") or []),
            "skills": list(data.get("skills") or []),
            "capacity": int(data.get("capacity") or 3),
            "disabled": False,
            "avatar": str(data.get("avatar") or ""),
            "password": hash_password(password),
        }
    )
    box = SecretBox(config_key(settings))
    sealed = box.seal_fields(data, secret_context(OPERATOR_TENANT, "agent", agent_id))
    previous = state.version(OPERATOR_TENANT, "agent", agent_id)
    return config_record(OPERATOR_TENANT, "agent", agent_id, sealed, "cli", previous)


async def _write_operator(
    settings: Settings, agent_id: str, email: str, password: str, name: str, reset: bool
) -> ConfigChanged:
    topic = TopicNames(settings.topic_prefix).config
    options = settings.kafka.client_options()
    follower = ConfigFollower(settings.kafka.servers, topic, ConfigState(), options)
    await follower.start(wait_s=15.0)  # what the topic says now: the id, the version
    try:
        record = operator_record(settings, follower.state, agent_id, email, password, name, reset)
    finally:
        await follower.stop()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.servers, acks="all", **options)
    await producer.start()
    try:
        await publish_config(producer, topic, record)
    finally:
        await producer.stop()
    return record


@click.group()
def accounts() -> None:
    """Sign-in accounts that /admin cannot create (the first operator)."""


@accounts.command("create-operator")
@click.option("--email", required=True, help="the address the operator signs in with")
@click.option("--name", default="", help="shown in /admin (default: the id)")
@click.option("--id", "agent_id", default="", help="the account id (default: from the email)")
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="read the password from this file's first line (default: a prompt)",
)
@click.option("--reset-password", "reset", is_flag=True, help="the operator exists: new password")
def create_operator(
    email: str, name: str, agent_id: str, password_file: Path | None, reset: bool
) -> None:
    """Create an operator account (all tenants) in the tenant ``_ops``; sign in at
    /login with tenant ``_ops``, this email and the password."""
    email = email.strip().lower()
    if not _EMAIL.match(email):
        raise click.BadParameter("not an email address", param_hint="--email")
    agent_id = agent_id or operator_id(email)
    if not _ID.match(agent_id):
        raise click.BadParameter("letters, digits and _ . @ - (64 at most)", param_hint="--id")
    if password_file is not None:
        password = read_password_file(password_file)
    elif sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:  # piped: one line on stdin, still never on the command line
        password = sys.stdin.readline().rstrip("\r\n")
    problem = password_problem(password)
    if problem:
        raise click.UsageError(problem)
    settings = load_settings()
    try:
        record = asyncio.run(_write_operator(settings, agent_id, email, password, name, reset))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    except RuntimeError as exc:  # no topic, no broker
        raise click.ClickException(f"{exc}; is the stack up (`kefu stack up`)?") from exc
    done = "password reset for" if reset else "created"
    click.echo(
        f"operator {agent_id!r} {done} ({email}), config version {record.version}; "
        f"sign in at /login with tenant {OPERATOR_TENANT}"
    )
