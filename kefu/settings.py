"""All configuration in one frozen object (``KEFU_`` prefix, nested with ``__``).

Read once at process start with :func:`load_settings` and passed explicitly; nothing
else in the code base reads the environment. Ports default to a 1xxxx range that does
not collide with system services (6379, 9092, 8123 stay free for real servers).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

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
    # More JVM flags for the embedded broker, after kefu's own (a later flag wins). By
    # default only the quick JIT (C1): in a pipeline benchmark run the optimising one
    # (C2) took 0.24 of the broker's 0.56 cores compiling, and C1 alone cut the
    # broker's CPU by a third and its start by ~4 s (bench/RESULTS.md "Pipeline").
    jvm_options: tuple[str, ...] = ("-XX:TieredStopAtLevel=1",)
    partitions: int = 4
    # Embedded brokers: 1, or a KRaft cluster on loopback (3: replication factor 3,
    # min.insync.replicas 2). Node n > 1 listens on port + 2(n-1) and
    # controller_port + 2(n-1), its files under <state_dir>/kafka/node-<n>.
    brokers: int = Field(default=1, ge=1, le=5)
    # Where the broker's jars are cached between runs (filled by Maven from the pom).
    jars_dir: Path = Path.home() / ".cache" / "kefu" / "kafka"
    # An external cluster with TLS and/or SASL (docs/security.md): PLAINTEXT, SSL,
    # SASL_PLAINTEXT or SASL_SSL; every Kafka client kefu creates gets these.
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    sasl_username: str = ""
    sasl_password: SecretStr = SecretStr("")
    ssl_cafile: str = ""  # PEM; empty = the system's trust store
    ssl_certfile: str = ""  # client certificate (mutual TLS), PEM
    ssl_keyfile: str = ""
    ssl_check_hostname: bool = True

    @property
    def servers(self) -> str:
        if self.bootstrap:
            return self.bootstrap
        return ",".join(f"{LOOPBACK}:{port}" for port, _ in self.node_ports())

    def node_ports(self) -> list[tuple[int, int]]:
        """(broker port, controller port) of each embedded node, node 1 first."""
        return [(self.port + 2 * n, self.controller_port + 2 * n) for n in range(self.brokers)]

    @property
    def replication(self) -> int:
        """Replicas of every topic: three on a cluster, one on a single broker."""
        return min(self.brokers, 3)

    def ssl_context(self) -> ssl.SSLContext | None:
        if "SSL" not in self.security_protocol.upper():
            return None
        context = ssl.create_default_context(cafile=self.ssl_cafile or None)
        context.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None)
        return context

    def client_options(self) -> dict[str, Any]:
        """The security keyword arguments of every aiokafka client (producer,
        consumer, admin); empty for PLAINTEXT, so the defaults stay untouched."""
        protocol = self.security_protocol.upper()
        if protocol == "PLAINTEXT":
            return {}
        options: dict[str, Any] = {"security_protocol": protocol}
        if protocol.startswith("SASL"):
            options |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password.get_secret_value(),
            }
        if "SSL" in protocol:
            options["ssl_context"] = self.ssl_context()
        return options

    def librdkafka_security(self) -> dict[str, str]:
        """The same security as librdkafka settings (the worker's hot producer,
        ``streams.hot_producer``); empty for PLAINTEXT."""
        protocol = self.security_protocol.upper()
        if protocol == "PLAINTEXT":
            return {}
        options = {"security.protocol": protocol}
        if protocol.startswith("SASL"):
            options |= {
                "sasl.mechanism": self.sasl_mechanism,
                "sasl.username": self.sasl_username,
                "sasl.password": self.sasl_password.get_secret_value(),
            }
        if "SSL" in protocol:
            options["ssl.endpoint.identification.algorithm"] = (
                "https" if self.ssl_check_hostname else "none"
            )
            if self.ssl_cafile:
                options["ssl.ca.location"] = self.ssl_cafile
            if self.ssl_certfile:
                options["ssl.certificate.location"] = self.ssl_certfile
            if self.ssl_keyfile:
                options["ssl.key.location"] = self.ssl_keyfile
        return options


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
    # The projector's long-lived objects out of the cyclic GC's scans (kefu/long_lived.py).
    gc_freeze_s: float = 10.0
    gc_full_s: float = 3600.0


class GatewaySettings(_Frozen):
    host: str = LOOPBACK
    port: int = 18000
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"  # as uvicorn's --loop
    # A request body over this many bytes gets 413 before any route reads it.
    max_body_bytes: int = 1024 * 1024
    # WebSockets (bench/RESULTS.md "Web chat sockets"): the sans-I/O implementation
    # runs no task of its own per socket; per-message deflate would keep zlib state per
    # socket for frames of a few hundred bytes.
    ws: Literal["websockets-sansio", "websockets", "wsproto", "auto"] = "websockets-sansio"
    ws_per_message_deflate: bool = False
    ws_max_size: int = 256 * 1024  # largest frame a client may send (text is ≤ 8000 chars)
    # Keepalive pings find dead peers (0 = none); under common proxies' 60 s idle
    # timeout, and each costs the gateway a timer and two frames per socket.
    ws_ping_interval: float = 30.0
    ws_ping_timeout: float = 30.0
    # Accept queue; the kernel caps it at net.core.somaxconn.
    backlog: int = 8192
    # Held sockets leave the cyclic GC's scans after this long (0 = never), and are
    # collected once every gc_full_s (connectors/gateway.py _long_lived_objects).
    gc_freeze_s: float = 60.0
    gc_full_s: float = 3600.0


class WorkerSettings(_Frozen):
    # Loopback by default; a container sets 0.0.0.0 so health checks and scrapers reach it.
    web_host: str = LOOPBACK
    web_port: int = 16066
    # The responder and delivery agents run this many requests at once per worker.
    concurrency: int = 16
    # Hot-path tuning (bench/RESULTS.md "Pipeline" says what each costs): how long an
    # idle fetch waits at the broker and how many bytes answer it at once (1: every
    # record), how long the producer lingers to group sends.
    fetch_max_wait_ms: int = 100
    fetch_min_bytes: int = 1
    linger_ms: float = 2.0
    # The standard library's loop: with uvloop the worker's reply p99 at 60 msg/s was
    # 528-630 ms against 165-287 ms (bench/RESULTS.md "Pipeline", third session).
    event_loop: Literal["uvloop", "asyncio"] = "asyncio"
    # Answers that need no I/O (the offline FAQ, an intent's canned text) are given by
    # the conversation agent in the same step; off = every request goes through the
    # responder agent (a hop and two records more per message).
    inline_answers: bool = True
    # Faust's consumer runs in a thread of its own: a socket write of the main loop
    # (every produce request) that releases the GIL waits up to this long to get it
    # back (CPython's default is 5 ms); shorter keeps the loop moving.
    switch_interval_ms: float = 0.5
    # What has lived this long leaves the cyclic GC's scans (0 = never); collected once
    # every gc_full_s (kefu/long_lived.py: the collector ~10 → ~5.6 % of the worker's CPU).
    gc_freeze_s: float = 10.0
    gc_full_s: float = 3600.0
    # The hot path's records go out with librdkafka (streams/hot_producer.py); off = the
    # Faust app's aiokafka producer, as before (a fallback, and the A/B in bench/).
    librdkafka_producer: bool = True
    # The hot path's two batch consumers read with librdkafka (streams/hot_consumer.py);
    # off = aiokafka on the event loop, as before.
    librdkafka_consumer: bool = True


class RoutingSettings(_Frozen):
    # A returning customer goes back to their last agent when that agent is free.
    sticky: bool = True
    # How often each worker scans its conversations for idle and SLA deadlines.
    timer_seconds: float = 1.0
    csat: bool = True
    # Hand off to a human after this many AI turns in a row without an answer.
    max_ai_failures: int = 3


class ModerationSettings(_Frozen):
    # The shipped default lists (streams/moderation_data/default.json) for every tenant
    # until the control topic replaces a category; off = only what the topic carries.
    default_lists: bool = True
    personal_data: bool = True  # phone, ID card, e-mail and bank card detectors
    # Per sender (conversation): the same text this many times in the window, or this
    # many links in the window, is spam (category "spam", its action; default flag).
    spam_repeats: int = 3
    spam_repeat_window_s: float = 600.0
    spam_links: int = 3
    spam_link_window_s: float = 60.0
    # A worker reads the whole control topic before it moderates its first message.
    load_timeout_s: float = 60.0


class DevSettings(_Frozen):
    # The local webhook receiver (``kefu webhook-sink``) used by the demo and tests.
    webhook_sink_port: int = 18090
    # A file where the sink also keeps what it received, so a restart (or a SIGKILL)
    # forgets nothing, as a tenant's endpoint would; empty: in memory only.
    webhook_sink_journal: str = ""


class AgentSettings(_Frozen):
    """A human agent of a tenant, for the console (``/console``). Only the SHA-256 of
    the login token is kept (``kefu agents token`` prints a new token and its hash)."""

    token_sha256: SecretStr = SecretStr("")  # hex; empty = the agent cannot log in
    name: str = ""
    team: str = "default"
    skills: list[str] = Field(default_factory=list)
    capacity: int = 3


class RateLimitSettings(_Frozen):
    """Token buckets (connectors/rate_limit.py), shared by every gateway process through
    Redis: ``per_second`` refill, ``burst`` capacity. 0 per_second = no limit."""

    tenant_per_second: float = 2000.0  # all of a tenant's requests and socket frames
    tenant_burst: float = 4000.0
    client_per_second: float = 1000.0  # one API key, one IP (failed logins) or one socket
    client_burst: float = 2000.0


class EmailSettings(_Frozen):
    """The email channel: an SMTP listener in (``kefu smtp``), an SMTP relay out."""

    # The listener binds loopback only; put a real MTA in front of it for the Internet.
    # (A container sets host 0.0.0.0 and publishes the port on the host's loopback.)
    host: str = LOOPBACK
    port: int = 12525
    hostname: str = "kefu.localhost"  # in the SMTP greeting and our Message-IDs
    # Mail to ``<inbound_local>+<tenant>@any-domain`` goes to that tenant (besides
    # each tenant's ``email_addresses``).
    inbound_local: str = "support"
    max_message_bytes: int = 10 * 1024 * 1024  # advertised as SMTP SIZE; larger: 552
    max_text_chars: int = 8000  # the extracted text is cut here
    relay_host: str = LOOPBACK
    relay_port: int = 12587
    relay_user: str = ""
    relay_password: SecretStr = SecretStr("")
    relay_starttls: bool = False
    relay_timeout: float = 10.0
    # Replies come from the tenant's first ``email_addresses`` entry, else from
    # ``<local part>+<tenant>@<domain>`` of this address, so answers find their way back.
    from_address: str = "support@kefu.localhost"
    attempts: int = 4
    backoff_seconds: float = 0.5
    # Inbound mail per tenant and per sender address (token buckets in Redis, shared by
    # every listener). Over them: 451 4.7.1, and the sender's MTA tries again later, so
    # a mail loop or a flood cannot fill a tenant's queues and nothing real is lost.
    rate_limits: RateLimitSettings = Field(
        default_factory=lambda: RateLimitSettings(
            tenant_per_second=20.0, tenant_burst=200.0, client_per_second=0.1, client_burst=10.0
        )
    )


class WeChatAccountSettings(_Frozen):
    """A WeChat Official Account or mini-program of a tenant. Empty token = disabled."""

    token: SecretStr = SecretStr("")  # the callback token (signature check)
    # 43 characters: safe mode (AES) when set; plaintext callbacks are then refused.
    encoding_aes_key: SecretStr = SecretStr("")
    app_id: str = ""
    app_secret: SecretStr = SecretStr("")  # for access tokens (customer-service API)


class TelegramBotSettings(_Frozen):
    """A tenant's Telegram bot. Empty bot_token = disabled."""

    bot_token: SecretStr = SecretStr("")
    # Sent by Telegram in X-Telegram-Bot-Api-Secret-Token (setWebhook secret_token).
    secret_token: SecretStr = SecretStr("")


