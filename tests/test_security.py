"""Authentication, admin separation, key rotation, WebSocket origins, Kafka SASL/TLS
options, and no secrets or message text in any process's log (docs/security.md).

Tenants iso-a/iso-b of tests/conftest.py: API keys "<t>-test-key" (plaintext, hashed on
load) and "<t>-second-key" (configured as a hash), admin key "<t>-admin-key", one agent
each (ann, bob; token "<agent>-token"), allowed origin https://shop.<t>.example.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from click.testing import CliRunner
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from connectors.auth import hash_key, origin_allowed, parse_key, stored_hash
from connectors.gateway import GatewayConfig, create_app
from kefu.cli import main
from kefu.runtime import settings_env
from kefu.settings import KafkaSettings, Settings
from schemas.keys import messages_key
from streams.app import broker_credentials
from tests.conftest import wait_for

# ----------------------------------------------------------------------- pure


def test_keys_are_kept_as_sha256_and_issued_keys_name_their_record() -> None:
    digest = hash_key("k")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert stored_hash("k") == digest  # plaintext in settings: hashed
    assert stored_hash(digest) == digest  # a hash stays a hash
    assert stored_hash(digest.upper().replace("SHA256:", "sha256:")) == digest
    assert parse_key("kf.acme.co.0a1b2c.s3cr-et_") == ("acme.co", "0a1b2c")
    assert parse_key("demo-key") is None and parse_key("kf..x.y") is None


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "loopback", "ok"),
    [
        (None, "gw:1", set(), False, True),  # not a browser
        ("https://gw:1", "gw:1", set(), False, True),  # same origin
        ("http://127.0.0.1:5173", "gw:1", set(), True, True),
        ("http://localhost:3000", "gw:1", set(), False, False),
        ("https://shop.example", "gw:1", {"https://shop.example"}, False, True),
        ("https://shop.example/", "gw:1", {"https://shop.example"}, False, True),
        ("https://evil.example", "gw:1", {"https://shop.example"}, True, False),
        ("null", "gw:1", set(), True, False),
        ("https://anything.example", "gw:1", {"*"}, False, True),
    ],
)
def test_origin_rules(
    origin: str | None, host: str, allowed: set[str], loopback: bool, ok: bool
) -> None:
    assert origin_allowed(origin, host, frozenset(allowed), loopback) is ok


def test_kafka_security_settings_become_client_kwargs(tmp_path: Path) -> None:
    assert KafkaSettings().client_options() == {}
    sasl = KafkaSettings.model_validate(
        {
            "security_protocol": "sasl_ssl",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "kefu",
            "sasl_password": "pw",
            "ssl_check_hostname": False,
        }
    )
    options = sasl.client_options()
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("kefu", "pw")
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.check_hostname is False
    # Faust gets the same through broker_credentials (streams/app.py).
    faust_kwargs = credentials_to_aiokafka_auth(broker_credentials(options))
    assert faust_kwargs["security_protocol"] == "SASL_SSL"
    assert faust_kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert faust_kwargs["sasl_plain_username"] == "kefu"
    assert faust_kwargs["ssl_context"] is context
    plain = KafkaSettings.model_validate(
        {"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u", "sasl_password": "p"}
    ).client_options()
    assert "ssl_context" not in plain and plain["sasl_mechanism"] == "PLAIN"
    assert credentials_to_aiokafka_auth(broker_credentials(plain))["security_protocol"] == (
        "SASL_PLAINTEXT"
    )
    tls = KafkaSettings(security_protocol="SSL").client_options()
    assert set(tls) == {"security_protocol", "ssl_context"}
    assert (
        credentials_to_aiokafka_auth(broker_credentials(tls))["ssl_context"] is tls["ssl_context"]
    )
    assert broker_credentials({}) is None


# ---------------------------------------------------------------- on the stack


def gateway(settings: Settings) -> httpx.Client:
    g = settings.gateway
    return httpx.Client(base_url=f"http://{g.host}:{g.port}", timeout=30)


def ws_base(settings: Settings) -> str:
    g = settings.gateway
    return f"ws://{g.host}:{g.port}"


def admin_routes() -> list[tuple[str, str]]:
    app = create_app(GatewayConfig(bootstrap="", commands_topic="", redis_url="", api_keys={}))
    document = app.openapi()
    return [
        (method.upper(), path)
        for path, item in document["paths"].items()
        if path.startswith("/v1/admin")
        for method in item
    ]


ADMIN_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/admin/keys"): {"label": "x"},
    ("PUT", "/v1/admin/agents/{agent_id}/presence"): {"presence": "offline"},
}


def test_admin_endpoints_take_only_the_admin_key(pipeline: Settings) -> None:
    routes = admin_routes()
    assert len(routes) >= 5, routes
    not_admin = {
        "no key": {},
        "API key": {"X-Api-Key": "iso-a-test-key"},
        "hashed API key": {"Authorization": "Bearer iso-a-second-key"},
        "agent token": {"Authorization": "Bearer ann-token"},
        "key as admin header": {"X-Admin-Key": "iso-a-test-key"},
    }
    with gateway(pipeline) as http:
        for method, path in routes:
            url = path.replace("{key_id}", "default").replace("{agent_id}", "ann")
            body = ADMIN_BODIES.get((method, path))
            for what, headers in not_admin.items():
                response = http.request(method, url, json=body, headers=headers)
                assert response.status_code == 401, (method, url, what, response.text)
        admin = {"X-Admin-Key": "iso-a-admin-key"}
        listed = http.get("/v1/admin/keys", headers=admin)
        assert listed.status_code == 200, listed.text
        ids = {(k["id"], k["role"]) for k in listed.json()["keys"]}
        assert {("default", "api"), ("second", "api"), ("main", "admin")} <= ids
        assert "sha256" not in listed.text and "iso-a-test-key" not in listed.text
        # The admin key is no customer API key.
        for headers in (
            {"X-Api-Key": "iso-a-admin-key"},
            {"Authorization": "Bearer iso-a-admin-key"},
        ):
            posted = http.post(
                "/v1/messages", json={"customer_id": "c", "text": "hi"}, headers=headers
            )
            assert posted.status_code == 401, posted.text
        # Agents' presence, as an admin.
        presence = http.put(
            "/v1/admin/agents/ann/presence", json={"presence": "away"}, headers=admin
        )
        assert presence.status_code == 202, presence.text

        def away() -> bool:
            agents = http.get("/v1/admin/agents", headers=admin).json()["agents"]
            return bool(agents.get("ann", {}).get("presence") == "away")

        wait_for(away, 60, "ann away in the read model")


def test_api_key_rotation_through_the_admin_api(pipeline: Settings) -> None:
    admin = {"Authorization": "Bearer iso-a-admin-key"}
    with gateway(pipeline) as http:
        created = http.post("/v1/admin/keys", json={"label": "rotation"}, headers=admin)
        assert created.status_code == 201, created.text
        new = created.json()
        assert parse_key(new["key"]) == ("iso-a", new["id"])
        probe = f"/v1/conversations/none-{uuid.uuid4().hex[:6]}"
        assert http.get(probe, headers={"X-Api-Key": new["key"]}).status_code == 404
        # A key issued for iso-a is not iso-b's, and a forged secret fails.
        forged = new["key"][:-4] + "AAAA"
        assert http.get(probe, headers={"X-Api-Key": forged}).status_code == 401
        listed = http.get("/v1/admin/keys", headers=admin).json()["keys"]
        assert any(k["id"] == new["id"] and k["source"] == "issued" for k in listed)
        # Another tenant's admin cannot revoke it.
        other = http.delete(
            f"/v1/admin/keys/{new['id']}", headers={"X-Admin-Key": "iso-b-admin-key"}
        )
        assert other.status_code == 404, other.text
        assert http.get(probe, headers={"X-Api-Key": new["key"]}).status_code == 404
        revoked = http.delete(f"/v1/admin/keys/{new['id']}", headers=admin)
        assert revoked.status_code == 200, revoked.text
        assert http.get(probe, headers={"X-Api-Key": new["key"]}).status_code == 401
        assert http.delete(f"/v1/admin/keys/{new['id']}", headers=admin).status_code == 404
        # Keys from the settings are rotated in the settings.
        assert http.delete("/v1/admin/keys/default", headers=admin).status_code == 409


def test_keys_cli_adds_lists_and_revokes(
    pipeline: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in settings_env(pipeline).items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    added = runner.invoke(main, ["keys", "add", "--tenant", "iso-b", "--label", "cli"])
    assert added.exit_code == 0, added.output
    key_id = re.search(r"id:\s+(\S+)", added.output).group(1)  # type: ignore[union-attr]
    key = re.search(r"key:\s+(\S+)", added.output).group(1)  # type: ignore[union-attr]
    listed = runner.invoke(main, ["keys", "list", "--tenant", "iso-b"])
    assert key_id in listed.output and "second" in listed.output and key not in listed.output
    with gateway(pipeline) as http:
        probe = "/v1/conversations/none"
        assert http.get(probe, headers={"X-Api-Key": key}).status_code == 404
        assert runner.invoke(main, ["keys", "revoke", "--tenant", "iso-b", key_id]).exit_code == 0
        assert http.get(probe, headers={"X-Api-Key": key}).status_code == 401
    hashed = runner.invoke(main, ["keys", "hash"], input="iso-b-second-key\n")
    assert hashed.output.strip() == hash_key("iso-b-second-key")
    assert runner.invoke(main, ["keys", "list", "--tenant", "nobody"]).exit_code != 0


def test_websocket_from_a_foreign_origin_is_refused(pipeline: Settings) -> None:
    chat = f"{ws_base(pipeline)}/v1/chat/ws?tenant=iso-a&customer=o-{uuid.uuid4().hex[:6]}"

    async def opens(url: str, origin: str | None) -> bool:
        try:
            async with websockets.connect(url, origin=origin) as socket:  # type: ignore[arg-type]
                await socket.recv()
                return True
        except websockets.InvalidStatus as exc:
            assert exc.response.status_code == 403
            return False

    async def console(origin: str) -> int | None:
        url = f"{ws_base(pipeline)}/v1/console/ws"
        async with websockets.connect(url, origin=origin) as socket:  # type: ignore[arg-type]
            login = {"type": "login", "tenant": "iso-a", "agent": "ann", "token": "ann-token"}
            await socket.send(json.dumps(login))
            try:
                while True:
                    frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
                    if frame["type"] == "welcome":
                        return None
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None

    assert asyncio.run(opens(chat, "https://evil.example")) is False
    assert asyncio.run(opens(chat, "https://shop.iso-b.example")) is False  # iso-b's, not a's
    assert asyncio.run(opens(chat, "https://shop.iso-a.example")) is True
    assert asyncio.run(opens(chat, f"http://127.0.0.1:{pipeline.gateway.port}")) is True
    assert asyncio.run(opens(chat, None)) is True
    assert asyncio.run(console("https://evil.example")) == 4403
    assert asyncio.run(console("https://shop.iso-a.example")) is None


# --------------------------------------------------------------------- logs


SECRETS = (
    "iso-a-test-key",
    "iso-a-second-key",
    "iso-a-admin-key",
    "ann-token",
    "iso-a-webhook-secret",
    "sig-widget-secret",  # tests/test_webchat.py's tenant (the gateway holds it)
)


def process_logs(settings: Settings) -> dict[Path, str]:
    """Every log file the session's processes write (kefu's daemons, Kafka, Redis),
    not Kafka's log segments (digits.log: those hold the records themselves)."""
    found = {}
    # os.walk, not rglob: ClickHouse creates and removes tmp_insert_* directories
    # under the state directory while we walk it, and rglob fails on one that vanished
    # (os.walk skips what it can no longer list).
    for folder, _, names in os.walk(settings.state_dir):
        for name in names:
            path = Path(folder, name)
            if path.suffix != ".log" or path.stem.isdigit():
                continue
            try:
                found[path] = path.read_text("utf-8", "replace")
            except FileNotFoundError:  # a file in a directory ClickHouse just removed
                continue
    return found


