"""Crypto-shredding on the running stack: a customer's personal fields are sealed on
the log, ``kefu privacy erase`` (and the admin API) shreds their keys, the read models
redact, files go, a replay rebuilds the redacted state, the audit still verifies, a
new process cannot read them, and retention erases only what is old."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from click.testing import CliRunner, Result
from PIL import Image

import kefu.cli
import kefu.cli_analytics
import kefu.cli_privacy
from connectors.config_log import config_record, publish_config
from connectors.identity import conversation_id_for
from connectors.keystore import UnknownCustomer
from kefu.cli import main
from kefu.data_keys import key_store
from kefu.erasure import erase_customer, read_config, retention_candidates, run_retention
from kefu.files import blob_store
from kefu.processes import child_env
from kefu.runtime import settings_env
from kefu.settings import Settings
from projections.audit_keyed import read_all
from projections.clickhouse_query import AnalyticsClient
from schemas.codec import CODEC
from schemas.config import SINGLE
from schemas.keys import conversation_key, messages_key
from schemas.records import MessageReceived
from schemas.sealing import ERASED, PREFIX
from schemas.time import now_ms
from schemas.topics import TopicNames
from tests.conftest import wait_for

KEY = {"X-Api-Key": "demo-test-key"}
SECRET_WORDS = "我住在北京市朝阳区幸福路 8 号"


@pytest.fixture(scope="module")
def http(pipeline: Settings) -> Iterator[httpx.Client]:
    g = pipeline.gateway
    with httpx.Client(base_url=f"http://{g.host}:{g.port}", timeout=30) as client:
        yield client


def _photo() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 90, 200)).save(out, "JPEG")
    return out.getvalue()


def _send(http: httpx.Client, customer: str, text: str, attachments: list[str] = ()) -> None:  # type: ignore[assignment]
    sent = http.post(
        "/v1/messages",
        json={
            "customer_id": customer,
            "text": text,
            "message_id": f"{customer}-{uuid.uuid4().hex[:6]}",
            "attachments": list(attachments),
        },
        headers=KEY,
    )
    assert sent.status_code == 202, sent.text


def _listed(settings: Settings, tenant: str, conversation: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(settings.redis.dsn)
    return [json.loads(x) for x in client.lrange(messages_key(tenant, conversation), 0, -1)]


def _hash(settings: Settings, tenant: str, conversation: str) -> dict[str, str]:
    client = redis.Redis.from_url(settings.redis.dsn, decode_responses=True)
    return dict(client.hgetall(conversation_key(tenant, conversation)))  # type: ignore[arg-type]


def _payloads(settings: Settings, conversation: str) -> list[str]:
    client = AnalyticsClient(settings.clickhouse_url, settings.clickhouse.query_port)
    database = settings.clickhouse.database
    sql = f"SELECT payload FROM {database}.events WHERE conversation_id = '{conversation}'"
    sql += " ORDER BY seq"
    return [str(r[0]) for r in client.query(sql).rows]


def cli(settings: Settings, *args: str) -> Result:
    """``kefu …`` in this process, with the test stack's settings."""
    with pytest.MonkeyPatch.context() as patch:
        for module in (kefu.cli, kefu.cli_analytics):
            patch.setattr(module, "_settings", lambda: settings)
        patch.setattr(kefu.cli_privacy, "load_settings", lambda: settings)
        return CliRunner().invoke(main, list(args))