class ChannelsSettings(_Frozen):
    """WeChat and Telegram: API bases (tests point them at local fakes) and edge limits."""

    wechat_api_base: str = "https://api.weixin.qq.com"
    telegram_api_base: str = "https://api.telegram.org"
    max_body_bytes: int = 64 * 1024  # larger callback bodies: 413
    # WeChat waits 5 s for a passive reply; after this, "success" and the API later.
    wechat_passive_wait_s: float = 4.0
    # Callbacks whose timestamp is further than this from now are refused (replays).
    wechat_max_skew_s: float = 300.0
    attempts: int = 4
    backoff_seconds: float = 0.5
    timeout_s: float = 10.0


class SecuritySettings(_Frozen):
    """Gateway security defaults (docs/security.md); tenants may override limits."""

    rate_limits: RateLimitSettings = RateLimitSettings()
    # WebSockets from a page on loopback (http://127.0.0.1:*, localhost) are allowed
    # besides same-origin pages and each tenant's ``allowed_origins``.
    allow_loopback_origins: bool = True
    # Seals secrets in the configuration topic (channel secrets, webhook secrets,
    # password hashes): AES-GCM under a key derived from this. Empty: a random key kept
    # in <state_dir>/config.key, shared by the processes of one machine. Keep it: the
    # sealed secrets cannot be read without it.
    config_key: SecretStr = SecretStr("")
    # Keys the audit chain (HMAC per tenant, derived from this) and signs its
    # checkpoints: someone who can write the events topic but lacks it cannot make a
    # rewritten history verify. Empty: a random key in <state_dir>/audit.key. Keep it
    # apart from the Kafka credentials; without it nothing can be verified.
    audit_key: SecretStr = SecretStr("")
    # Crypto-shredding (docs/privacy.md): customers' personal fields (message text,
    # notes, file names) go on the log sealed with a data key per customer, kept on
    # the keys topic wrapped with a key derived from this. Empty: a random key in
    # <state_dir>/data.key. Every process that reads or writes events needs the same.
    data_key: SecretStr = SecretStr("")
    # Off: new events carry personal fields in clear (what is sealed stays readable
    # while its key exists); ``kefu privacy erase`` still redacts the read models.
    seal_personal_data: bool = True
    # Attachment blobs (and thumbnails) encrypted with their customer's data key too,
    # so that a copy outliving an erasure (replica, backup) does not open. Takes
    # effect only with ``seal_personal_data``; off: new blobs stored in clear (sealed
    # ones still open while their keys exist).
    seal_blobs: bool = True
    # How long a reader waits for the keys topic to show a key it has not seen
    # (written by another process just before the event) before it gives up.
    key_wait_s: float = 10.0
    # How often a worker runs the retention job (tenants' ``retention_days``).
    retention_interval_s: float = 3600.0


