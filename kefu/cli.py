"""The ``kefu`` command: the embedded stack, the processes, the demo."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from kefu.processes import ProcessError
from kefu.runtime import configure_logging
from kefu.settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])


def _process_options(fn: F) -> F:
    """Hidden options that name a daemon in its command line (see kefu.services)."""
    fn = click.option("--instance", hidden=True, default="")(fn)
    return click.option("--state", hidden=True, default="")(fn)


def _settings() -> Settings:
    return load_settings()


@click.group()
def main() -> None:
    """kefu: self-hosted, event-sourced customer-service pipeline."""
    from kefu.data_keys import install_lazily

    # Sealed personal fields open in any command that decodes events (replay, audit,
    # privacy export, ...); the keys topic is read only when one is first met.
    install_lazily(_settings)


# --------------------------------------------------------------------------- stack


@main.group()
def stack() -> None:
    """The embedded stack: Kafka, Redis, and the ClickHouse projector (chdb owner)."""


@stack.command("fetch")
def stack_fetch() -> None:
    """Download the Kafka broker's jars from Maven Central (once; cached)."""
    from kefu.stack import Stack

    try:
        path = Stack(_settings()).fetch_kafka_jars()
    except ProcessError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"kafka jars: {path}")


def stack_up_all(settings: Settings) -> dict[str, float]:
    from kefu.services import Services
    from kefu.stack import Stack
    from kefu.topics import ensure_topics

    ready = Stack(settings).up()
    created = asyncio.run(ensure_topics(settings))
    if created:
        click.echo(f"created topics: {', '.join(created)}")
    services = Services(settings)
    ready.update(services.start([services.clickhouse()]))
    return ready


@stack.command("up")
@click.option(
    "--brokers",
    type=click.IntRange(1, 5),
    default=None,
    help="embedded Kafka nodes (3: a KRaft cluster, replication 3, min.insync.replicas 2); "
    "default: the kafka.brokers setting",
)
def stack_up(brokers: int | None) -> None:
    """Start what is not running and wait until it answers."""
    settings = _settings()
    if brokers is not None and brokers != settings.kafka.brokers:
        kafka = settings.kafka.model_copy(update={"brokers": brokers})
        settings = settings.model_copy(update={"kafka": kafka})
        click.echo(
            f"kafka: {brokers} brokers on {kafka.servers}; set KEFU_KAFKA__BROKERS={brokers} "
            "for kefu's other commands (they bootstrap from every node)"
        )
    try:
        ready = stack_up_all(settings)
    except ProcessError as exc:
        raise click.ClickException(str(exc)) from exc
    for name, seconds in ready.items():
        click.echo(f"{name:<12} ready after {seconds:.1f} s")


def stack_down_all(settings: Settings) -> None:
    from kefu.services import Services
    from kefu.stack import Stack

    services = Services(settings, workers=8)
    services.stop([services.clickhouse(), *services.app_services()])
    for name, state in Stack(settings).down().items():
        click.echo(f"{name:<12} {state}")


@stack.command("down")
def stack_down() -> None:
    """Stop kefu's processes and the embedded services (data is kept)."""
    stack_down_all(_settings())


@stack.command("status")
def stack_status() -> None:
    from kefu.services import Services
    from kefu.stack import Stack

    settings = _settings()
    for name, state in {**Stack(settings).status(), **Services(settings).status()}.items():
        click.echo(f"{name:<12} {state}")


# ----------------------------------------------------------------------- processes


@main.command()
@click.option("--web-port", type=int, default=None, help="Faust web port (health, metrics)")
@_process_options
def worker(web_port: int | None, instance: str, state: str) -> None:
    """Run a worker: the conversation, responder, delivery and projection agents."""
    from kefu.worker import run_worker

    settings = _settings()
    configure_logging(settings.log_level)
    run_worker(settings, web_port)