def _in_new_process(settings: Settings, *args: str) -> str:
    """``kefu …`` in a process of its own (nothing cached): its standard output."""
    env = child_env(settings_env(settings))
    done = subprocess.run(
        [sys.executable, "-m", "kefu.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_erase_redacts_every_read_model_and_keeps_the_log_verifiable(
    pipeline: Settings, http: httpx.Client
) -> None:
    me, other = (f"erase-{uuid.uuid4().hex[:8]}" for _ in range(2))
    upload = http.post(
        "/v1/uploads",
        data={"customer_id": me},
        files={"file": ("my-passport.jpg", _photo(), "image/jpeg")},
        headers=KEY,
    )
    assert upload.status_code == 201, upload.text
    _send(http, me, SECRET_WORDS, [upload.json()["attachment_id"]])
    _send(http, other, "another customer's own words")
    mine = conversation_id_for("demo", "api", me)
    theirs = conversation_id_for("demo", "api", other)

    def answered(conversation: str) -> list[dict[str, Any]] | None:
        listed = _listed(pipeline, "demo", conversation)
        return listed if any(m["role"] == "ai" for m in listed) else None

    before = wait_for(lambda: answered(mine), 60, "my conversation answered in Redis")
    assert any(SECRET_WORDS in m["text"] for m in before)
    wait_for(lambda: answered(theirs), 60, "the other conversation answered")
    wait_for(
        lambda: any(SECRET_WORDS in p for p in _payloads(pipeline, mine)), 60, "ClickHouse rows"
    )
    # On the log the words (and the file's name) are sealed, never in clear.
    names = TopicNames(pipeline.topic_prefix)
    log = asyncio.run(read_all(pipeline.kafka.servers, names.events, {}))
    assert not any(SECRET_WORDS.encode() in v or b"my-passport" in v for _, _, v in log)
    assert any(PREFIX.encode() in v and me.encode() in v for _, _, v in log)
    assert cli(pipeline, "audit", "checkpoint", "--tenant", "demo").exit_code == 0
    storage_key = upload.json().get("storage_key")
    store = blob_store(pipeline)
    blobs_before = asyncio.run(store.usage(f"demo/{mine}/"))
    assert blobs_before > 0

    erased = cli(pipeline, "privacy", "erase", "--tenant", "demo", "--customer", me, "--by", "t")
    assert erased.exit_code == 0, erased.output
    done = json.loads(erased.output)
    assert done["conversations"] == [mine] and done["key_ids"] and done["blob_bytes"] > 0

    # Redis: the list and the preview redacted (on CustomerErased, by the worker).
    def redacted() -> list[dict[str, Any]] | None:
        listed = _listed(pipeline, "demo", mine)
        state = _hash(pipeline, "demo", mine)
        ok = state.get("erased_at") and all(m["text"] in (ERASED, "") for m in listed)
        return listed if ok else None

    after = wait_for(redacted, 60, "Redis redacted")
    assert _hash(pipeline, "demo", mine)["last_message"] == ERASED
    assert len(after) == len(before) + 0 or len(after) >= len(before)
    assert all(a["name"] == ERASED for m in after for a in m.get("attachments", ())) and any(
        m.get("attachments") for m in after
    )

    # ClickHouse: no payload of the conversation holds the words any more.
    def clean() -> list[str] | None:
        found = _payloads(pipeline, mine)
        return found if found and not any(SECRET_WORDS in p for p in found) else None

    payloads = wait_for(clean, 60, "ClickHouse redacted")
    assert any(ERASED in p for p in payloads) and any("CustomerErased" in p for p in payloads)
    # The files are gone; the other customer is untouched everywhere.
    assert asyncio.run(store.usage(f"demo/{mine}/")) == 0
    assert storage_key is None or not asyncio.run(store.exists(storage_key))
    assert any(
        "another customer's own words" in m["text"] for m in _listed(pipeline, "demo", theirs)
    )
    assert any("another customer's own words" in p for p in _payloads(pipeline, theirs))
    # Every read of the log in this process now yields the marker.
    log = asyncio.run(read_all(pipeline.kafka.servers, names.events, {}))
    mine_received = [
        e
        for _, _, v in log
        for e in CODEC.decode_all(v)
        if isinstance(e, MessageReceived) and e.conversation_id in (mine, theirs)
    ]
    assert {e.customer_id: e.text for e in mine_received} == {
        me: ERASED,
        other: "another customer's own words",
    }

    # The log still verifies (hashes of the stored bytes), against the signed checkpoint.
    verified = cli(pipeline, "audit", "verify", "--conversation", mine)
    assert verified.exit_code == 0, verified.output
    assert "ok:" in verified.output

    # A replay rebuilds exactly the redacted list.
    replayed = cli(pipeline, "replay", "--projection", "redis", "--conversation", mine, "--reset")
    assert replayed.exit_code == 0, replayed.output
    assert _listed(pipeline, "demo", mine) == after

    # A process started now (nothing cached) cannot read the erased words either.
    exported = _in_new_process(pipeline, "privacy", "export", "--tenant", "demo", "--customer", me)
    assert SECRET_WORDS not in exported and ERASED in exported
    theirs_exported = _in_new_process(
        pipeline, "privacy", "export", "--tenant", "demo", "--customer", other
    )
    assert "another customer's own words" in theirs_exported


def test_bad_input_gets_a_clear_error(pipeline: Settings) -> None:
    nobody = cli(pipeline, "privacy", "erase", "--tenant", "demo", "--customer", "no-such-one")
    assert nobody.exit_code != 0 and "no customer 'no-such-one'" in nobody.output
    no_tenant = cli(pipeline, "privacy", "erase", "--tenant", "no-such-t", "--customer", "x")
    assert no_tenant.exit_code != 0 and "no tenant 'no-such-t'" in no_tenant.output
    with pytest.raises(UnknownCustomer):
        asyncio.run(erase_customer(pipeline, key_store(pipeline), "demo", "", "t"))


def test_the_admin_api_erases_for_admins_only(pipeline: Settings) -> None:
    g = pipeline.gateway
    customer = f"api-erase-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=f"http://{g.host}:{g.port}", timeout=30) as http:
        sent = http.post(
            "/v1/messages",
            json={"customer_id": customer, "text": "call me at 13800138000", "message_id": "m1"},
            headers={"X-Api-Key": "adm2-test-key"},
        )
        assert sent.status_code == 202, sent.text
        conversation = conversation_id_for("adm2", "api", customer)
        wait_for(lambda: _listed(pipeline, "adm2", conversation), 60, "the message in Redis")
        body = {"customer_id": customer}
        # An API key is no admin's credential; nor is nothing.
        assert http.post("/v1/admin/privacy/erase", json=body, headers=KEY).status_code == 401
        assert http.post("/v1/admin/privacy/erase", json=body).status_code == 401
        admin = {"X-Admin-Key": "adm2-admin-key"}
        missing = http.post(
            "/v1/admin/privacy/erase", json={"customer_id": "nobody-here"}, headers=admin
        )
        assert missing.status_code == 404 and "no customer" in missing.json()["detail"]
        done = http.post("/v1/admin/privacy/erase", json=body, headers=admin)
        assert done.status_code == 200, done.text
        assert done.json()["conversations"] == [conversation]
        assert done.json()["requested_by"].startswith("admin-key:")
    wait_for(
        lambda: (
            all(m["text"] == ERASED for m in _listed(pipeline, "adm2", conversation))
            and _hash(pipeline, "adm2", conversation).get("erased_at")
        ),
        60,
        "Redis redacted after the API's erasure",
    )


def test_retention_erases_only_customers_whose_conversations_all_closed_long_ago(
    pipeline: Settings, http: httpx.Client
) -> None:
    tenant = "ret"  # human-only: nothing answers, closes are the test's
    key = {"X-Api-Key": "ret-test-key"}
    old, open_one, mixed = (f"ret-{n}-{uuid.uuid4().hex[:6]}" for n in ("old", "open", "mix"))
    conversations = {}
    for customer in (old, open_one, mixed):
        sent = http.post(
            "/v1/messages",
            json={"customer_id": customer, "text": f"{customer} private words", "message_id": "1"},
            headers=key,
        )
        assert sent.status_code == 202, sent.text
        conversations[customer] = conversation_id_for(tenant, "api", customer)
    # ``mixed`` has a second conversation (another channel id) still open.
    mixed_open = f"{mixed}-other"

    def status_is(conversation: str, status: str) -> bool:
        return _hash(pipeline, tenant, conversation).get("status") == status

    for conversation in conversations.values():
        wait_for(lambda: status_is(conversation, "open"), 60, "opened")  # noqa: B023
    for customer in (old, mixed):
        closed = http.post(
            f"/v1/conversations/{conversations[customer]}/close",
            json={"closed_by": "ops"},
            headers=key,
        )
        assert closed.status_code == 202, closed.text
    for customer in (old, mixed):
        wait_for(lambda: status_is(conversations[customer], "closed"), 60, "closed")  # noqa: B023
    # The second conversation of ``mixed``, open: written straight to the read model's
    # index as the projection would (a conversation of the same customer).
    client = redis.Redis.from_url(pipeline.redis.dsn, decode_responses=True)
    client.hset(
        conversation_key(tenant, mixed_open), mapping={"customer_id": mixed, "status": "open"}
    )
    client.zadd(f"kefu:{tenant}:conversations", {mixed_open: now_ms()})

    async def set_retention(days: int) -> None:
        from aiokafka import AIOKafkaProducer

        config = await read_config(pipeline)
        producer = AIOKafkaProducer(bootstrap_servers=pipeline.kafka.servers)
        await producer.start()
        try:
            record = config_record(
                tenant,
                "tenant",
                SINGLE,
                {**(config.get(tenant, "tenant") or {}), "retention_days": days},
                "test",
                config.version(tenant, "tenant", SINGLE),
            )
            await publish_config(producer, TopicNames(pipeline.topic_prefix).config, record)
        finally:
            await producer.stop()

    asyncio.run(set_retention(30))
    config = asyncio.run(read_config(pipeline))
    store = key_store(pipeline)
    # Today nobody is due: the closes are minutes old.
    assert asyncio.run(run_retention(pipeline, store, config, [tenant], dry_run=True)) == {}
    later = now_ms() + 31 * 86_400_000
    due = asyncio.run(
        retention_candidates(
            redis.asyncio.Redis.from_url(pipeline.redis.dsn), tenant, later - 30 * 86_400_000
        )
    )
    assert old in due and open_one not in due and mixed not in due
    erased = asyncio.run(run_retention(pipeline, store, config, [tenant], now=later))
    assert erased == {tenant: [old]}
    wait_for(
        lambda: (
            all(m["text"] == ERASED for m in _listed(pipeline, tenant, conversations[old]))
            and _hash(pipeline, tenant, conversations[old]).get("erased_at")
        ),
        60,
        "the old customer redacted",
    )
    for kept in (open_one, mixed):
        assert any(
            "private words" in m["text"] for m in _listed(pipeline, tenant, conversations[kept])
        )
    # Run again: the old customer is not erased twice.
    again = asyncio.run(run_retention(pipeline, store, config, [tenant], now=later + 1))
    assert old not in again.get(tenant, [])
    # The CLI says the same (dry run, today: nothing due).
    listed = cli(pipeline, "privacy", "retention", "--tenant", tenant, "--dry-run")
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output)["erased"] == {}