class TenantSettings(_Frozen):
    # The tenant's API key (key id "default"): a plaintext key is hashed when the
    # gateway loads it; production config holds "sha256:<hex>" (``kefu keys hash``).
    api_key: SecretStr = SecretStr("")
    # More API keys, key id -> "sha256:<hex>" (or plaintext): several valid at once,
    # so a key is rotated by adding the new one, then removing the old.
    api_keys: dict[str, SecretStr] = Field(default_factory=dict)
    # Admin keys (key management, agent admin; never the customer API): id -> hash.
    admin_keys: dict[str, SecretStr] = Field(default_factory=dict)
    # Page origins allowed to open the chat and console WebSockets, e.g.
    # "https://shop.example" ("*" = any); same-origin (and loopback) always are.
    allowed_origins: list[str] = Field(default_factory=list)
    # Web chat identity verification: when set, the chat socket takes a customer id
    # only with its signature, hex HMAC-SHA256(secret, id), so nobody can open a
    # signed-in customer's conversation by knowing the id (docs/security.md).
    widget_secret: SecretStr = SecretStr("")
    rate_limits: RateLimitSettings | None = None  # None = ``security.rate_limits``
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
    # Inbound email addresses of this tenant (exact, case-insensitive); the first one
    # is the From of email replies.
    email_addresses: list[str] = Field(default_factory=list)
    # Agent id -> agent: who may log in to the console (issue 7).
    agents: dict[str, AgentSettings] = Field(default_factory=dict)
    # WeChat Official Account, WeChat mini-program, Telegram bot (all off by default).
    wechat: WeChatAccountSettings = WeChatAccountSettings()
    wechat_mp: WeChatAccountSettings = WeChatAccountSettings()
    telegram: TelegramBotSettings = TelegramBotSettings()


