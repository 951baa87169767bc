"""Settings for a private stack on free loopback ports in a state dir of its own:
what the tests and the benchmarks run, so they never meet a developer's stack."""

from __future__ import annotations

from pathlib import Path

from kefu.processes import free_ports, free_run
from kefu.settings import (
    ClickHouseSettings,
    DevSettings,
    EmailSettings,
    GatewaySettings,
    KafkaSettings,
    RedisSettings,
    Settings,
    WorkerSettings,
)


def private_settings(state_dir: Path, workers: int = 1) -> Settings:
    """Every listening port free; ``workers`` consecutive worker web ports."""
    kafka, controller, redis, query, gateway, sink, smtp_in, smtp_relay = ports = free_ports(8)
    return Settings(
        state_dir=state_dir,
        kafka=KafkaSettings(port=kafka, controller_port=controller),
        redis=RedisSettings(port=redis),
        clickhouse=ClickHouseSettings(query_port=query),
        gateway=GatewaySettings(port=gateway),
        worker=WorkerSettings(web_port=free_run(workers, avoid=ports)),
        dev=DevSettings(webhook_sink_port=sink),
        email=EmailSettings(port=smtp_in, relay_port=smtp_relay),
    )