def test_no_secret_and_no_message_text_in_any_log(
    pipeline: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # INFO, as the processes run (DEBUG would capture the test client library echoing
    # the frames it sends itself).
    caplog.set_level(logging.INFO)
    marker = f"MARKER-{uuid.uuid4().hex}"
    customer = f"log-{uuid.uuid4().hex[:8]}"
    with gateway(pipeline) as http:
        for n, key in enumerate(("iso-a-test-key", "iso-a-second-key")):
            accepted = http.post(
                "/v1/messages",
                json={"customer_id": customer, "text": f"{marker} rest {n}", "message_id": f"m{n}"},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert accepted.status_code == 202, accepted.text
        conversation = accepted.json()["conversation_id"]
        # Wrong keys and tokens too (a failure must not echo what was presented).
        assert http.get("/v1/conversations/x", headers={"X-Api-Key": marker}).status_code == 401
        http.get("/v1/admin/keys", headers={"X-Admin-Key": "iso-a-test-key"})

    async def sockets() -> None:
        url = f"{ws_base(pipeline)}/v1/chat/ws?tenant=iso-a&customer={customer}-web"
        async with websockets.connect(url) as socket:
            await socket.recv()
            await socket.send(json.dumps({"type": "message", "id": "w1", "text": f"{marker} web"}))
            while json.loads(await asyncio.wait_for(socket.recv(), 30))["type"] != "ack":
                pass
        async with websockets.connect(f"{ws_base(pipeline)}/v1/console/ws") as socket:
            login = {"type": "login", "tenant": "iso-a", "agent": "ann", "token": "wrong-" + marker}
            await socket.send(json.dumps(login))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(socket.recv(), 10)
        async with websockets.connect(f"{ws_base(pipeline)}/v1/console/ws") as socket:
            login = {"type": "login", "tenant": "iso-a", "agent": "ann", "token": "ann-token"}
            await socket.send(json.dumps(login))
            await asyncio.wait_for(socket.recv(), 10)

    asyncio.run(sockets())

    import redis

    client = redis.Redis.from_url(pipeline.redis.dsn)
    try:
        wait_for(
            lambda: len(client.lrange(messages_key("iso-a", conversation), 0, -1)) >= 2,
            60,
            "both REST messages projected",
        )
    finally:
        client.close()
    logs = process_logs(pipeline)
    names = {p.name for p in logs}
    assert {"gateway.log", "worker-0.log", "clickhouse.log", "server.log"} <= names, names
    for path, text in logs.items():
        assert marker not in text, f"message text in {path}"
        for secret in SECRETS:
            assert secret not in text, f"a secret in {path}"
    assert marker not in caplog.text
    assert not any(secret in caplog.text for secret in SECRETS)
