"""All configuration in one frozen object (``KEFU_`` prefix, nested with ``__``).

Read once at process start with :func:`load_settings` and passed explicitly; nothing
else in the code base reads the environment. Ports default to a 1xxxx range that does
not collide with system services (6379, 9092, 8123 stay free for real servers).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK = "127.0.0.1"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Frozen):
    # Empty bootstrap = the embedded broker on ``port``; set it for an external cluster.
    bootstrap: str = ""
    port: int = 19092
    controller_port: int = 19093
    version: str = "4.3.1"
    heap: str = "768m"
    partitions: int = 4
    # Where the broker's jars are cached between runs (filled by Maven from the pom).
    jars_dir: Path = Path.home() / ".cache" / "kefu" / "kafka"
    security_protocol: str = "PLAINTEXT"

    @property
    def servers(self) -> str:
        return self.bootstrap or f"{LOOPBACK}:{self.port}"


class RedisSettings(_Frozen):
    # Empty url = the embedded redis-server on ``port``.
    url: str = ""
    port: int = 16379

    @property
    def dsn(self) -> str:
        return self.url or f"redis://{LOOPBACK}:{self.port}/0"


class ClickHouseSettings(_Frozen):
    # Empty url = the embedded engine: ``chdb://<state dir>/clickhouse``. An
    # ``http://host:8123`` url talks to a server instead, through the same client.
    url: str = ""
    database: str = "kefu"
    # chdb allows one process per data directory: that process (the ClickHouse
    # projector) answers read-only queries for the others on this port.
    query_port: int = 18124
    batch_size: int = 5000
    batch_seconds: float = 0.5


class GatewaySettings(_Frozen):
    host: str = LOOPBACK
    port: int = 18000


class WorkerSettings(_Frozen):
    # Loopback by default; a container sets 0.0.0.0 so health checks and scrapers reach it.
    web_host: str = LOOPBACK
    web_port: int = 16066
    # The responder and delivery agents run this many requests at once per worker.
    concurrency: int = 16


class RoutingSettings(_Frozen):
    # A returning customer goes back to their last agent when that agent is free.
    sticky: bool = True
    # How often each worker scans its conversations for idle and SLA deadlines.
    timer_seconds: float = 1.0
    csat: bool = True
    # Hand off to a human after this many AI turns in a row without an answer.
    max_ai_failures: int = 3


class DevSettings(_Frozen):
    # The local webhook receiver (``kefu webhook-sink``) used by the demo and tests.
    webhook_sink_port: int = 18090


class TenantSettings(_Frozen):
    api_key: SecretStr
    # REST replies are POSTed here, signed with HMAC-SHA256 over the body.
    webhook_url: str = ""
    webhook_secret: SecretStr = SecretStr("")
    ai_enabled: bool = True
    # Routing and lifecycle (issue 3). SLA limits per priority, in seconds.
    vip_customers: list[str] = Field(default_factory=list)
    urgent_channels: list[str] = Field(default_factory=list)
    idle_close_seconds: float = 600.0
    sla_first_response_seconds: dict[str, float] = Field(
        default_factory=lambda: {"urgent": 30.0, "vip": 60.0, "normal": 120.0, "low": 600.0}
    )
    sla_next_response_seconds: dict[str, float] = Field(
        default_factory=lambda: {"urgent": 60.0, "vip": 120.0, "normal": 300.0, "low": 900.0}
    )


def _default_tenants() -> dict[str, TenantSettings]:
    return {
        "demo": TenantSettings(
            api_key=SecretStr("demo-key"), webhook_secret=SecretStr("demo-webhook-secret")
        )
    }


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KEFU_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    app_id: str = "kefu"
    state_dir: Path = Path(".kefu")
    topic_prefix: str = "kefu"
    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    gateway: GatewaySettings = GatewaySettings()
    worker: WorkerSettings = WorkerSettings()
    dev: DevSettings = DevSettings()
    routing: RoutingSettings = RoutingSettings()
    tenants: dict[str, TenantSettings] = Field(default_factory=_default_tenants)
    log_level: str = "INFO"

    @property
    def clickhouse_url(self) -> str:
        return self.clickhouse.url or f"chdb://{(self.state_dir / 'clickhouse').resolve()}"

    @property
    def embedded_clickhouse(self) -> bool:
        return self.clickhouse_url.startswith("chdb://")

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}.{name}"


def load_settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]
