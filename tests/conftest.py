"""The real stack for integration tests: Kafka, Redis, the ClickHouse projector (chdb),
a worker, the gateway and the webhook sink, started once per session on free loopback
ports in a temporary state dir, and stopped after."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from pydantic import SecretStr

from kefu.cli import stack_down_all, stack_up_all
from kefu.processes import free_ports
from kefu.services import Services
from kefu.settings import (
    ClickHouseSettings,
    DevSettings,
    GatewaySettings,
    KafkaSettings,
    RedisSettings,
    Settings,
    TenantSettings,
    WorkerSettings,
)
from tests.fake_openai import FakeOpenAI

T = TypeVar("T")


def isolated_settings(state_dir: Path) -> Settings:
    kafka, controller, redis, query, gateway, web, sink = free_ports(7)
    sink_url = f"http://127.0.0.1:{sink}/webhook"
    return Settings(
        state_dir=state_dir,
        kafka=KafkaSettings(port=kafka, controller_port=controller),
        redis=RedisSettings(port=redis),
        clickhouse=ClickHouseSettings(query_port=query, batch_seconds=0.2),
        gateway=GatewaySettings(port=gateway),
        worker=WorkerSettings(web_port=web),
        dev=DevSettings(webhook_sink_port=sink),
        tenants={
            "demo": TenantSettings(
                api_key=SecretStr("demo-test-key"),
                webhook_url=sink_url,
                webhook_secret=SecretStr("demo-secret"),
            ),
            "acme": TenantSettings(
                api_key=SecretStr("acme-test-key"),
                webhook_url=sink_url,
                webhook_secret=SecretStr("acme-secret"),
                ai_enabled=False,
            ),
            # Human-only tenants for the routing tests (one queue each, so tests do
            # not share agents): hq for assignment, timers for idle close and SLA.
            "hq": TenantSettings(
                api_key=SecretStr("hq-test-key"),
                ai_enabled=False,
                vip_customers=["vip-customer"],
            ),
            "hq2": TenantSettings(api_key=SecretStr("hq2-test-key"), ai_enabled=False),
            "hq3": TenantSettings(api_key=SecretStr("hq3-test-key"), ai_enabled=False),
            "timers": TenantSettings(
                api_key=SecretStr("timers-test-key"),
                ai_enabled=False,
                idle_close_seconds=4.0,
                sla_first_response_seconds={"normal": 1.0},
            ),
        },
        log_level="INFO",
    )


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The whole pipeline, running. Yields its settings (ports, tenants)."""
    settings = isolated_settings(tmp_path_factory.mktemp("kefu-state"))
    services = Services(settings)
    try:
        stack_up_all(settings)
        services.start(services.app_services())
        yield settings
    finally:
        stack_down_all(settings)


def wait_for(probe: Callable[[], T | None], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll until ``probe`` returns something truthy; tests wait on conditions, not sleeps."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAI]:
    """A local OpenAI-compatible server (``tests.fake_openai``); call ``reset()`` first."""
    fake = FakeOpenAI().start()
    try:
        yield fake
    finally:
        fake.stop()
