"""The email channel's wiring: ``kefu smtp`` (the listener process) and the sender
the worker's delivery agent uses."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator, Mapping

import click
import redis.asyncio as aioredis

from connectors.email_in import ListenerConfig, Mailboxes, serve
from connectors.email_out import EmailSender, RelayConfig
from connectors.email_threads import ThreadStore
from kefu.cli_keys import limits_of
from kefu.files import attachment_policy, blob_store
from kefu.runtime import configure_logging
from kefu.settings import Settings, load_settings
from kefu.telemetry import ops_app, serve_ops, setup_tracing
from schemas.config import ConfigState
from schemas.topics import TopicNames


def mailboxes(settings: Settings, live: ConfigState | None = None) -> Mailboxes:
    """Recipient -> tenant: the environment's ``email_addresses`` (the seed), with the
    live configuration's ``email`` channel entities over them when ``live`` is given."""
    addresses = {
        address.strip().lower(): tenant
        for tenant, t in settings.tenants.items()
        for address in t.email_addresses
    }
    return Mailboxes(frozenset(settings.tenants), addresses, settings.email.inbound_local, live)


def _plus_address(settings: Settings, tenant: str) -> str:
    local, _, domain = settings.email.from_address.partition("@")
    return f"{local}+{tenant}@{domain}"


def from_address(settings: Settings, tenant: str) -> str:
    t = settings.tenants[tenant]
    if t.email_addresses:
        return t.email_addresses[0]
    return _plus_address(settings, tenant)


class FromAddresses(Mapping[str, str]):
    """tenant -> the From address of its replies, live: the ``email`` channel entity's
    ``from_address``, else its first ``addresses`` entry, else the environment's (first
    ``email_addresses`` entry, else ``support+<tenant>@`` of ``email.from_address``)."""

    def __init__(self, settings: Settings, live: ConfigState | None) -> None:
        self._settings = settings
        self._live = live

    def __getitem__(self, tenant: str) -> str:
        data = self._live.get(tenant, "channel", "email") if self._live is not None else None
        if data:
            chosen = data.get("from_address")
            if isinstance(chosen, str) and chosen:
                return chosen
            listed = data.get("addresses")
            if isinstance(listed, list) and listed and isinstance(listed[0], str):
                return listed[0]
        if tenant in self._settings.tenants:
            return from_address(self._settings, tenant)
        if self._live is not None and self._live.get(tenant, "tenant") is not None:
            return _plus_address(self._settings, tenant)  # a tenant made in /admin
        raise KeyError(tenant)

    def _tenants(self) -> set[str]:
        return set(self._settings.tenants) | set(self._live.tenants() if self._live else ())

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._tenants()))

    def __len__(self) -> int:
        return len(self._tenants())


def listener_config(settings: Settings) -> ListenerConfig:
    e = settings.email
    return ListenerConfig(
        bootstrap=settings.kafka.servers,
        commands_topic=TopicNames(settings.topic_prefix).commands,
        redis_url=settings.redis.dsn,
        # Followed live from the config topic while the listener runs (email_in.serve).
        mailboxes=mailboxes(settings, ConfigState()),
        config_topic=TopicNames(settings.topic_prefix).config,
        host=e.host,
        port=e.port,
        hostname=e.hostname,
        max_message_bytes=e.max_message_bytes,
        max_text_chars=e.max_text_chars,
        kafka_options=settings.kafka.client_options(),
        limits=limits_of(e.rate_limits),
        blobs=blob_store(settings),
        policy=attachment_policy(settings),
    )


def email_sender(settings: Settings, live: ConfigState | None = None) -> EmailSender:
    e = settings.email
    config = RelayConfig(
        host=e.relay_host,
        port=e.relay_port,
        from_addresses=FromAddresses(settings, live),
        hostname=e.hostname,
        username=e.relay_user,
        password=e.relay_password.get_secret_value(),
        starttls=e.relay_starttls,
        timeout=e.relay_timeout,
        attempts=e.attempts,
        backoff=e.backoff_seconds,
    )
    # The client connects on first use, inside the worker's event loop.
    return EmailSender(
        ThreadStore(aioredis.Redis.from_url(settings.redis.dsn)), config, blobs=blob_store(settings)
    )


async def _run(config: ListenerConfig, ops: tuple[str, int] = ("", 0)) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def ready() -> tuple[bool, dict[str, object]]:
        _, writer = await asyncio.open_connection(config.host, config.port)
        writer.close()
        return True, {}

    # The listener speaks SMTP only: /metrics, /healthz, /readyz on a port of their own.
    server = await serve_ops(ops_app(ready), ops[0], ops[1], "smtp")
    await serve(config, stop)
    if server is not None:
        server.should_exit = True


@click.command("smtp")
@click.option("--instance", hidden=True, default="")
@click.option("--state", hidden=True, default="")
def smtp(instance: str, state: str) -> None:
    """Run the SMTP listener for inbound email (127.0.0.1, ``email.port``)."""
    settings = load_settings()
    configure_logging(settings.log_level)
    setup_tracing(settings, "smtp")
    o = settings.observability
    asyncio.run(_run(listener_config(settings), (o.ops_host, o.smtp_port)))
