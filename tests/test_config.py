"""Configuration as events: the fold, sealed secrets, and a change reaching the gateway
and a worker on the running stack without a restart."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from cryptography.exceptions import InvalidTag

from connectors.config_log import SecretBox, config_record, publish_config, shown
from connectors.console import AgentAccount
from connectors.live_agents import LiveAgentDirectory
from kefu.settings import Settings
from schemas.config import ConfigState, valid_hours, within_hours
from schemas.topics import TopicNames
from tests.conftest import wait_for


def test_the_fold_keeps_the_newest_version_of_each_entity() -> None:
    state = ConfigState()
    first = config_record("t1", "team", "billing", {"name": "Billing"}, "seed")
    newer = config_record("t1", "team", "billing", {"name": "账单"}, "ann", first.version)
    assert state.apply(first) and state.apply(newer)
    assert not state.apply(first)  # replayed or reordered: never undoes the newer one
    assert state.get("t1", "team", "billing") == {"name": "账单"}
    assert state.entity("t1", "team", "billing").changed_by == "ann"  # type: ignore[union-attr]
    gone = config_record("t1", "team", "billing", None, "ann", newer.version)
    assert state.apply(gone) and state.get("t1", "team", "billing") is None
    assert not state.apply(newer)  # a create older than the deletion stays deleted
    assert state.all("t2", "team") == {} and state.version("t1", "team", "billing") == gone.version


def test_tenants_see_only_their_own_entities() -> None:
    state = ConfigState()
    state.apply(config_record("a", "canned", "hi", {"title": "Hi", "text": "Hello"}, "x"))
    state.apply(config_record("b", "canned", "hi", {"title": "B", "text": "B's"}, "x"))
    assert state.canned("a") == [{"id": "hi", "title": "Hi", "text": "Hello"}]
    assert state.widget("a")["color"] == "#1565c0"  # defaults where nothing is set


def test_business_hours() -> None:
    hours = {"timezone": "Asia/Shanghai", "days": {"mon": [["09:00", "18:00"]]}}
    monday_10_shanghai = dt.datetime(2026, 12, 7, 2, 0, tzinfo=dt.UTC)  # 10:00 in Shanghai
    assert within_hours(hours, monday_10_shanghai)
    assert not within_hours(hours, monday_10_shanghai + dt.timedelta(hours=9))
    assert not within_hours(hours, monday_10_shanghai + dt.timedelta(days=1))
    assert valid_hours(hours) == []
    bad = {"timezone": "Mars/Base", "days": {"mon": [["18:00", "09:00"]], "xyz": []}}
    assert len(valid_hours(bad)) == 3


def test_secrets_are_sealed_and_never_shown() -> None:
    box = SecretBox(b"k" * 32)
    data = box.seal_fields({"app_id": "wx1", "app_secret": "s3cret", "token": ""}, "t1/channel")
    assert data["app_id"] == "wx1" and "s3cret" not in json.dumps(data)
    assert box.open(data["app_secret"], "t1/channel/app_secret") == "s3cret"
    with pytest.raises(InvalidTag):  # another entity's context: not this ciphertext
        box.open(data["app_secret"], "t2/channel/app_secret")
    with pytest.raises(InvalidTag):
        SecretBox(b"other key").open(data["app_secret"], "t1/channel/app_secret")
    assert shown(data) == {"app_id": "wx1", "app_secret": {"set": True}, "token": {"set": False}}


def _worker_entity(
    settings: Settings, kind: str, entity_id: str, tenant: str = "cfg"
) -> dict[str, Any] | None:
    url = f"http://127.0.0.1:{settings.worker.web_port}/config"
    try:
        got = httpx.get(url, params={"tenant": tenant, "kind": kind, "id": entity_id}, timeout=5)
    except httpx.HTTPError:
        return None
    entity: dict[str, Any] | None = got.json().get("entity") if got.status_code == 200 else None
    return entity


def test_a_change_reaches_the_gateway_and_a_worker_without_a_restart(pipeline: Settings) -> None:
    """Written to the topic, the change is applied by the running gateway (its chat
    settings) and worker (its /config page) within two seconds."""
    # The seed of the environment is on the topic: the gateway wrote it on its start.
    seeded = wait_for(lambda: _worker_entity(pipeline, "tenant", "-"), 60, "the seeded tenant")
    assert seeded["data"]["name"] == "cfg"
    record = config_record(
        "cfg", "canned", "thanks", {"title": "谢谢", "text": "感谢您的耐心"}, "test"
    )

    async def publish() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=pipeline.kafka.servers, acks="all")
        await producer.start()
        try:
            await publish_config(producer, TopicNames(pipeline.topic_prefix).config, record)
        finally:
            await producer.stop()

    start = time.monotonic()
    asyncio.run(publish())
    found = wait_for(lambda: _worker_entity(pipeline, "canned", "thanks"), 10, "the worker")
    worker_s = time.monotonic() - start
    assert found["version"] == record.version and found["data"]["title"] == "谢谢"
    assert worker_s < 2.0, f"the worker applied it after {worker_s:.2f} s"


def test_the_console_directory_follows_the_config() -> None:
    state = ConfigState()
    seed = {"t1": {"alice": AgentAccount(token_sha256="ab" * 32, team="default", capacity=3)}}
    directory = LiveAgentDirectory(state, seed)
    assert directory["t1"]["alice"].capacity == 3
    alice = {"name": "Alice", "teams": ["billing"], "capacity": 5, "skills": ["refunds"]}
    state.apply(config_record("t1", "agent", "alice", alice, "admin"))
    account = directory["t1"]["alice"]
    assert (account.team, account.capacity, account.skills) == ("billing", 5, ("refunds",))
    assert account.token_sha256 == "ab" * 32  # the token still logs her in
    state.apply(config_record("t1", "agent", "alice", {**alice, "disabled": True}, "admin", 10**13))
    assert "alice" not in directory["t1"]  # disabled: no login, no routing
    state.apply(config_record("t2", "tenant", "-", {"name": "t2"}, "admin"))
    assert "t2" in list(directory)


def test_an_faq_entry_from_admin_answers_the_next_customer(pipeline: Settings) -> None:
    """No restart: the worker's responder asks the tenant's own FAQ first."""
    entry = {"question": "开发票需要多久", "answer": "电子发票 24 小时内发到您的邮箱。"}
    record = config_record("cfgai", "faq", "invoice", entry, "test")

    async def publish() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=pipeline.kafka.servers, acks="all")
        await producer.start()
        try:
            await publish_config(producer, TopicNames(pipeline.topic_prefix).config, record)
        finally:
            await producer.stop()

    asyncio.run(publish())
    wait_for(lambda: _worker_entity(pipeline, "faq", "invoice", "cfgai"), 10, "the worker")
    g = pipeline.gateway
    with httpx.Client(base_url=f"http://{g.host}:{g.port}", timeout=30) as http:
        key = {"X-Api-Key": "cfgai-test-key"}
        sent = http.post(
            "/v1/messages", json={"customer_id": "buyer-1", "text": "开发票需要多久？"}, headers=key
        )
        assert sent.status_code == 202, sent.text
        conversation = sent.json()["conversation_id"]

        def replied() -> list[dict[str, Any]] | None:
            got = http.get(f"/v1/conversations/{conversation}", headers=key)
            if got.status_code != 200:
                return None
            return [m for m in got.json()["messages"] if m.get("role") == "ai"] or None

        replies = wait_for(replied, 60, "the AI's reply")
    assert replies[0]["text"] == "电子发票 24 小时内发到您的邮箱。"


def test_ai_settings_from_admin_tune_the_next_answer() -> None:
    from kefu.ai import ai_config
    from kefu.settings import AISettings

    live = ConfigState()
    config = ai_config(AISettings(temperature=0.4, max_tokens=512), live)
    assert config.tuning_for("t1").temperature == 0.4  # nothing set: the defaults
    ai = {"temperature": 0.1, "system_prompt": "你是小鹿商城的客服。"}
    live.apply(config_record("t1", "ai", "-", ai, "admin"))
    tuned = config.tuning_for("t1")
    assert (tuned.temperature, tuned.max_tokens, tuned.system_prompt) == (
        0.1,
        512,
        "你是小鹿商城的客服。",
    )
    assert config.tuning_for("t2").temperature == 0.4  # another tenant's stays