@main.command()
@_process_options
def gateway(instance: str, state: str) -> None:
    """Run the gateway: REST API, web chat WebSocket and pages."""
    import uvicorn

    from connectors.gateway import GatewayConfig, create_app
    from kefu.chat_channels import telegram_edge, wechat_edge
    from kefu.config import config_key, seed_records
    from kefu.data_keys import key_store
    from kefu.erasure import Eraser
    from kefu.files import files
    from kefu.telemetry import setup_tracing
    from schemas.topics import TopicNames

    settings = _settings()
    configure_logging(settings.log_level)
    config = GatewayConfig(
        bootstrap=settings.kafka.servers,
        commands_topic=TopicNames(settings.topic_prefix).commands,
        routing_topic=TopicNames(settings.topic_prefix).routing,
        redis_url=settings.redis.dsn,
        api_keys={},  # hashes only, in auth (kefu/cli_keys.py)
        dashboard=report_runner(settings),
        max_body_bytes=settings.gateway.max_body_bytes,
        wechat=wechat_edge(settings),
        telegram=telegram_edge(settings),
        agents=agent_directory(settings),
        gc_freeze_s=settings.gateway.gc_freeze_s,
        gc_full_s=settings.gateway.gc_full_s,
        files=files(settings),
        config_topic=TopicNames(settings.topic_prefix).config,
        config_key=config_key(settings),
        config_seed=seed_records(settings),
        privacy=Eraser(settings, key_store(settings)),
        **gateway_security(settings),
    )
    g = settings.gateway
    setup_tracing(settings, "gateway")
    _raise_open_files_limit()  # a socket per chat tab: the soft limit is often 1024
    uvicorn.run(
        create_app(config),
        host=g.host,
        port=g.port,
        log_level="warning",
        loop=g.event_loop,
        ws=g.ws,
        ws_per_message_deflate=g.ws_per_message_deflate,
        ws_max_size=g.ws_max_size,
        ws_ping_interval=g.ws_ping_interval or None,
        ws_ping_timeout=g.ws_ping_timeout or None,
        backlog=g.backlog,
    )


def _raise_open_files_limit() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@main.command()
@_process_options
def projector(instance: str, state: str) -> None:
    """Run the ClickHouse projector (and, for chdb, the read-only query endpoint)."""
    from kefu.projector import run_projector

    settings = _settings()
    configure_logging(settings.log_level)
    run_projector(settings)


@main.command("webhook-sink")
@_process_options
def webhook_sink(instance: str, state: str) -> None:
    """Run a local receiver that verifies and lists webhook deliveries (dev, demo)."""
    from pathlib import Path

    import uvicorn

    from connectors.webhook_sink import webhook_sink as sink

    settings = _settings()
    secrets = {t: s.webhook_secret.get_secret_value().encode() for t, s in settings.tenants.items()}
    port = settings.dev.webhook_sink_port
    journal = Path(settings.dev.webhook_sink_journal) if settings.dev.webhook_sink_journal else None
    uvicorn.run(sink(secrets, journal), host="127.0.0.1", port=port, log_level="warning")


@main.command()
def topics() -> None:
    """Create kefu's topics (idempotent)."""
    from kefu.topics import ensure_topics

    created = asyncio.run(ensure_topics(_settings()))
    click.echo(f"created: {', '.join(created) or 'nothing (all exist)'}")


# ------------------------------------------------------------------------ analytics


@main.group()
def analytics() -> None:
    """Query the ClickHouse analytics store."""


@analytics.command("query")
@click.argument("sql")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def analytics_query(sql: str, as_json: bool) -> None:
    from projections.clickhouse_query import AnalyticsClient, QueryError

    settings = _settings()
    client = AnalyticsClient(settings.clickhouse_url, settings.clickhouse.query_port)
    try:
        result = client.query(sql)
    except QueryError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({"columns": result.columns, "rows": result.rows}, default=str))
    else:
        click.echo(format_table(result.columns, result.rows))


def format_table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in columns], *[[str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- demo


@main.command()
@click.option("--keep-running", is_flag=True, help="leave the stack, worker and gateway up")
@click.option("--workers", default=1, show_default=True, help="worker processes")
def demo(keep_running: bool, workers: int) -> None:
    """Start everything, drive scripted conversations through it, print what happened."""
    from kefu.demo import run_demo

    sys.exit(run_demo(_settings(), keep_running=keep_running, workers=workers))


# Areas register their commands here, one line each (kefu/cli_<area>.py).
from kefu.cli_bench import bench  # noqa: E402

main.add_command(bench)
from kefu.cli_ai import ai  # noqa: E402

main.add_command(ai)
from kefu.cli_analytics import audit, replay_command, report, report_runner  # noqa: E402

analytics.add_command(report)
main.add_command(replay_command)
main.add_command(audit)
from kefu.cli_moderation import moderation  # noqa: E402

main.add_command(moderation)
from kefu.cli_email import smtp  # noqa: E402

main.add_command(smtp)
from kefu.cli_agents import agent_directory, agents  # noqa: E402

main.add_command(agents)
from kefu.cli_accounts import accounts  # noqa: E402

main.add_command(accounts)
from kefu.cli_keys import gateway_security, keys  # noqa: E402

main.add_command(keys)
from kefu.cli_deadletter import deadletter  # noqa: E402

main.add_command(deadletter)
from kefu.cli_files import files  # noqa: E402

main.add_command(files)
from kefu.cli_privacy import privacy  # noqa: E402

main.add_command(privacy)


if __name__ == "__main__":
    main()