class AIModelSettings(_Frozen):
    """One model behind an OpenAI-compatible endpoint."""

    base_url: str
    model: str = ""  # the id sent to the endpoint; default: the key in ``ai.models``
    api_key: SecretStr = SecretStr("")
    languages: list[str] = Field(default_factory=list)  # e.g. ["zh"]; empty = any
    cost_in_per_1k: float = 0.0  # price per 1000 prompt tokens
    cost_out_per_1k: float = 0.0  # price per 1000 completion tokens
    max_input_tokens: int = 8000
    max_output_tokens: int = 1024
    timeout: float = 30.0  # a whole call
    first_token_timeout: float = 5.0


class AIRuleSettings(_Frozen):
    """Messages matching every non-empty condition go to ``model`` first."""

    model: str
    tenant: str = ""
    language: str = ""
    intent: str = ""
    pattern: str = ""  # regular expression


class AITenantSettings(_Frozen):
    temperature: float = 0.4
    max_tokens: int = 512
    system_prompt: str = ""
    rate_per_second: float | None = None  # LLM calls; None = ``ai.rate_per_second``
    rate_burst: float | None = None


class AISettings(_Frozen):
    # Model label -> model. No models = the offline FAQ responder answers (the default).
    # Dicts, not lists, so the settings survive the KEFU_* hand-over to child processes.
    models: dict[str, AIModelSettings] = Field(default_factory=dict)
    rules: dict[str, AIRuleSettings] = Field(default_factory=dict)  # tried in order
    # ``<knowledge_dir>/<tenant>/`` holds intents.json, faq.json, *.md, *.txt.
    knowledge_dir: Path | None = None
    intent_threshold: float = 0.92
    clarify_floor: float = 0.25
    temperature: float = 0.4
    max_tokens: int = 512
    tenants: dict[str, AITenantSettings] = Field(default_factory=dict)
    cache_enabled: bool = True
    cache_ttl_seconds: float = 3600.0
    cache_similarity: float = 0.75
    rate_per_second: float = 5.0  # LLM calls per tenant, token bucket
    rate_burst: float = 20.0
    retries: int = 1
    backoff_seconds: float = 0.1
    first_token_budget_seconds: float = 1.5  # then the fallback answers
    breaker_failures: int = 3
    breaker_reset_seconds: float = 10.0
    stream_channels: list[str] = Field(default_factory=lambda: ["web"])


