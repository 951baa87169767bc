"""The email channel's wiring: ``kefu smtp`` (the listener process) and the sender
the worker's delivery agent uses."""

from __future__ import annotations

import asyncio
import signal

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
from schemas.topics import TopicNames


def mailboxes(settings: Settings) -> Mailboxes:
    addresses = {
        address.strip().lower(): tenant
        for tenant, t in settings.tenants.items()
        for address in t.email_addresses
    }
    return Mailboxes(frozenset(settings.tenants), addresses, settings.email.inbound_local)


def from_address(settings: Settings, tenant: str) -> str:
    t = settings.tenants[tenant]
    if t.email_addresses:
        return t.email_addresses[0]
    local, _, domain = settings.email.from_address.partition("@")
    return f"{local}+{tenant}@{domain}"


def listener_config(settings: Settings) -> ListenerConfig:
    e = settings.email
    return ListenerConfig(
        bootstrap=settings.kafka.servers,
        commands_topic=TopicNames(settings.topic_prefix).commands,
        redis_url=settings.redis.dsn,
        mailboxes=mailboxes(settings),
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


def email_sender(settings: Settings) -> EmailSender:
    e = settings.email
    config = RelayConfig(
        host=e.relay_host,
        port=e.relay_port,
        from_addresses={t: from_address(settings, t) for t in settings.tenants},
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
