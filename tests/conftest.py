"""The real stack for integration tests: Kafka, Redis, the ClickHouse projector (chdb),
a worker, the gateway and the webhook sink, started once per session on free loopback
ports in a temporary state dir, and stopped after."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from pydantic import SecretStr

from kefu.cli import stack_down_all, stack_up_all
from kefu.data_keys import install as install_unsealer
from kefu.data_keys import key_store, uninstall_for
from kefu.local import private_settings
from kefu.processes import free_ports
from kefu.services import Services
from kefu.settings import (
    AgentSettings,
    AttachmentSettings,
    ChannelsSettings,
    ObservabilitySettings,
    RateLimitSettings,
    Settings,
    TelegramBotSettings,
    TenantSettings,
    WeChatAccountSettings,
)
from tests.fake_openai import FakeOpenAI
from tests.fake_telegram import FakeTelegram
from tests.fake_wechat import FakeWeChat

T = TypeVar("T")


def console_agent(agent: str, team: str = "default", name: str = "") -> AgentSettings:
    digest = hashlib.sha256(f"{agent}-token".encode()).hexdigest()
    return AgentSettings(token_sha256=SecretStr(digest), team=team, capacity=2, name=name)


def key_hash(key: str) -> SecretStr:
    """A key as production settings hold it: ``sha256:<hex>`` (docs/security.md)."""
    return SecretStr("sha256:" + hashlib.sha256(key.encode()).hexdigest())


def security_tenants() -> dict[str, TenantSettings]:
    """Tenants of the security tests: iso-a/iso-b (isolation, admin, origins), rl/rl2
    (small rate limits: a tenant's two keys together exceed its bucket). Admin keys
    "<tenant>-admin-key", agent tokens "<agent>-token"."""
    small = RateLimitSettings(
        tenant_per_second=2.0, tenant_burst=4.0, client_per_second=1.0, client_burst=3.0
    )
    return {
        tenant: TenantSettings(
            api_key=SecretStr(f"{tenant}-test-key"),
            # A second API key, hashed as in production.
            api_keys={"second": key_hash(f"{tenant}-second-key")},
            admin_keys={"main": key_hash(f"{tenant}-admin-key")},
            ai_enabled=False,
            agents={agent: console_agent(agent)},
            allowed_origins=[f"https://shop.{tenant}.example"],
            webhook_secret=SecretStr(f"{tenant}-webhook-secret"),
            rate_limits=small if tenant.startswith("rl") else None,
        )
        for tenant, agent in (("iso-a", "ann"), ("iso-b", "bob"), ("rl", "rita"), ("rl2", "rolf"))
    }


def isolated_settings(state_dir: Path) -> Settings:
    # Two worker web ports: some tests start a second worker.
    base = private_settings(state_dir, workers=2)
    # The fake WeChat and Telegram APIs (started by the fake_wechat/fake_telegram fixtures).
    wechat_api, telegram_api = free_ports(2)
    sink_url = f"http://127.0.0.1:{base.dev.webhook_sink_port}/webhook"
    return Settings(
        state_dir=state_dir,
        kafka=base.kafka,
        redis=base.redis,
        clickhouse=base.clickhouse.model_copy(update={"batch_seconds": 0.2}),
        gateway=base.gateway,
        worker=base.worker,
        dev=base.dev,
        # The SMTP listener (a daemon) and the fake relay (started lazily by email tests).
        email=base.email.model_copy(
            update={
                "max_message_bytes": 256 * 1024,
                "backoff_seconds": 0.05,
                # A sender's burst of 5, then one mail per 2 s (test_email's flood test).
                "rate_limits": RateLimitSettings(
                    tenant_per_second=100.0,
                    tenant_burst=1000.0,
                    client_per_second=0.5,
                    client_burst=5.0,
                ),
            }
        ),
        channels=ChannelsSettings(
            wechat_api_base=f"http://127.0.0.1:{wechat_api}",
            telegram_api_base=f"http://127.0.0.1:{telegram_api}",
            max_body_bytes=16 * 1024,
            attempts=3,
            backoff_seconds=0.05,
            timeout_s=3.0,
        ),
        tenants={
            "demo": TenantSettings(
                api_key=SecretStr("demo-test-key"),
                webhook_url=sink_url,
                webhook_secret=SecretStr("demo-secret"),
                email_addresses=["help@demo.test"],
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
            # The retention test (test_privacy_erase.py): human-only, its conversations
            # stay queued, so no other test's agents may meet them.
            "ret": TenantSettings(api_key=SecretStr("ret-test-key"), ai_enabled=False),
            # The quick-leave recovery test (test_routing.py): conversations of its own.
            "rec": TenantSettings(api_key=SecretStr("rec-test-key"), ai_enabled=False),
            "timers": TenantSettings(
                api_key=SecretStr("timers-test-key"),
                ai_enabled=False,
                idle_close_seconds=4.0,
                sla_first_response_seconds={"normal": 1.0},
            ),
            # Web chat identity verification (tests/test_webchat.py): customer ids signed.
            "sig": TenantSettings(
                api_key=SecretStr("sig-test-key"),
                ai_enabled=False,
                widget_secret=SecretStr("sig-widget-secret"),
            ),
            # The endpoint fuzzer's own tenants (tests/test_fuzz_endpoints.py): whatever
            # it generates lands here, never in another test's queues.
            "fuzz": TenantSettings(api_key=SecretStr("fuzz-test-key"), ai_enabled=False),
            "fuzz2": TenantSettings(api_key=SecretStr("fuzz2-test-key"), ai_enabled=False),
            # WeChat and Telegram (tests/test_wechat.py, tests/test_telegram.py): wx in
            # plain mode with the AI, wxs in safe mode (AES), wxh human-only.
            "wx": TenantSettings(
                api_key=SecretStr("wx-test-key"),
                wechat=WeChatAccountSettings(
                    token=SecretStr("wx-token"), app_id="wx-app", app_secret=SecretStr("wx-secret")
                ),
                wechat_mp=WeChatAccountSettings(
                    token=SecretStr("wx-mp-token"),
                    app_id="wx-mp-app",
                    app_secret=SecretStr("wx-mp-secret"),
                ),
                telegram=TelegramBotSettings(
                    bot_token=SecretStr("1001:wx-bot"), secret_token=SecretStr("tg-secret")
                ),
            ),
            "wxs": TenantSettings(
                api_key=SecretStr("wxs-test-key"),
                wechat=WeChatAccountSettings(
                    token=SecretStr("wxs-token"),
                    encoding_aes_key=SecretStr("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"),
                    app_id="wxs-app",
                    app_secret=SecretStr("wxs-secret"),
                ),
            ),
            "wxh": TenantSettings(
                api_key=SecretStr("wxh-test-key"),
                ai_enabled=False,
                wechat=WeChatAccountSettings(
                    token=SecretStr("wxh-token"),
                    app_id="wxh-app",
                    app_secret=SecretStr("wxh-secret"),
                ),
                telegram=TelegramBotSettings(
                    bot_token=SecretStr("1002:wxh-bot"), secret_token=SecretStr("tg-secret-h")
                ),
            ),
            # Human-only tenants for the agent console (tests/test_console.py): desk for
            # the browser test, desk2 for the protocol test. Tokens: "<agent>-token".
            "desk": TenantSettings(
                api_key=SecretStr("desk-test-key"),
                ai_enabled=False,
                agents={"alice": console_agent("alice", name="Alice")},
            ),
            "desk2": TenantSettings(
                api_key=SecretStr("desk2-test-key"),
                ai_enabled=False,
                agents={
                    "carol": console_agent("carol"),
                    "dave": console_agent("dave", team="billing"),
                },
            ),
            # The console's features (tests/test_console_features.py): desk3 for the
            # protocol (gina; hal in another team), desk4/desk5 for Chromium in zh/en.
            "desk3": TenantSettings(
                api_key=SecretStr("desk3-test-key"),
                ai_enabled=False,
                agents={
                    "gina": console_agent("gina", name="Gina"),
                    "hal": console_agent("hal", team="billing", name="Hal"),
                },
            ),
            "desk4": TenantSettings(
                api_key=SecretStr("desk4-test-key"),
                ai_enabled=False,
                agents={"hank": console_agent("hank", name="韩梅")},
            ),
            "desk5": TenantSettings(
                api_key=SecretStr("desk5-test-key"),
                ai_enabled=False,
                agents={"iris": console_agent("iris", name="Iris")},
            ),
            # Attachments (tests/test_files_api.py, the UI and bench tests): human-only
            # so nothing answers for the test; files2 for isolation.
            "files": TenantSettings(
                api_key=SecretStr("files-test-key"),
                ai_enabled=False,
                webhook_url=sink_url,
                webhook_secret=SecretStr("files-secret"),
                agents={"fay": console_agent("fay", name="Fay")},
            ),
            "files2": TenantSettings(api_key=SecretStr("files2-test-key"), ai_enabled=False),
            # The widget and chat page (tests/test_widget_ui.py): human-only, its widget
            # settings and business hours changed live by the tests.
            "wid": TenantSettings(
                api_key=SecretStr("wid-test-key"),
                ai_enabled=False,
                agents={"wendy": console_agent("wendy", name="王芳")},
            ),
            # Configuration as events (tests/test_config.py): changed live by the tests.
            "cfg": TenantSettings(api_key=SecretStr("cfg-test-key"), ai_enabled=False),
            # Its FAQ written in /admin answers its customers (tests/test_config.py).
            "cfgai": TenantSettings(api_key=SecretStr("cfgai-test-key")),
            # The whole path in Chromium (tests/test_whole_path_ui.py): human-only, no
            # agents seeded; its admin key only bootstraps the admin, /admin does the rest.
            "path": TenantSettings(
                api_key=SecretStr("path-test-key"),
                admin_keys={"main": key_hash("path-admin-key")},
                ai_enabled=False,
            ),
            # Accounts and live administration (tests/test_accounts.py,
            # test_admin_config.py, test_admin_ui.py): admin keys "<tenant>-admin-key";
            # their webhooks go to the sink, signed with "<tenant>-webhook-secret".
            **{
                tenant: TenantSettings(
                    api_key=SecretStr(f"{tenant}-test-key"),
                    admin_keys={"main": key_hash(f"{tenant}-admin-key")},
                    ai_enabled=False,
                    webhook_url=sink_url,
                    webhook_secret=SecretStr(f"{tenant}-webhook-secret"),
                )
                for tenant in ("acct", "adm", "adm2", "admui")
            },
            **security_tenants(),
            # Channel credentials and the webhook live from the configuration
            # (tests/test_live_channels.py): live answers with the AI, its webhook set
            # in /admin; live-off is disabled by an operator there.
            **{
                tenant: TenantSettings(
                    api_key=SecretStr(f"{tenant}-test-key"),
                    admin_keys={"main": key_hash(f"{tenant}-admin-key")},
                    webhook_url=sink_url,
                    webhook_secret=SecretStr(f"{tenant}-webhook-secret"),
                )
                for tenant in ("live", "live-off")
            },
        },
        # Small limits so the tests reach them with small files.
        attachments=AttachmentSettings(
            max_bytes={"*": 2 * 1024 * 1024, "web": 1024 * 1024, "api": 1024 * 1024},
            tenant_quota_bytes=0,
        ),
        # Spans to <state dir>/traces/*.jsonl (tests/test_tracing.py); the SMTP
        # listener's /metrics on a free port (tests/test_metrics.py).
        observability=ObservabilitySettings(
            trace_exporter="jsonl",
            export_delay_ms=100,
            smtp_port=free_ports(1)[0],
            projector_port=0,
        ),
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
        # Sealed personal fields (schemas/sealing.py) open in this process's decodes too.
        install_unsealer(lambda: key_store(settings))
        yield settings
    finally:
        uninstall_for(settings)  # its follower thread, before its broker goes
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


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="session")
def fake_wechat(pipeline: Settings) -> Iterator[FakeWeChat]:
    """The WeChat API on the port the pipeline's settings point at, knowing every test
    tenant's apps (the worker only calls it when it delivers)."""
    apps = {
        a.app_id: a.app_secret.get_secret_value()
        for t in pipeline.tenants.values()
        for a in (t.wechat, t.wechat_mp)
        if a.app_id
    }
    fake = FakeWeChat(apps=apps).start(_port_of(pipeline.channels.wechat_api_base))
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="session")
def fake_telegram(pipeline: Settings) -> Iterator[FakeTelegram]:
    """The Telegram Bot API on the port the pipeline's settings point at."""
    tokens = {t.telegram.bot_token.get_secret_value() for t in pipeline.tenants.values()}
    fake = FakeTelegram(tokens={t for t in tokens if t})
    fake.start(_port_of(pipeline.channels.telegram_api_base))
    try:
        yield fake
    finally:
        fake.stop()