class ReliabilitySettings(_Frozen):
    """Faults (docs/faults.md): how fast a dead worker's partitions move on, Faust's
    processing guarantee, and rebuilding the Redis read model after it was lost."""

    # A worker that stops heartbeating leaves the group after session_timeout_s; a
    # rebalance waits at most rebalance_timeout_s for the members to rejoin.
    session_timeout_s: float = 30.0
    heartbeat_interval_s: float = 3.0
    rebalance_timeout_s: float = 30.0
    # "at_least_once" (effectively-once by ids and seqs) or Faust's "exactly_once"
    # (Kafka transactions); bench/faults.py measures both (bench/RESULTS.md).
    processing_guarantee: str = "at_least_once"
    # A record lost between the fetch and an agent (seen around rebalances) holds its
    # partition's commits back; it is delivered again after redeliver_lost_after_s, or
    # redeliver_stuck_after_s when an agent still holds it (streams/consumer.py).
    redeliver_lost_after_s: float = 5.0
    redeliver_stuck_after_s: float = 20.0
    # Redis lost its data (FLUSHALL, a new empty server): the projection rebuilds the
    # read model from the log before it writes again (projections/redis_rebuild.py).
    redis_rebuild: bool = True


class ObservabilitySettings(_Frozen):
    """Tracing and the operations endpoints (docs/observability.md)."""

    # Spans: none | console | jsonl (one file per process in trace_dir) | otlp (OTLP over
    # HTTP to otlp_endpoint, e.g. an OpenTelemetry Collector or Jaeger).
    trace_exporter: Literal["none", "console", "jsonl", "otlp"] = "none"
    trace_dir: Path | None = None  # default: <state_dir>/traces
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    sample_ratio: float = 1.0  # of new traces; children follow their parent's decision
    export_delay_ms: int = 500  # the batch exporter's flush interval
    # /metrics, /healthz, /readyz of the processes without an HTTP server of their own:
    # the SMTP listener, and the projector when ClickHouse is a server (with chdb they
    # are on its query endpoint). 0 = none. A container sets ops_host 0.0.0.0.
    ops_host: str = LOOPBACK
    projector_port: int = 18125
    smtp_port: int = 18126


def _default_tenants() -> dict[str, TenantSettings]:
    return {
        "demo": TenantSettings(
            api_key=SecretStr("demo-key"), webhook_secret=SecretStr("demo-webhook-secret")
        )
    }


class AttachmentSettings(_Frozen):
    """Attachments (connectors/attachments.py): where the bytes go, what is accepted."""

    store: Literal["local", "s3"] = "local"
    local_dir: Path | None = None  # default: <state_dir>/blobs
    # An S3-compatible service (MinIO in docker-compose.yml, AWS S3, ...).
    s3_endpoint: str = ""
    s3_bucket: str = "kefu-attachments"
    s3_region: str = "us-east-1"
    s3_access_key: SecretStr = SecretStr("")
    s3_secret_key: SecretStr = SecretStr("")
    # Largest file per channel in bytes ("*": the others); over it: 413 with the limit.
    # WeChat's temporary media takes 10 MB, a Telegram bot downloads up to 20 MB.
    max_bytes: dict[str, int] = Field(
        default_factory=lambda: {
            "*": 20 * 1024 * 1024,
            "web": 10 * 1024 * 1024,
            "wechat": 10 * 1024 * 1024,
            "telegram": 20 * 1024 * 1024,
            # A mail's attachment arrives base64 (4/3 larger) inside the SMTP listener's
            # email.max_message_bytes: raise both together.
            "email": 7 * 1024 * 1024,
        }
    )
    allowed_types: list[str] = Field(default_factory=list)  # empty: the built-in list
    max_image_pixels: int = 40_000_000
    # JPEG and PNG uploads kept lossless are decoded at upload too (their thumbnail made
    # then: ~2 ms more gateway CPU per 100 KB photo). Off: the worker, or the download
    # route when asked first, decodes them for the thumbnail (connectors/thumbnails.py).
    decode_at_edge: bool = False
    thumbnail_concurrency: int = 2  # thumbnails made at once per process (threads)
    tenant_quota_bytes: int = 0  # per tenant; 0 = unlimited
    # Signs download links (per tenant, expiring). Empty: a random key kept in
    # <state_dir>/attachments.key, shared by the processes of one machine.
    url_secret: SecretStr = SecretStr("")
    url_ttl_s: int = 7 * 24 * 3600
    # How channels and webhook receivers reach the links (default: the gateway's address).
    public_url: str = ""


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
    moderation: ModerationSettings = ModerationSettings()
    tenants: dict[str, TenantSettings] = Field(default_factory=_default_tenants)
    ai: AISettings = AISettings()
    email: EmailSettings = EmailSettings()
    channels: ChannelsSettings = ChannelsSettings()
    security: SecuritySettings = SecuritySettings()
    reliability: ReliabilitySettings = ReliabilitySettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    attachments: AttachmentSettings = AttachmentSettings()
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
